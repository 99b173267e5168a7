"""The consumer initramfs builder: cpio newc format, module resolution, caching."""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import time
from pathlib import Path

import pytest

from vvu_runtime.launch.initramfs import (
    CACHE_MAX_AGE_S,
    CpioEntry,
    CpioFormatError,
    InitramfsError,
    KernelModules,
    build_consumer_initramfs,
    consumer_init_script,
    read_cpio,
    write_cpio,
)
from vvu_runtime.launch.toolchain import Toolchain


def test_cpio_round_trip_keeps_names_modes_and_content() -> None:
    entries = [
        CpioEntry.directory("bin"),
        CpioEntry.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
        CpioEntry.file("empty", b""),
        CpioEntry.file("odd", b"abc"),  # forces body padding
        CpioEntry.symlink("bin/sh", "/bin/busybox"),
        CpioEntry.char_device("console", 5, 1),
        CpioEntry.directory("a/b", 0o700),
    ]
    parsed = read_cpio(write_cpio(entries))
    assert [e.name for e in parsed] == [e.name for e in entries]
    for want, got in zip(entries, parsed, strict=True):
        assert got.mode == want.mode
        assert got.data == want.data
        assert got.rdev == want.rdev
    assert stat.S_ISLNK(parsed[4].mode) and parsed[4].data == b"/bin/busybox"
    assert stat.S_IMODE(parsed[1].mode) == 0o755


def test_cpio_layout_is_newc_with_trailer_and_4_byte_alignment() -> None:
    blob = write_cpio([CpioEntry.file("x", b"12345")])
    assert blob.startswith(b"070701")
    assert len(blob) % 4 == 0
    assert b"TRAILER!!!\0" in blob


def test_cpio_is_readable_by_gnu_cpio(toolchain: Toolchain, tmp_path: Path) -> None:
    # An independent reader (GNU cpio from the tools tree) agrees with our writer.
    archive = tmp_path / "test.cpio"
    archive.write_bytes(
        write_cpio([CpioEntry.directory("d"), CpioEntry.file("d/f", b"content\n", 0o640)])
    )
    out = toolchain.run(["sh", "-c", 'cpio -t -v < "$1"', "sh", str(archive)])
    listing = out.stdout
    assert "d/f" in listing and "-rw-r-----" in listing, listing


def test_cpio_rejects_garbage_and_truncation() -> None:
    with pytest.raises(CpioFormatError):
        read_cpio(b"not a cpio archive at all" * 10)
    blob = write_cpio([CpioEntry.file("f", b"x" * 100)])
    with pytest.raises(CpioFormatError):
        read_cpio(blob[:150])


def test_cpio_rejects_absolute_names() -> None:
    with pytest.raises(InitramfsError):
        write_cpio([CpioEntry.file("/etc/passwd", b"")])


def _fake_kernel(tmp_path: Path) -> KernelModules:
    root = tmp_path / "lib/modules/6.12.0-test"
    (root / "kernel/drivers/net").mkdir(parents=True)
    (root / "kernel/net/core").mkdir(parents=True)
    (root / "kernel/drivers/block").mkdir(parents=True)
    (root / "kernel/drivers/net/virtio_net.ko.xz").write_bytes(lzma.compress(b"\x7fELF net"))
    (root / "kernel/drivers/net/net_failover.ko.xz").write_bytes(lzma.compress(b"\x7fELF nfo"))
    (root / "kernel/net/core/failover.ko").write_bytes(b"\x7fELF fo")
    (root / "kernel/drivers/block/virtio_blk.ko.gz").write_bytes(gzip.compress(b"\x7fELF blk"))
    (root / "modules.dep").write_text(
        "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz "
        "kernel/net/core/failover.ko\n"
        "kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/block/virtio_blk.ko.gz:\n"
    )
    (root / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    return KernelModules.find(tmp_path / "lib/modules")


def test_modules_resolve_dependencies_first_and_skip_builtins(tmp_path: Path) -> None:
    kernel = _fake_kernel(tmp_path)
    assert kernel.version == "6.12.0-test"
    order = kernel.resolve(["virtio_pci", "virtio-net", "virtio_blk", "failover"])
    assert order == [
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko.xz",
        "kernel/drivers/net/virtio_net.ko.xz",
        "kernel/drivers/block/virtio_blk.ko.gz",
    ]
    assert kernel.read_uncompressed(order[1]) == b"\x7fELF nfo"
    assert kernel.read_uncompressed(order[3]) == b"\x7fELF blk"


def test_missing_module_is_a_clear_error(tmp_path: Path) -> None:
    kernel = _fake_kernel(tmp_path)
    with pytest.raises(InitramfsError, match="no module 'vhost_vdpa'"):
        kernel.resolve(["vhost_vdpa"])


def test_init_script_loads_modules_in_order_and_reads_cmdline() -> None:
    script = consumer_init_script(["kernel/a/failover.ko", "kernel/b/virtio_net.ko.xz"])
    assert script.startswith("#!/bin/sh\n")
    assert "/lib/modules/failover.ko /lib/modules/virtio_net.ko" in script
    assert "vvu.ip=*" in script


def test_build_consumer_initramfs_contents_and_cache(tmp_path: Path) -> None:
    kernel = _fake_kernel(tmp_path)
    # A stand-in "busybox" that answers --list-full like the real one.
    busybox = tmp_path / "busybox"
    busybox.write_text("#!/bin/sh\necho bin/sh; echo sbin/insmod; echo usr/bin/env\n")
    busybox.chmod(0o755)
    cache = tmp_path / "cache"
    out = build_consumer_initramfs(
        busybox=busybox, kernel=kernel, cache_dir=cache, modules=["virtio_net"]
    )
    assert out.name.startswith("consumer-6.12.0-test-") and out.name.endswith(".cpio.gz")
    members = {e.name: e for e in read_cpio(gzip.decompress(out.read_bytes()))}
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["bin/sh"].data == b"/bin/busybox"
    assert members["sbin/insmod"].data == b"/bin/busybox"
    assert "bin/env" in members
    assert members["lib/modules/virtio_net.ko"].data == b"\x7fELF net"
    assert members["lib/modules/failover.ko"].data == b"\x7fELF fo"
    assert members["dev/console"].rdev == (5, 1)
    # Parents come before children, as the kernel needs.
    names = list(members)
    assert names.index("lib") < names.index("lib/modules") < names.index("lib/modules/failover.ko")
    # Cached: same inputs, same file, not rewritten.
    mtime = out.stat().st_mtime_ns
    again = build_consumer_initramfs(
        busybox=busybox, kernel=kernel, cache_dir=cache, modules=["virtio_net"]
    )
    assert again == out and again.read_bytes() == out.read_bytes()
    assert again.stat().st_mtime_ns >= mtime
    # Different inputs, different file; the other one stays (another user may boot it)
    # until it has not been used for CACHE_MAX_AGE_S.
    other = build_consumer_initramfs(
        busybox=busybox, kernel=kernel, cache_dir=cache, modules=["virtio_blk"]
    )
    assert other != out and other.exists() and out.exists()
    old = time.time() - CACHE_MAX_AGE_S - 10
    os.utime(out, (old, old))
    build_consumer_initramfs(
        busybox=busybox, kernel=kernel, cache_dir=cache, modules=["virtio_blk"]
    )
    assert not out.exists() and other.exists()
    assert not list(cache.glob(".consumer-*"))
