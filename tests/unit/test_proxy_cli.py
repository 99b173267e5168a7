"""``vvu-proxy``'s command line: what it accepts and how it refuses the rest."""

from __future__ import annotations

import pytest

from vvu_runtime.proxy import cli


def test_links_execs_and_mode_are_parsed() -> None:
    args = cli.parse_args(["--link", "00:05.0=/run/vvu/disk0.sock",
                           "--link", "0000:00:06.0=/run/vvu/fs.sock",
                           "--exec", "00:06.0=virtiofsd --socket-path /run/vvu/fs.sock "
                                     "--shared-dir '/srv/my export'",
                           "--listen", "--access", "sysfs"])
    assert args.link == [("0000:00:05.0", "/run/vvu/disk0.sock"),
                         ("0000:00:06.0", "/run/vvu/fs.sock")]
    assert args.commands == [("0000:00:06.0", "virtiofsd --socket-path /run/vvu/fs.sock "
                                              "--shared-dir '/srv/my export'")]
    assert args.listen and args.access == "sysfs"


@pytest.mark.parametrize("argv, says", [
    ([], "--link"),
    (["--link", "/run/x.sock"], "expected PCI_ADDRESS=VALUE"),
    (["--link", "zz:05.0=/run/x.sock"], "is not a PCI address"),
    (["--link", "00:05.0=/a.sock", "--link", "0000:00:05.0=/b.sock"],
     "given to --link twice"),
    (["--link", "00:05.0=/a.sock", "--exec", "00:06.0=qemu-storage-daemon"],
     "--exec for 0000:00:06.0, which no --link names"),
])
def test_usage_errors_say_what_is_wrong(argv: list[str], says: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = int(exc.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert "vvu-proxy: error:" in err and says in err, err
