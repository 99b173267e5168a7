"""vvu's tool chain: mkosi, and the mkosi tools tree with QEMU and friends.

Nothing vvu runs comes from the host's packages. ``vvu-toolchain ensure``
fetches mkosi (a pure-Python .deb, not on PyPI) with a private apt
configuration, and has mkosi build a Debian trixie *tools tree* (configured by
``mkosi.conf`` and ``mkosi.tools.conf`` at the repository root) holding QEMU
>= 10.1 from trixie-backports, qemu-img/qemu-io with the blkio driver,
qemu-storage-daemon, firmware, the consumer guests' kernel and busybox,
DPDK's testpmd and Open vSwitch (the switch benchmark's peers) and virtiofsd
(the fs benchmark's host-mode peer).
:meth:`Toolchain.command` runs a program inside that tree (``mkosi sandbox``),
which shares the host's /tmp, /dev/shm, /dev/kvm and PID namespace, so such a
program talks to host processes over UNIX sockets and shared-memory files.

Everything lives in ``$VVU_CACHE_DIR`` (default ``/var/cache/vvu``), outside
the checkout, so every clone reuses it::

    mkosi/<version>/      extracted mkosi .deb
    mkosi/apt/            private apt state used to fetch it
    toolchain/sources/    apt sources for the tools tree (the host's mirror)
    tools/mkosi.tools/    the tools tree
    tools/vvu-stamp.json  hash of the inputs the tree was built from
    packages/             mkosi's package cache
    initramfs/            consumer initramfs images (initramfs.py)

Errors: :class:`ToolchainError`; :class:`ToolchainMissing` when something is
not there yet (its message says what to run).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vvu_runtime.console import run_main
from vvu_runtime.errors import VvuError
from vvu_runtime.launch.procs import pid_alive

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MIN_QEMU",
    "Component",
    "MkosiInstall",
    "Toolchain",
    "ToolchainError",
    "ToolchainMissing",
    "main",
    "stop_process_group",
]

DEFAULT_CACHE_DIR = Path("/var/cache/vvu")
#: -device vfio-user-pci appeared in QEMU 10.1.
MIN_QEMU = (10, 1)
#: The mkosi vvu is built and tested with (Debian package version). Fetched from
#: whichever suite of MKOSI_SUITES still has it; once sid moves on, the fallback
#: is the newest mkosi of those suites (trixie's 25.3 stays for trixie's whole
#: life), with a warning. VVU_MKOSI_VERSION overrides the pin ("" = no pin).
MKOSI_PIN = os.environ.get("VVU_MKOSI_VERSION", "27.1-1")
#: Suites searched in order: sid has 27.x (smaller tools tree, mkosi.tools.conf).
MKOSI_SUITES = tuple(os.environ.get("VVU_MKOSI_SUITES", "sid trixie").split())
#: Inside the tools tree: the host PATH may hold e.g. a pyenv shim shadowing python3.
SANDBOX_PATH = "/usr/bin:/usr/sbin"
#: For mkosi itself (it runs host apt/dpkg/python3 while bootstrapping the tree).
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: If the host's apt sources name no Debian mirror.
FALLBACK_MIRROR = "http://deb.debian.org/debian"
FALLBACK_SECURITY = "http://deb.debian.org/debian-security"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

ENSURE_HINT = "run ./setup (or .venv/bin/vvu-toolchain ensure)"


class ToolchainError(VvuError):
    """The tool chain cannot be prepared or used; the message says why."""


class ToolchainMissing(ToolchainError):
    """A part of the tool chain is not there yet; the message says what to run."""


def _say(msg: str) -> None:
    print(f"vvu-toolchain: {msg}", file=sys.stderr, flush=True)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a process started with ``start_new_session=True`` and all of its group.

    SIGINT first, to the whole group: QEMU shuts down on it, and the mkosi
    wrapper unwinds (KeyboardInterrupt) and removes its /var/tmp/mkosi-var-tmp-*
    directory, which SIGTERM or SIGKILL would leave behind. SIGKILL after
    ``grace`` seconds, and to any straggler of the group.
    """
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# The host's Debian mirror
# --------------------------------------------------------------------------


def _apt_source_uris(etc: Path = Path("/etc/apt")) -> list[str]:
    """URIs of the host's ``deb`` sources, in file order."""
    uris: list[str] = []
    one_line = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in one_line:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 2 and words[0] == "deb":
                    uris.append(words[1])
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get(
                    "enabled", "yes"
                ).lower() not in ("no", "false", "0"):
                    uris.extend(fields.get("uris", "").split())
    return uris


def host_debian_mirrors(etc: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(archive, security) URLs from the host's apt sources, with fallbacks."""
    archive = security = None
    for uri in _apt_source_uris(etc):
        u = uri.rstrip("/")
        if not u.startswith(("http://", "https://")):
            continue
        if u.endswith("/debian-security") and security is None:
            security = u
        elif u.endswith("/debian") and archive is None:
            archive = u
    return archive or FALLBACK_MIRROR, security or FALLBACK_SECURITY


# --------------------------------------------------------------------------
# mkosi
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MkosiInstall:
    """An extracted mkosi .deb in the cache."""

    version: str  # Debian version, e.g. "27.1-1"
    root: Path  # where the .deb was extracted

    @property
    def site(self) -> Path:
        """The directory to put on sys.path for ``python -m mkosi``."""
        return self.root / "usr/lib/python3/dist-packages"

    @property
    def major(self) -> int:
        return int(self.version.split(".", 1)[0].split(":")[-1])


class _PrivateApt:
    """apt-get/apt-cache with private sources and state: the host's apt is untouched."""

    def __init__(self, state: Path, mirror: str, suites: Sequence[str]) -> None:
        self.state = state
        self.sources = state / "sources.list"
        lines = [f"deb [signed-by={KEYRING}] {mirror} {suite} main" for suite in suites]
        state.mkdir(parents=True, exist_ok=True)
        (state / "lists/partial").mkdir(parents=True, exist_ok=True)
        (state / "archives/partial").mkdir(parents=True, exist_ok=True)
        self.sources.write_text("\n".join(lines) + "\n")

    def _options(self) -> list[str]:
        s = self.state
        return [
            f"-oDir::Etc::SourceList={self.sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            "-oDir::Etc::Preferences=/dev/null",
            "-oDir::Etc::PreferencesParts=/dev/null",
            f"-oDir::State::Lists={s / 'lists'}",
            f"-oDir::Cache={s}",
            "-oDir::State::status=/dev/null",
            # Downloads land in a root-owned cache; apt's _apt sandbox user cannot write there.
            "-oAPT::Sandbox::User=root",
            "-oAcquire::Retries=3",
            # Mirrors may serve frozen snapshots whose Release files are past
            # Valid-Until; signatures are still checked (mkosi does the same).
            "-oAcquire::Check-Valid-Until=false",
        ]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        argv = [tool, "-q", *self._options(), *args]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
        if result.returncode != 0:
            raise ToolchainError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr.strip()}"
            )
        return result.stdout

    def candidate(self, package: str, suite: str) -> str | None:
        """The version ``apt-get download package/suite`` would fetch, or None."""
        out = self.run("apt-cache", "-t", suite, "policy", package)
        m = re.search(r"Candidate:\s*(\S+)", out)
        return m.group(1) if m and m.group(1) != "(none)" else None


# --------------------------------------------------------------------------
# The tool chain
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One line of ``vvu-toolchain status``."""

    name: str
    version: str | None  # None: missing
    where: str

    @property
    def ok(self) -> bool:
        return self.version is not None


def _repo_root() -> Path:
    # vvu is installed editable from the checkout holding mkosi.conf.
    root = Path(__file__).resolve().parents[2]
    return root


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


class Toolchain:
    """mkosi plus the tools tree, in ``cache_dir``.

    ``repo`` is the directory holding vvu's ``mkosi.conf`` (the checkout).
    """

    def __init__(self, cache_dir: Path | None = None, repo: Path | None = None) -> None:
        env_cache = os.environ.get("VVU_CACHE_DIR")
        self.cache_dir = (cache_dir or Path(env_cache or DEFAULT_CACHE_DIR)).resolve()
        self.repo = (repo or _repo_root()).resolve()
        self._qemu_version: tuple[int, int, int] | None = None

    # ---- locations --------------------------------------------------------

    @property
    def tools_dir(self) -> Path:
        return self.cache_dir / "tools"

    @property
    def tree(self) -> Path:
        """The tools tree as seen from the host."""
        with contextlib.suppress(ToolchainMissing):
            if self.mkosi().major < 26:
                return self.tools_dir / "tools"
        return self.tools_dir / "mkosi.tools"

    @property
    def tree_link(self) -> Path:
        """``tools/tree``: a symlink to :attr:`tree`, what the image configs name
        (``ToolsTree=$VVU_CACHE_DIR/tools/tree``) whatever mkosi's version."""
        return self.tools_dir / "tree"

    @property
    def scratch_dir(self) -> Path:
        """Where each mkosi process vvu starts keeps its temporary files: ``scratch/PID``.

        mkosi copies itself (``mkosi-path-*``) and its resources to ``$TMPDIR`` for
        every ``mkosi sandbox`` and removes them only when it unwinds; a killed one
        leaves them. Under one PID-named directory per process they are found and
        removed (:meth:`collect_scratch`) once that process is gone, instead of
        piling up in the host's /tmp.
        """
        return self.cache_dir / "scratch"

    def collect_scratch(self) -> list[Path]:
        """Remove the scratch directories of mkosi processes that no longer run.

        Returns what was removed. Called before every mkosi command and by
        ``vvu-launch down``.
        """
        removed: list[Path] = []
        try:
            entries = list(self.scratch_dir.iterdir())
        except FileNotFoundError:
            return removed
        for entry in entries:
            if entry.name.isdigit() and pid_alive(int(entry.name)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        return removed

    def _link_tree(self) -> None:
        link = self.tree_link
        if link.is_symlink() and os.readlink(link) == self.tree.name:
            return
        tmp = link.with_name(f".tree.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.tree.name)
        tmp.replace(link)

    @property
    def stamp_file(self) -> Path:
        return self.tools_dir / "vvu-stamp.json"

    @property
    def sources_tree(self) -> Path:
        return self.cache_dir / "toolchain/sources"

    @property
    def package_cache(self) -> Path:
        return self.cache_dir / "packages"

    @property
    def initramfs_cache(self) -> Path:
        return self.cache_dir / "initramfs"

    @property
    def _mkosi_pointer(self) -> Path:
        return self.cache_dir / "mkosi/current.json"

    # ---- mkosi --------------------------------------------------------------

    def mkosi(self) -> MkosiInstall:
        """The cached mkosi; :class:`ToolchainMissing` if not fetched yet."""
        try:
            data = json.loads(self._mkosi_pointer.read_text())
            install = MkosiInstall(data["version"], Path(data["root"]))
        except (OSError, ValueError, KeyError) as e:
            raise ToolchainMissing(f"mkosi is not in {self.cache_dir}/mkosi: {ENSURE_HINT}") from e
        if not (install.site / "mkosi/__main__.py").is_file():
            raise ToolchainMissing(
                f"mkosi {install.version} is incomplete at {install.root}: {ENSURE_HINT}"
            )
        return install

    def fetch_mkosi(self, *, refresh: bool = False) -> MkosiInstall:
        """Download and extract mkosi from sid (preferred) or trixie, once."""
        if not refresh:
            with contextlib.suppress(ToolchainMissing):
                return self.mkosi()
        mirror, _ = host_debian_mirrors()
        if not KEYRING.is_file():
            raise ToolchainMissing(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
        apt = _PrivateApt(self.cache_dir / "mkosi/apt", mirror, MKOSI_SUITES)
        _say(f"fetching mkosi: apt-get update ({mirror}: {', '.join(MKOSI_SUITES)})")
        errors = []
        try:
            apt.run("apt-get", "update")
        except ToolchainError as e:
            # One suite failing must not stop the fallback to the other.
            errors.append(f"apt-get update: {e}")
        offers = {suite: apt.candidate("mkosi", suite) for suite in MKOSI_SUITES}
        pinned = [s for s, v in offers.items() if MKOSI_PIN and v == MKOSI_PIN]
        if MKOSI_PIN and not pinned:
            _say(f"warning: mkosi {MKOSI_PIN} (the pinned version) is not on {mirror} any "
                 f"more ({', '.join(f'{s}: {v}' for s, v in offers.items())}); falling back "
                 "to the first suite that has one (see VVU_MKOSI_VERSION)")
        for suite in pinned + [s for s in MKOSI_SUITES if s not in pinned]:
            version = offers[suite]
            if version is None:
                errors.append(f"{suite}: no mkosi")
                continue
            dest = self.cache_dir / "mkosi" / version.replace(":", "_")
            dl = self.cache_dir / "mkosi/download"
            shutil.rmtree(dl, ignore_errors=True)
            dl.mkdir(parents=True)
            try:
                apt.run("apt-get", "download", f"mkosi/{suite}", cwd=dl)
                (deb,) = dl.glob("mkosi_*.deb")
                shutil.rmtree(dest, ignore_errors=True)
                subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
            except (ToolchainError, ValueError, subprocess.CalledProcessError) as e:
                errors.append(f"{suite}: {e}")
                continue
            finally:
                shutil.rmtree(dl, ignore_errors=True)
            install = MkosiInstall(version, dest)
            self._mkosi_pointer.write_text(
                json.dumps({"version": version, "root": str(dest), "suite": suite})
            )
            _say(f"mkosi {version} from {suite} extracted to {dest}")
            return install
        raise ToolchainError("cannot fetch mkosi: " + "; ".join(errors))

    def link_mkosi_into_venv(self, install: MkosiInstall) -> Path | None:
        """A ``.pth`` in the running venv, so its ``python -m mkosi`` works, and a
        ``mkosi`` command next to its python (:meth:`write_mkosi_wrapper`)."""
        if sys.prefix == sys.base_prefix:
            return None  # not a venv: commands carry PYTHONPATH instead
        pth = Path(sysconfig.get_paths()["purelib"]) / "vvu-mkosi.pth"
        want = f"{install.site}\n"
        if not pth.is_file() or pth.read_text() != want:
            pth.write_text(want)
        self.write_mkosi_wrapper(Path(sysconfig.get_paths()["scripts"]) / "mkosi", install)
        return pth

    @property
    def mkosi_wrapper(self) -> Path:
        """``$VVU_CACHE_DIR/bin/mkosi``: the clone-independent ``mkosi`` command
        (host python3); ./setup links ``/usr/local/bin/mkosi`` to it."""
        return self.cache_dir / "bin/mkosi"

    def write_mkosi_wrapper(self, path: Path, install: MkosiInstall,
                            python: str | None = None) -> Path:
        """A ``mkosi`` command: the cached mkosi with ``VVU_CACHE_DIR`` set (default:
        this cache), so ``mkosi -C appliances/NAME build`` finds the tools tree,
        sources and caches the configs name through ``$VVU_CACHE_DIR``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            "#!/bin/sh\n"
            f"# mkosi {install.version} for vvu (written by vvu-toolchain ensure).\n"
            f': "${{VVU_CACHE_DIR:={self.cache_dir}}}"\n'
            "export VVU_CACHE_DIR\n"
            f"PYTHONPATH={shlex.quote(str(install.site))} PATH={HOST_PATH} \\\n"
            f"    exec {shlex.quote(python or sys.executable)} -m mkosi \"$@\"\n"
        )
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text)
            tmp.chmod(0o755)
            tmp.replace(path)
        return path

    def mkosi_argv(self, *args: str) -> list[str]:
        """Run mkosi on vvu's configuration (``env … python -m mkosi …``).

        Appliance builds use the same tools tree by passing
        ``--tools-tree=`` :attr:`tree` to their own mkosi invocation.
        """
        install = self.mkosi()
        if not (self.repo / "mkosi.conf").is_file():
            raise ToolchainError(f"{self.repo}/mkosi.conf not found: is vvu installed editable?")
        argv = [
            "/usr/bin/env",
            f"PATH={HOST_PATH}",
            f"VVU_CACHE_DIR={self.cache_dir}",
            # Explicit even with the venv's .pth: several caches may share one venv.
            f"PYTHONPATH={install.site}",
            sys.executable,
            "-m",
            "mkosi",
        ]
        if install.major < 26:
            # mkosi 25 ignores mkosi.tools.conf and puts the tree at OUTPUTDIR/tools;
            # its "-C DIR sandbox" exits 127, so change directory instead.
            argv[1:1] = ["sh", "-c", 'cd "$0" && exec /usr/bin/env "$@"', str(self.repo)]
            argv += [f"--output-directory={self.tools_dir}"]
        else:
            argv += [f"--directory={self.repo}"]
        self.collect_scratch()
        # "$$" is the shell's PID, which exec hands on to mkosi: its own directory.
        scratch = ["/bin/sh", "-c", 'mkdir -p "$0/$$" && TMPDIR="$0/$$" exec "$@"',
                   str(self.scratch_dir)]
        return [
            *scratch,
            *argv,
            f"--package-cache-directory={self.package_cache}",
            f"--tools-tree-sandbox-tree={self.sources_tree}",
            *args,
        ]

    # ---- the tools tree ---------------------------------------------------

    def _write_sources(self) -> str:
        mirror, security = host_debian_mirrors()
        text = (
            "# Written by vvu-toolchain from the host's apt mirror. Deb lines only:\n"
            "# mkosi's generated list adds a debug archive that mirrors may refuse.\n"
            f"Types: deb\nURIs: {mirror}\n"
            "Suites: trixie trixie-updates trixie-backports\nComponents: main\n"
            f"Signed-By: {KEYRING}\n\n"
            f"Types: deb\nURIs: {security}\nSuites: trixie-security\nComponents: main\n"
            f"Signed-By: {KEYRING}\n"
        )
        path = self.sources_tree / "etc/apt/sources.list.d/mkosi.sources"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        return text

    def _inputs_hash(self, install: MkosiInstall, sources: str) -> str:
        # mkosi's own cache manifest ignores sandbox trees (apt pin, sources):
        # hash everything the tree is built from and rebuild when it changes.
        h = hashlib.sha256()
        h.update(install.version.encode())
        h.update(sources.encode())
        inputs = [self.repo / "mkosi.conf", self.repo / "mkosi.tools.conf"]
        inputs += sorted(p for p in (self.repo / "toolchain").rglob("*") if p.is_file())
        for p in inputs:
            if p.is_file():
                h.update(str(p.relative_to(self.repo)).encode() + b"\0" + p.read_bytes())
        return h.hexdigest()

    def _stamp(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stamp_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _tree_present(self) -> bool:
        return (self.tree / "usr/bin/qemu-system-x86_64").exists()

    def is_built(self) -> bool:
        """Built from the current inputs and verified by :meth:`ensure`."""
        return self._tree_present() and bool(self._stamp().get("verified"))

    def require_built(self) -> None:
        if not self.is_built():
            raise ToolchainMissing(f"the tools tree is not built at {self.tree}: {ENSURE_HINT}")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / "toolchain.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say("waiting for another vvu-toolchain to finish…")
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def ensure(self, *, rebuild: bool = False, refresh_mkosi: bool = False) -> None:
        """Fetch mkosi and build the tools tree if needed, then verify it."""
        with self._lock():
            start = time.monotonic()
            install = self.fetch_mkosi(refresh=refresh_mkosi)
            self.link_mkosi_into_venv(install)
            self.write_mkosi_wrapper(self.mkosi_wrapper, install, "/usr/bin/python3")
            sources = self._write_sources()
            digest = self._inputs_hash(install, sources)
            stamp = self._stamp()
            if rebuild or stamp.get("inputs") != digest or not self._tree_present():
                why = "forced" if rebuild else ("inputs changed" if stamp else "not built yet")
                self._build(install, why)
                stamp = {
                    "inputs": digest,
                    "mkosi": install.version,
                    "built_s": round(time.monotonic() - start),
                    "built_at": time.time(),
                }
                self._write_stamp(stamp)
            self._link_tree()
            if not stamp.get("verified"):
                _say("verifying the tools tree")
                stamp["verified"] = self.verify()
                self._write_stamp(stamp)
                _say(f"tools tree ready at {self.tree} ({time.monotonic() - start:.0f} s)")
            else:
                _say(f"tools tree up to date ({self.tree})")

    def _write_stamp(self, stamp: dict[str, Any]) -> None:
        tmp = self.stamp_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stamp, indent=2) + "\n")
        tmp.replace(self.stamp_file)

    def _build(self, install: MkosiInstall, why: str) -> None:
        _say(f"building the tools tree with mkosi {install.version} ({why}); takes minutes")
        start = time.monotonic()
        self.stamp_file.unlink(missing_ok=True)
        # Dropping the tree makes mkosi rebuild it: its own manifest ignores the apt pin.
        for stale in (self.tree, self.tools_dir / f"{self.tree.name}.manifest"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        self.tools_dir.mkdir(parents=True, exist_ok=True)
        self.package_cache.mkdir(parents=True, exist_ok=True)
        # "--force sandbox": mkosi builds the default tools tree if it is out of date.
        argv = self.mkosi_argv("--force", *self._sandbox_verb(), "true")
        result = subprocess.run(argv, check=False)
        if result.returncode != 0 or not self._tree_present():
            raise ToolchainError(
                f"mkosi failed to build the tools tree (exit {result.returncode}); "
                f"see its output above. Command: {' '.join(argv)}"
            )
        _say(f"tools tree built in {time.monotonic() - start:.0f} s")

    # ---- running things inside the tree ------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """An argv that runs ``argv`` inside the tools tree (via ``mkosi sandbox``).

        The program keeps the caller's working directory and shares /tmp,
        /dev/shm, /dev/kvm, /dev/net/tun and the PID namespace with the host.
        """
        self.require_built()
        return self._command(argv)

    def _require_tree(self) -> None:
        # Weaker than require_built(): used while ensure() verifies a fresh tree.
        if not self._tree_present():
            raise ToolchainMissing(f"the tools tree is not built at {self.tree}: {ENSURE_HINT}")

    def _command(self, argv: Sequence[str]) -> list[str]:
        self._require_tree()
        if "--" in argv:
            # mkosi reads "sandbox -- CMD ARGS…" with argparse, which (Python 3.11
            # here) also drops the first "--" of ARGS: "dpdk-testpmd EAL -- APP"
            # would reach testpmd as one option list. One shell word hides it.
            argv = ["/bin/sh", "-c", f"exec {shlex.join(argv)}"]
        inner = ["/usr/bin/env", "-u", "PYTHONPATH", f"PATH={SANDBOX_PATH}", *argv]
        if self.mkosi().major < 26:
            # mkosi 25 runs from the repository (see mkosi_argv): back to the caller's cwd.
            inner = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', os.getcwd(), *inner]
        return [*self.mkosi_argv(*self._sandbox_verb()), *inner]

    def _sandbox_verb(self) -> list[str]:
        # mkosi 25 hands a "--" after the verb on to the command line it runs.
        return ["sandbox"] if self.mkosi().major < 26 else ["sandbox", "--"]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 300, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the tools tree, capturing text output."""
        cmd = self._command(argv)
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=timeout, **kw
            )
        except subprocess.TimeoutExpired as e:
            raise ToolchainError(
                f"{' '.join(argv)} timed out after {timeout} s in the tools tree"
            ) from e
        if check and result.returncode != 0:
            raise ToolchainError(
                f"{' '.join(argv)} failed in the tools tree (exit {result.returncode}):\n"
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def qemu_version(self) -> tuple[int, int, int]:
        """QEMU's version, e.g. ``(11, 1, 3)``."""
        if self._qemu_version is None:
            out = self.run(["qemu-system-x86_64", "--version"]).stdout
            m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
            if not m:
                raise ToolchainError(f"cannot parse QEMU version from: {out!r}")
            self._qemu_version = (int(m[1]), int(m[2]), int(m[3]))
        return self._qemu_version

    # ---- files inside the tree ------------------------------------------------

    def kernel_version(self) -> str:
        """The consumer kernel's version (newest under usr/lib/modules)."""
        self._require_tree()
        found = [
            p.name
            for p in (self.tree / "usr/lib/modules").glob("*")
            if (p / "modules.dep").exists()
        ]
        if not found:
            raise ToolchainMissing(
                f"no kernel in {self.tree}: add linux-image-cloud-amd64, {ENSURE_HINT}"
            )
        return max(found, key=_version_tuple)

    def path(self, name: str) -> Path:
        """A file in the tools tree as seen from the host.

        ``name`` is one of :data:`PATH_NAMES` (``kernel``, ``modules``,
        ``busybox``, ``ovmf-code``, ``ovmf-vars``, ``seabios``, ``root``) or a
        path relative to the tree's root (``usr/bin/qemu-img``).
        """
        self._require_tree()
        if name == "root":
            return self.tree
        if name in ("kernel", "modules"):
            # mkosi puts every kernel image at usr/lib/modules/KVER/vmlinuz.
            modules = self.tree / "usr/lib/modules" / self.kernel_version()
            return modules / "vmlinuz" if name == "kernel" else modules
        rel = PATH_NAMES.get(name, name)
        path = self.tree / rel.lstrip("/")
        if not path.exists():
            known = ", ".join(["root", "kernel", "modules", *PATH_NAMES])
            raise ToolchainMissing(
                f"{name!r} is not in the tools tree ({path}); known names: {known}. "
                "Is its package in mkosi.conf's ToolsTreePackages=? Then " + ENSURE_HINT
            )
        return path

    # ---- checks ------------------------------------------------------------

    _PROBE = r"""
set -u
echo "qemu=$(qemu-system-x86_64 --version | head -n1)"
yes_no() { if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }
echo "vfio_user=$(yes_no sh -c 'qemu-system-x86_64 -device help | grep -q "vfio-user-pci"')"
echo "blkio=$(yes_no sh -c 'qemu-img --help | grep -q virtio-blk-vhost-user')"
echo "qemu_img=$(qemu-img --version | head -n1)"
echo "qsd=$(qemu-storage-daemon --version 2>&1 | head -n1)"
echo "socat=$(socat -V 2>/dev/null | grep -m1 'socat version')"
echo "ip=$(ip -V 2>&1)"
echo "python3=$(python3 --version 2>&1)"
echo "unix_tmp=$(test -S "$1" && echo yes || echo no)"
echo "shm=$(cat "$2" 2>/dev/null)"
"""

    def verify(self) -> dict[str, str]:
        """Check the tree for real: QEMU version and devices, blkio driver,
        storage daemon, and that /tmp sockets and /dev/shm files are shared
        with the host. Raises :class:`ToolchainError` on the first failure."""
        import socket
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vvu-verify-") as tmp:
            sock_path = os.path.join(tmp, "probe.sock")
            shm = Path(f"/dev/shm/vvu-verify-{os.getpid()}")
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(sock_path)
                try:
                    shm.write_text("shared")
                    out = self.run(["/bin/sh", "-c", self._PROBE, "probe", sock_path, str(shm)])
                finally:
                    shm.unlink(missing_ok=True)
        report = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        qemu = _version_tuple(report.get("qemu", ""))
        problems = []
        if qemu < MIN_QEMU:
            problems.append(
                f"QEMU {report.get('qemu')!r} is older than {MIN_QEMU}: is the "
                "trixie-backports pin (toolchain/sandbox) in effect?"
            )
        if report.get("vfio_user") != "yes":
            problems.append("qemu-system-x86_64 has no -device vfio-user-pci")
        if report.get("blkio") != "yes":
            problems.append(
                "qemu-img lacks the virtio-blk-vhost-user (blkio) driver: qemu-block-extra"
            )
        if "version" not in report.get("qsd", ""):
            problems.append(f"qemu-storage-daemon does not run: {report.get('qsd')!r}")
        if report.get("unix_tmp") != "yes":
            problems.append("a UNIX socket in the host's /tmp is not visible inside the sandbox")
        if report.get("shm") != "shared":
            problems.append("a /dev/shm file of the host is not visible inside the sandbox")
        for p in ("kernel", "modules", "busybox", "ovmf-code", "seabios", "dpdk-testpmd",
                  "virtiofsd"):
            try:
                self.path(p)
            except ToolchainError as e:
                problems.append(str(e))
        if problems:
            raise ToolchainError("tools tree check failed:\n  " + "\n  ".join(problems))
        return report

    def packages(self) -> dict[str, str]:
        """Installed packages of the tools tree: name -> version (from its dpkg status)."""
        self._require_tree()
        versions: dict[str, str] = {}
        status = (self.tree / "var/lib/dpkg/status").read_text(errors="replace")
        for stanza in status.split("\n\n"):
            fields = dict(
                line.split(": ", 1)
                for line in stanza.splitlines()
                if ": " in line and line[0] != " "
            )
            if fields.get("Status", "").endswith(" installed") and "Package" in fields:
                versions[fields["Package"]] = fields.get("Version", "?")
        return versions

    def _accel_status(self) -> Component:
        # Written by vvu_runtime.launch.accel after its probe (the first VM start).
        try:
            data = json.loads((self.cache_dir / "accel-probe.json").read_text())
            return Component("accelerator", str(data["accel"]), str(data["reason"]))
        except (OSError, ValueError, KeyError):
            return Component("accelerator", "?", "probed when the first VM starts")

    def status(self) -> list[Component]:
        """What is there, with versions (missing parts have version None)."""
        comps: list[Component] = []
        try:
            install = self.mkosi()
            comps.append(Component("mkosi", install.version, str(install.root)))
        except ToolchainMissing:
            comps.append(Component("mkosi", None, f"{self.cache_dir}/mkosi ({ENSURE_HINT})"))
            return comps
        if not self.is_built():
            comps.append(Component("tools tree", None, f"{self.tree} ({ENSURE_HINT})"))
            return comps
        stamp = self._stamp()
        comps.append(
            Component("tools tree", f"built with mkosi {stamp.get('mkosi')}", str(self.tree))
        )
        report = stamp.get("verified") or {}
        qemu = ".".join(str(n) for n in _version_tuple(report.get("qemu", ""))) or None
        comps.append(Component("QEMU", qemu, "qemu-system-x86_64 in the tools tree"))
        for key, what in (("vfio_user", "-device vfio-user-pci"), ("blkio", "blkio driver")):
            ok = "yes" if report.get(key) == "yes" else None
            comps.append(Component(what, ok, "checked by vvu-toolchain ensure"))
        comps.append(self._accel_status())
        versions = self.packages()
        for pkg in STATUS_PACKAGES:
            comps.append(Component(pkg, versions.get(pkg) or None, "tools tree package"))
        for name in ("kernel", "modules", "busybox", "ovmf-code", "ovmf-vars", "seabios"):
            try:
                comps.append(Component(name, "-", str(self.path(name))))
            except ToolchainError:
                comps.append(Component(name, None, "missing"))
        return comps


#: Named files inside the tools tree (see :meth:`Toolchain.path`).
PATH_NAMES: dict[str, str] = {
    "busybox": "usr/bin/busybox",
    "ovmf-code": "usr/share/OVMF/OVMF_CODE_4M.fd",
    "ovmf-vars": "usr/share/OVMF/OVMF_VARS_4M.fd",
    "seabios": "usr/share/seabios/bios-256k.bin",
    "qemu-system-x86_64": "usr/bin/qemu-system-x86_64",
    "qemu-img": "usr/bin/qemu-img",
    "qemu-storage-daemon": "usr/bin/qemu-storage-daemon",
    # The switch benchmark's peer (package dpdk-dev).
    "dpdk-testpmd": "usr/bin/dpdk-testpmd",
    # The fs benchmark's host-mode peer (Debian installs it outside PATH).
    "virtiofsd": "usr/libexec/virtiofsd",
}

STATUS_PACKAGES = (
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-utils",
    "qemu-block-extra",
    "libblkio1",
    "ovmf",
    "seabios",
    "linux-image-cloud-amd64",
    "busybox-static",
    "dpdk-dev",
    "virtiofsd",
    "socat",
    "iproute2",
    "python3",
)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _print_table(rows: Sequence[Component]) -> None:
    w0 = max(len(r.name) for r in rows)
    w1 = max(len(r.version or "MISSING") for r in rows)
    for r in rows:
        print(f"{r.name:<{w0}}  {r.version or 'MISSING':<{w1}}  {r.where}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vvu-toolchain",
        description="Fetch mkosi and build/use vvu's tools tree (QEMU, firmware, kernel).",
        epilog=f"Cache: $VVU_CACHE_DIR (default {DEFAULT_CACHE_DIR}).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_ensure = sub.add_parser("ensure", help="fetch mkosi, build the tools tree if needed, verify")
    p_ensure.add_argument("--rebuild", action="store_true", help="rebuild the tools tree")
    p_ensure.add_argument("--refresh-mkosi", action="store_true", help="fetch mkosi again")
    sub.add_parser("status", help="show components, versions and where they are")
    p_run = sub.add_parser("run", help="run a command inside the tools tree: run -- CMD …")
    p_run.add_argument("command", nargs=argparse.REMAINDER)
    p_path = sub.add_parser("path", help="print the host path of a file in the tools tree")
    p_path.add_argument("name", help="kernel, modules, busybox, ovmf-code, … or a relative path")
    sub.add_parser("mkosi", help="print the mkosi command line vvu uses (for appliance builds)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a running mkosi build is stopped with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_main(lambda: _command(args, parser), program="vvu-toolchain")


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    tc = Toolchain()
    if args.cmd == "ensure":
        tc.ensure(rebuild=args.rebuild, refresh_mkosi=args.refresh_mkosi)
    elif args.cmd == "status":
        rows = tc.status()
        _print_table(rows)
        return 0 if all(r.ok for r in rows) else 1
    elif args.cmd == "run":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not cmd:
            parser.error("run needs a command: vvu-toolchain run -- CMD …")
        full = tc.command(cmd)
        sys.stdout.flush()
        os.execv(full[0], full)
    elif args.cmd == "path":
        print(tc.path(args.name))
    elif args.cmd == "mkosi":
        print(shlex.join(tc.mkosi_argv()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
