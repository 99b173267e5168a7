"""Tool chain plumbing that needs no tools tree: mirrors, mkosi argv, errors, accel choice."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from vvu_runtime.launch.accel import Accelerator, AccelError, choose_accelerator
from vvu_runtime.launch.toolchain import (
    FALLBACK_MIRROR,
    FALLBACK_SECURITY,
    Toolchain,
    ToolchainMissing,
    host_debian_mirrors,
    main,
)

REPO = Path(__file__).resolve().parents[2]


def test_mirrors_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\n"
        "# a comment\n"
        "URIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "\n"
        "Types: deb-src\n"
        "URIs: http://src.example/debian\n"
        "Suites: bookworm\n"
        "\n"
        "Types: deb\n"
        "URIs: http://sec.example/debian-security\n"
        "Suites: bookworm-security\n"
    )
    assert host_debian_mirrors(tmp_path) == (
        "http://mirror.example/debian",
        "http://sec.example/debian-security",
    )


def test_mirrors_from_one_line_sources_and_fallbacks(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://one.example/debian bookworm main\n"
    )
    assert host_debian_mirrors(tmp_path) == ("https://one.example/debian", FALLBACK_SECURITY)
    assert host_debian_mirrors(tmp_path / "nothing") == (FALLBACK_MIRROR, FALLBACK_SECURITY)


def _fake_mkosi(cache: Path, version: str) -> None:
    site = cache / "mkosi" / version / "usr/lib/python3/dist-packages/mkosi"
    site.mkdir(parents=True)
    (site / "__main__.py").write_text("")
    (cache / "mkosi/current.json").write_text(
        json.dumps({"version": version, "root": str(cache / "mkosi" / version)})
    )


def test_nothing_built_gives_actionable_errors(tmp_path: Path) -> None:
    tc = Toolchain(cache_dir=tmp_path, repo=REPO)
    assert not tc.is_built()
    with pytest.raises(ToolchainMissing, match=r"\./setup"):
        tc.mkosi()
    _fake_mkosi(tmp_path, "27.1-1")
    with pytest.raises(ToolchainMissing, match="tools tree is not built"):
        tc.command(["true"])
    with pytest.raises(ToolchainMissing, match=r"\./setup"):
        tc.path("kernel")


def test_status_exit_code_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VVU_CACHE_DIR", str(tmp_path))
    assert main(["status"]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_mkosi_argv_per_mkosi_generation(tmp_path: Path) -> None:
    _fake_mkosi(tmp_path, "27.1-1")
    tc = Toolchain(cache_dir=tmp_path, repo=REPO)
    argv = tc.mkosi_argv("summary")
    assert f"--directory={REPO}" in argv
    assert f"VVU_CACHE_DIR={tmp_path}" in argv
    assert argv[-1] == "summary"
    assert tc.tree == tmp_path / "tools/mkosi.tools"

    old = tmp_path / "old"
    _fake_mkosi(old, "25.3-7")
    tc25 = Toolchain(cache_dir=old, repo=REPO)
    argv25 = tc25.mkosi_argv("summary")
    # mkosi 25: run from the repo (its -C breaks sandbox), tree at OUTPUTDIR/tools.
    assert f"--output-directory={old}/tools" in argv25
    assert str(REPO) in argv25 and f"--directory={REPO}" not in argv25
    assert tc25.tree == old / "tools/tools"


def test_command_keeps_a_double_dash_of_the_program(tmp_path: Path) -> None:
    _fake_mkosi(tmp_path, "27.1-1")
    (tmp_path / "tools/mkosi.tools/usr/bin").mkdir(parents=True)
    (tmp_path / "tools/mkosi.tools/usr/bin/qemu-system-x86_64").touch()
    tc = Toolchain(cache_dir=tmp_path, repo=REPO)
    plain = tc._command(["echo", "a b"])
    assert plain[-2:] == ["echo", "a b"]
    # mkosi's argparse would eat the program's own "--": it must travel inside one word.
    argv = tc._command(["dpdk-testpmd", "-l", "0,1", "--", "--forward-mode=io"])
    verb = argv.index("sandbox")
    assert argv[verb + 1] == "--" and "--" not in argv[verb + 2:]
    assert argv[-3:-1] == ["/bin/sh", "-c"]
    assert shlex.split(argv[-1]) == ["exec", "dpdk-testpmd", "-l", "0,1", "--",
                                     "--forward-mode=io"]


def test_accelerator_args_and_forced_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Accelerator.TCG.qemu_args()[-2:] == ["-cpu", "max"]
    assert Accelerator.KVM.qemu_args()[:2] == ["-accel", "kvm"]
    tc = Toolchain(cache_dir=tmp_path, repo=REPO)
    monkeypatch.setenv("VVU_ACCEL", "tcg")
    assert choose_accelerator(tc).accel is Accelerator.TCG  # no probe, no tools tree needed
    monkeypatch.setenv("VVU_ACCEL", "hvf")
    with pytest.raises(AccelError, match="VVU_ACCEL"):
        choose_accelerator(tc)


def test_mkosi_wrapper_and_tree_link(tmp_path: Path) -> None:
    _fake_mkosi(tmp_path, "27.1-1")
    tc = Toolchain(cache_dir=tmp_path, repo=REPO)
    wrapper = tc.write_mkosi_wrapper(tc.mkosi_wrapper, tc.mkosi(), "/usr/bin/python3")
    assert wrapper == tmp_path / "bin/mkosi" and wrapper.stat().st_mode & 0o111
    text = wrapper.read_text()
    assert f': "${{VVU_CACHE_DIR:={tmp_path}}}"' in text and "export VVU_CACHE_DIR" in text
    assert "exec /usr/bin/python3 -m mkosi" in text and "27.1-1" in text
    # The configs name the tree through tools/tree, whatever mkosi's generation.
    (tmp_path / "tools/mkosi.tools").mkdir(parents=True)
    tc._link_tree()
    assert tc.tree_link.resolve() == tc.tree.resolve()
    standalone = (REPO / "appliances/standalone.conf").read_text()
    assert "ToolsTree=$VVU_CACHE_DIR/tools/tree" in standalone


def test_collect_scratch_removes_only_the_directories_of_finished_processes(
        tmp_path: Path) -> None:
    tc = Toolchain(cache_dir=tmp_path, repo=REPO)
    assert tc.collect_scratch() == []  # no scratch directory yet
    done = subprocess.Popen(["true"])
    done.wait()  # reaped: its pid runs no more
    live, dead, odd = (tc.scratch_dir / str(os.getpid()), tc.scratch_dir / str(done.pid),
                       tc.scratch_dir / "not-a-pid")
    for d in (live, dead, odd):
        (d / "mkosi-path-x").mkdir(parents=True)
    assert sorted(tc.collect_scratch()) == sorted([dead, odd])
    assert live.exists() and not dead.exists() and not odd.exists()


def test_every_mkosi_command_gets_its_own_scratch_directory(tmp_path: Path) -> None:
    _fake_mkosi(tmp_path, "27.1-1")
    tc = Toolchain(cache_dir=tmp_path, repo=REPO)
    argv = tc.mkosi_argv("summary")
    # A shell that creates scratch/PID, points TMPDIR there and execs mkosi (same PID).
    script = argv[argv.index("-c") + 1]
    out = subprocess.run(["/bin/sh", "-c", script, str(tc.scratch_dir), "/bin/sh", "-c",
                          'echo "$$ $TMPDIR"'], capture_output=True, text=True, check=True)
    pid, tmpdir = out.stdout.split()
    assert Path(tmpdir) == tc.scratch_dir / pid and Path(tmpdir).is_dir()
