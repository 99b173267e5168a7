"""vvu-blk and vvu-switch with ``--vvu``: option parsing, a clean error for a function
that is not there, and vvu-blk's main() serving a consumer through the VVU chain
(the PCI function opened by address is swapped for the vfio-user test double)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.support.vvu_chain import SECTORS, DeviceModel, FileRam, connect_blk
from vvu_runtime.driver import endpoint as endpoint_mod
from vvu_runtime.driver.pci import PciFunction
from vvu_runtime.serve import blk as blk_cli
from vvu_runtime.serve import switch as switch_cli
from vvu_runtime.virtio.blk import RequestType, Status


def test_blk_options() -> None:
    args = blk_cli.parse_args(["--vvu", "0000:00:05.0", "--image", "i"])
    assert (args.vvu, args.vvu_access, args.socket) == ("0000:00:05.0", "auto", None)
    args = blk_cli.parse_args(["--vvu", "00:05.0", "--vvu-access", "sysfs", "--image", "i"])
    assert args.vvu_access == "sysfs"
    for bad in (["--vvu", "00:05.0", "--socket", "s"], ["--vvu", "00:05.0", "--connect"],
                ["--vvu-access", "magic", "--vvu", "x"]):
        with pytest.raises(SystemExit) as exc:
            blk_cli.parse_args([*bad, "--image", "i"])
        assert exc.value.code == 2


def test_switch_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = switch_cli.build_parser()
    args = parser.parse_args(["--vvu", "vm1=0000:00:05.0", "--port", "vm2=/tmp/s"])
    assert [(s.name, s.vvu) for s in args.vvu] == [("vm1", "0000:00:05.0")]
    for bad, why in ((["--vvu", "a=00:05.0", "--port", "a=/tmp/s"], "used twice"),
                     (["--vvu", "a=00:05.0", "--vvu", "b=00:05.0"], "same VVU function"),
                     ([], "--vvu NAME=PCI_ADDRESS")):
        with pytest.raises(SystemExit) as exc:
            switch_cli.main(bad)
        assert exc.value.code == 2
        assert why in capsys.readouterr().err


def test_missing_function_is_a_clean_runtime_error(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(4096))
    code = blk_cli.main(["--vvu", "0000:7f:1f.7", "--image", str(image)])
    assert code == 1
    assert "VVU device 0000:7f:1f.7" in caplog.text and "no such PCI function" in caplog.text


def test_vvu_blk_main_serves_a_consumer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SECTORS * 512))
    model = DeviceModel(tmp_path, "disk0")
    opened: list[tuple[str, str]] = []

    def open_function(address: str, access: str) -> PciFunction:
        opened.append((address, access))
        return model.pci

    monkeypatch.setattr(endpoint_mod, "open_function", open_function)
    # A SIGTERM that arrives before vvu-blk's loop handles it must not end pytest.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    done = threading.Event()
    outcome: dict[str, object] = {}

    def consumer() -> None:
        try:
            ram = FileRam(model.ram_path)
            fe, drv = connect_blk(model, ram)
            data = os.urandom(8192)
            outcome["write"] = drv.run(RequestType.OUT, 16, out=data)
            outcome["read"] = drv.run(RequestType.IN, 16, into=8192) == (Status.OK, data)
            drv.dq.close()
            fe.close()
            ram.close()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            while not done.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)

    thread = threading.Thread(target=consumer)
    thread.start()
    try:
        code = blk_cli.main(["--vvu", "0000:00:05.0", "--vvu-access", "vfio",
                             "--image", str(image), "--log-level", "WARNING"])
    finally:
        done.set()
        thread.join(10)
        signal.signal(signal.SIGTERM, previous)
        model.close()
    assert "error" not in outcome, outcome
    assert code == 0
    assert opened == [("0000:00:05.0", "vfio")]
    assert outcome == {"write": (Status.OK, b""), "read": True}
    assert image.read_bytes()[16 * 512:16 * 512 + 8] != bytes(8)
