"""``cipdplugin check``: the command line for legacy tooling."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("cipdplugin: the command line is not built yet", file=sys.stderr)
    return 2
