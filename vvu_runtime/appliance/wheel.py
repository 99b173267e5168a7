"""The appliance's runtime as a wheel: built from the checkout during the mkosi build.

    python3 -m vvu_runtime.appliance.wheel build SRC OUTDIR    (OUTDIR/vvu_runtime-V-*.whl)
    python3 -m vvu_runtime.appliance.wheel install WHEEL ROOT  (ROOT/usr/lib/python3/dist-packages)
    python3 -m vvu_runtime.appliance.wheel digest SRC          (the source digest)

The wheel (PEP 427) holds the guest side of ``vvu_runtime`` only: not the
host-only parts (:data:`HOST_ONLY`: the launcher and the device model, and the
driver's in-process test double that needs the device model), with the
project's name and version from ``pyproject.toml``, a ``RECORD``, the guest
console scripts in ``entry_points.txt``, and ``vvu-source.json``: the *source
digest*, a sha256 over the shipped files (path and content, sorted), which
:func:`source_digest` computes the same way from a checkout, so a test or the
launcher can tell whether an appliance runs the checkout's code
(``vvu-appliance-info``).

Standard library only: it runs in the image (mkosi.postinst.chroot), where
there is neither pip nor setuptools.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import json
import os
import sys
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "DIST_NAME",
    "HOST_ONLY",
    "SITE_PACKAGES",
    "build_wheel",
    "guest_scripts",
    "install_wheel",
    "project_version",
    "shipped_files",
    "source_digest",
]

DIST_NAME = "vvu-runtime"
#: Parts of vvu_runtime that stay on the host (relative to the package directory).
HOST_ONLY = ("launch/", "device/")
#: Where Debian's python3 finds system packages.
SITE_PACKAGES = "usr/lib/python3/dist-packages"
GENERATOR = "vvu-appliance-wheel 1"


def _host_only(rel: str) -> bool:
    return any(rel == h or (h.endswith("/") and rel.startswith(h)) for h in HOST_ONLY)


def shipped_files(package_dir: Path) -> Iterator[tuple[str, Path]]:
    """``(path relative to the package, file)`` of every file the appliance gets, sorted.

    Compiled extensions (``.so``) are not sources: the host's were built for the
    host's Python, and an image builds its own from the ``.c`` files. Leaving them
    out also keeps the digest of a checkout and of an installed tree comparable.
    """
    for p in sorted(package_dir.rglob("*")):
        rel = p.relative_to(package_dir).as_posix()
        if (not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo", ".so")
                or _host_only(rel)):
            continue
        yield rel, p


def source_digest(package_dir: Path) -> str:
    """sha256 over the shipped files of ``package_dir`` (a checkout's or an installed one)."""
    h = hashlib.sha256()
    for rel, p in shipped_files(package_dir):
        data = p.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def _project(src: Path) -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    return project


def project_version(src: Path) -> str:
    return str(_project(src)["version"])


def guest_scripts(src: Path) -> dict[str, str]:
    """The console scripts of the project whose target ships in the appliance."""
    scripts = _project(src).get("scripts") or {}
    assert isinstance(scripts, dict)
    out = {}
    for name, target in sorted(scripts.items()):
        module = str(target).partition(":")[0]
        rel = module.removeprefix("vvu_runtime.").replace(".", "/")
        if module.startswith("vvu_runtime.") and not _host_only(rel + "/") \
                and not _host_only(rel + ".py"):
            out[name] = str(target)
    return out


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_wheel(src: Path, outdir: Path) -> Path:
    """Build the guest wheel from checkout ``src`` into ``outdir``; returns its path."""
    version = project_version(src)
    dist = f"{DIST_NAME.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    package = src / "vvu_runtime"
    files: list[tuple[str, bytes]] = [
        (f"vvu_runtime/{rel}", p.read_bytes()) for rel, p in shipped_files(package)
    ]
    scripts = guest_scripts(src)
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {DIST_NAME}\n"
        f"Version: {version}\n"
        "Summary: vvu runtime, the guest side (backends, VVU driver, appliance services)\n"
        "Requires-Python: >=3.11\n"
    )
    entry_points = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
    source = {"name": DIST_NAME, "version": version, "digest": source_digest(package),
              "host_only": list(HOST_ONLY)}
    files += [
        (f"{info}/METADATA", metadata.encode()),
        (f"{info}/WHEEL", (f"Wheel-Version: 1.0\nGenerator: {GENERATOR}\n"
                           "Root-Is-Purelib: true\nTag: py3-none-any\n").encode()),
        (f"{info}/entry_points.txt", entry_points.encode()),
        (f"{info}/vvu-source.json", (json.dumps(source, indent=2) + "\n").encode()),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files)
    record += f"{info}/RECORD,,\n"
    outdir.mkdir(parents=True, exist_ok=True)
    wheel = outdir / f"{dist}-py3-none-any.whl"
    tmp = wheel.with_suffix(".tmp")
    # Fixed timestamps: the same sources give the same wheel.
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in [*files, (f"{info}/RECORD", record.encode())]:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    tmp.replace(wheel)
    return wheel


def install_wheel(wheel: Path, root: Path) -> list[str]:
    """Install ``wheel`` under ``root`` (``/`` in the image): the package and its
    dist-info in :data:`SITE_PACKAGES`, console scripts in ``/usr/bin``. Returns the
    installed scripts. The RECORD is rewritten with the scripts, INSTALLER added."""
    site = root / SITE_PACKAGES
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (info,) = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        for n in names:
            if n.endswith("/") or n.startswith("/") or ".." in n.split("/"):
                continue
            dest = site / n
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(n))
            dest.chmod(0o644)
        eps = configparser.ConfigParser(delimiters=("=",))
        eps.optionxform = str  # type: ignore[assignment,method-assign]
        eps.read_string(z.read(f"{info}/entry_points.txt").decode())
    record = (site / info / "RECORD").read_text().splitlines()
    record = [r for r in record if not r.startswith(f"{info}/RECORD,")]
    scripts = []
    bindir = root / "usr/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    console = eps["console_scripts"] if eps.has_section("console_scripts") else {}
    for name, target in console.items():
        module, _, func = target.strip().partition(":")
        body = (f"#!/usr/bin/python3\n# {name}: console script of {DIST_NAME} (wheel)\n"
                f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n").encode()
        path = bindir / name
        path.write_bytes(body)
        path.chmod(0o755)
        rel = os.path.relpath(path, site)
        record.append(f"{rel},{_record_hash(body)},{len(body)}")
        scripts.append(name)
    installer = b"vvu-appliance-wheel\n"
    (site / info / "INSTALLER").write_bytes(installer)
    record.append(f"{info}/INSTALLER,{_record_hash(installer)},{len(installer)}")
    record.append(f"{info}/RECORD,,")
    (site / info / "RECORD").write_text("\n".join(record) + "\n")
    return scripts


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "build":
        print(build_wheel(Path(args[1]), Path(args[2])))
    elif len(args) == 3 and args[0] == "install":
        scripts = install_wheel(Path(args[1]), Path(args[2]))
        print(f"installed {Path(args[1]).name}; scripts: {', '.join(scripts)}")
    elif len(args) == 2 and args[0] == "digest":
        print(source_digest(Path(args[1]) / "vvu_runtime"))
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
