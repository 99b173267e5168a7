"""BlkDevice.serve with its compiled fast path (``_serve_c.c``) against the reference.

Each request runs twice, on fresh copies of the same image and the same guest
buffers: once with ``_serve_fast`` off (the pure-Python serve(), the
reference) and once with the compiled one. Return value or exception, every
guest buffer and the image afterwards must be identical.
"""

from __future__ import annotations

import os
import shutil
import struct
import sysconfig
from pathlib import Path

import pytest

from vvu_runtime.backends.blk import device as device_mod
from vvu_runtime.backends.blk.device import BlkDevice
from vvu_runtime.backends.blk.image import RawImage
from vvu_runtime.virtio.blk import RequestType
from vvu_runtime.virtio.queue import DescriptorChain

SECTORS = 64
IN, OUT = int(RequestType.IN), int(RequestType.OUT)

#: A request: (readable buffer sizes or bytes, writable buffer sizes); the header
#: goes into the first readable bytes unless a buffer is given as bytes.
Spec = tuple[list[int | bytes], list[int]]


def header(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def compiled_serve() -> device_mod.ServeFast:
    fast = device_mod._compiled_serve_fast
    if fast is None:
        cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
        if shutil.which(cc) and Path(sysconfig.get_paths()["include"], "Python.h").exists():
            pytest.fail("a C compiler is here but the blk fast path is not built: run ./setup "
                        "(a worktree: python -m vvu_runtime.virtio.accel build)",
                        pytrace=False)
        why = "host capability missing: C compiler or Python headers (blk fast path not built)"
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must not skip)", pytrace=False)
        pytest.skip(why)
    return fast


def chain_of(spec: Spec) -> DescriptorChain:
    readable: list[memoryview] = []
    for k, r in enumerate(spec[0]):
        data = r if isinstance(r, bytes) else bytes((k * 37 + i) & 0xFF for i in range(r))
        readable.append(memoryview(bytearray(data)))
    writable = [memoryview(bytearray(b"\xee" * n)) for n in spec[1]]
    return DescriptorChain(0, readable, writable, [0] * len(writable), 1)


def serve(tmp: Path, spec: Spec, fast: device_mod.ServeFast | None, *, read_only: bool = False,
          direct: bool = False, bounce: bool = False, shrink_to: int | None = None) -> object:
    path = tmp / f"disk-{fast is not None}.raw"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    chain = chain_of(spec)
    with RawImage(str(path), read_only=read_only, direct=direct or bounce) as image:
        if bounce:  # as in an appliance: O_DIRECT cannot pin guest memory (BAR2)
            image._pinnable = False
        if shrink_to is not None:  # the file shrank under us: short reads and writes
            os.truncate(path, shrink_to)
        dev = BlkDevice(image, serial="s")
        dev.set_features(dev.features())
        dev._serve_fast = fast
        try:
            outcome: object = dev.serve(chain)
        except Exception as exc:
            outcome = (type(exc), str(exc))
    return (outcome, [bytes(w) for w in chain.writable], [bytes(r) for r in chain.readable],
            path.read_bytes())


H_IN0 = header(IN, 0)
SPECS: dict[str, Spec] = {
    "IN 4 KiB": ([H_IN0], [4096, 1]),
    "IN at the last sector": ([header(IN, SECTORS - 1)], [512, 1]),
    "IN in three segments": ([header(IN, 3)], [512, 1024, 2048, 1]),
    "IN with zero-length segments": ([header(IN, 3)], [0, 512, 0, 1]),
    "IN past the end": ([header(IN, SECTORS - 1)], [1024, 1]),
    "IN far past the end": ([header(IN, 1 << 60)], [512, 1]),
    "IN at sector 2^64-1": ([header(IN, (1 << 64) - 1)], [512, 1]),
    "IN at sector 2^55": ([header(IN, 1 << 55)], [512, 1]),
    "IN of part of a sector": ([H_IN0], [1000, 1]),
    "IN of nothing": ([H_IN0], [1]),
    "IN with device-readable data": ([H_IN0, 512], [512, 1]),
    "IN with a 24-byte header buffer": ([H_IN0 + bytes(8)], [512, 1]),
    "IN with the header split": ([H_IN0[:8], H_IN0[8:]], [512, 1]),
    "IN with a short header": ([H_IN0[:12]], [512, 1]),
    "IN with status in a 2-byte buffer": ([H_IN0], [512, 2]),
    "IN with status then an empty buffer": ([H_IN0], [512, 1, 0]),
    "IN with 300 segments": ([H_IN0], [512] * 60 + [0] * 240 + [1]),
    "OUT 4 KiB": ([header(OUT, 8), 4096], [1]),
    "OUT in segments": ([header(OUT, 8), 512, 1536], [1]),
    "OUT with data after the header in one buffer": ([header(OUT, 8) + bytes(512)], [1]),
    "OUT past the end": ([header(OUT, SECTORS), 512], [1]),
    "OUT of part of a sector": ([header(OUT, 0), 100], [1]),
    "OUT with device-writable data": ([header(OUT, 0), 512], [512, 1]),
    "OUT of nothing": ([header(OUT, 0)], [1]),
    "FLUSH": ([header(4, 0)], [1]),
    "GET_ID": ([header(8, 0)], [20, 1]),
    "unknown type": ([header(99, 0)], [512, 1]),
    "no writable buffer": ([H_IN0], []),
    "no readable buffer": ([], [512, 1]),
    "only empty writable buffers": ([H_IN0], [0, 0]),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("mode", ["rw", "ro", "direct", "bounce", "bounce-ro"])
def test_same_outcome_as_the_reference(tmp_path: Path, name: str, mode: str) -> None:
    fast = compiled_serve()
    kw = {"read_only": mode.endswith("ro"), "direct": mode == "direct",
          "bounce": mode.startswith("bounce")}
    reference = serve(tmp_path, SPECS[name], None, **kw)
    assert serve(tmp_path, SPECS[name], fast, **kw) == reference


@pytest.mark.parametrize("name", ["IN 4 KiB", "IN at the last sector", "IN in three segments",
                                  "OUT 4 KiB", "OUT in segments"])
@pytest.mark.parametrize("bounce", [False, True])
def test_short_transfers_go_to_the_reference(tmp_path: Path, name: str, bounce: bool) -> None:
    """A short preadv (the image file shrank) is not served by the compiled path;
    serve() then does what it does without it."""
    fast = compiled_serve()
    shrink = 8192 if bounce else 4096 + 100  # O_DIRECT: the file keeps whole blocks
    reference = serve(tmp_path, SPECS[name], None, bounce=bounce, shrink_to=shrink)
    assert serve(tmp_path, SPECS[name], fast, bounce=bounce, shrink_to=shrink) == reference


def test_fast_path_does_the_io_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a compiled path that never serves (the comparison above would then
    pass trivially): a plain 4 KiB read or write never reaches Python's preadv/pwritev."""
    fast = compiled_serve()
    calls: list[str] = []
    monkeypatch.setattr(device_mod, "_preadv", lambda *a: calls.append("preadv") or os.preadv(*a))
    monkeypatch.setattr(device_mod, "_pwritev",
                        lambda *a: calls.append("pwritev") or os.pwritev(*a))
    for spec in (SPECS["IN 4 KiB"], SPECS["OUT 4 KiB"]):
        outcome = serve(tmp_path, spec, fast)
        assert outcome == serve(tmp_path, spec, None)
    assert calls == ["preadv", "pwritev"]  # the reference's calls only


def test_fast_path_bounces_the_io_itself(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The same guard for O_DIRECT into unpinnable memory (an appliance): an aligned
    4 KiB read or write never reaches RawImage's Python bounce path."""
    fast = compiled_serve()
    calls: list[str] = []
    for name in ("_bounce_read", "_bounce_write"):
        original = getattr(RawImage, name)

        def record(self: RawImage, *a: object, _o: object = original, _n: str = name) -> None:
            calls.append(_n)
            _o(self, *a)  # type: ignore[operator]

        monkeypatch.setattr(RawImage, name, record)
    for spec in (SPECS["IN 4 KiB"], SPECS["OUT 4 KiB"]):
        outcome = serve(tmp_path, spec, fast, bounce=True)
        assert outcome == serve(tmp_path, spec, None, bounce=True)
    assert calls == ["_bounce_read", "_bounce_write"]  # the reference's calls only
