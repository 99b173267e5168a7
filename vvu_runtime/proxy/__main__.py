"""``python3 -m vvu_runtime.proxy``: the ``vvu-proxy`` command."""

from __future__ import annotations

import sys

from vvu_runtime.proxy.cli import main

sys.exit(main())
