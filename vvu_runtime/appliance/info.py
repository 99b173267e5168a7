"""``vvu-appliance-info``: what this appliance runs.

    vvu-appliance-info          vvu-runtime 0.1.0 sha256:1f2e... (verified) vvu-vswitch
    vvu-appliance-info --json   {"name": "vvu-runtime", "version": "0.1.0", "digest": ...,
                                 "installed_digest": ..., "verified": true, "image": ...}

``digest`` is the source digest recorded in the wheel when it was built from
the checkout (:func:`vvu_runtime.appliance.wheel.source_digest`);
``installed_digest`` is computed again from the installed files, so
``verified`` says nobody changed them since. ``image`` comes from
``/etc/os-release`` (``IMAGE_ID``/``IMAGE_VERSION``, written by mkosi).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from vvu_runtime.appliance.wheel import DIST_NAME, source_digest

__all__ = ["info", "main"]


def _os_release() -> dict[str, str]:
    out = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key] = value.strip().strip('"')
    except OSError:
        pass
    return out


def info() -> dict[str, Any]:
    try:
        dist = metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError:
        return {"name": DIST_NAME, "version": None, "digest": None, "verified": False,
                "error": f"{DIST_NAME} is not installed as a package"}
    recorded = json.loads(dist.read_text("vvu-source.json") or "{}")
    import vvu_runtime

    package = Path(vvu_runtime.__file__).parent
    installed = source_digest(package)
    osr = _os_release()
    return {
        "name": DIST_NAME,
        "version": dist.version,
        "digest": recorded.get("digest"),
        "installed_digest": installed,
        "verified": installed == recorded.get("digest"),
        "location": str(package),
        "image": osr.get("IMAGE_ID"),
        "image_version": osr.get("IMAGE_VERSION"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vvu-appliance-info", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        state = "verified" if data["verified"] else "MODIFIED or not installed"
        print(f"{data['name']} {data['version']} sha256:{data['digest']} ({state})"
              f" {data.get('image') or ''}".rstrip())
    return 0 if data["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
