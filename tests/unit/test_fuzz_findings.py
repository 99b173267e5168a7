"""Regression tests for what the fuzz harnesses found (docs/fuzzing.md, "Findings").

Each test replays the shape of one finding against the code that was fixed.
"""

from __future__ import annotations

import struct

import pytest

from vvu_runtime.device.errors import MessageError
from vvu_runtime.device.vfio_user.protocol import Version


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,                       # nesting past the recursion limit
    b'{"capabilities":{"x":' + b"9" * 100_000 + b"}}",      # past int's digit limit
], ids=["deep-nesting", "huge-number"])
def test_version_json_that_python_cannot_parse_is_a_parse_error(body: bytes) -> None:
    # Found by the vfio-user harness: these raised RecursionError / ValueError out of
    # Version.unpack, which the server logged as an internal error (answered EIO).
    with pytest.raises(MessageError, match="capability JSON does not parse"):
        Version.unpack(struct.pack("<HH", 0, 0) + body + b"\0")
