#!/usr/bin/env python3
"""A small synchronous deployment script guarded by an admission plugin.

It reads the pins it wants to install, asks the plugin about all of them at
once (each check is a ``concurrent.futures.Future``), then "deploys" only
the admitted ones and prints a table. ``make demo`` runs it on the data in
this folder: the allowlist plugin, ``metadata.json`` and ``pins.txt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Run from a checkout without installing: make the package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cipdplugin import (
    DEFAULT_SERVICE_URL,
    AdmissionDenied,
    AdmissionError,
    Config,
    Host,
    Pin,
    StaticRepository,
)

HERE = Path(__file__).resolve().parent


def read_pins(path: Path) -> list[Pin]:
    """Pins from a text file, one ``package:instance_id`` a line (``#`` comments)."""
    pins = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        text = raw.split("#", 1)[0].strip()
        if text:
            pins.append(Pin.parse(text))
    return pins


def deploy(pin: Pin) -> str:
    """Stand-in for the real deployment step."""
    return "deployed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pins", type=Path, default=HERE / "pins.txt", help="pins to deploy")
    parser.add_argument("--metadata", type=Path, default=HERE / "metadata.json", help="instance metadata")
    parser.add_argument("--service-url", default=DEFAULT_SERVICE_URL)
    parser.add_argument("--verbose", "-v", action="store_true", help="show the plugin's log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="  log: %(message)s")

    pins = read_pins(args.pins)
    plugin_cmdline = [sys.executable, str(HERE / "allowlist_plugin.py")]
    print(f"Checking {len(pins)} pins with {Path(plugin_cmdline[1]).name} for {args.service_url}\n")

    rows: list[tuple[str, str, str, str]] = []
    with Host(Config(args.service_url, StaticRepository.from_file(args.metadata))) as host:
        plugin = host.new_admission_plugin(plugin_cmdline)
        checks = [(pin, plugin.check_admission(pin)) for pin in pins]
        for pin, check in checks:
            error = check.exception(timeout=60)
            if error is None:
                rows.append((pin.package, pin.instance_id, "admitted", deploy(pin)))
            elif isinstance(error, AdmissionDenied):
                rows.append((pin.package, pin.instance_id, "denied", error.message))
            elif isinstance(error, AdmissionError):
                rows.append((pin.package, pin.instance_id, "error", str(error)))
            else:
                rows.append((pin.package, pin.instance_id, "error", repr(error)))

    print_table(("PACKAGE", "INSTANCE", "VERDICT", "RESULT"), rows)
    verdicts = [row[2] for row in rows]
    print(
        f"\nDeployed {verdicts.count('admitted')} of {len(rows)} pins; "
        f"{verdicts.count('denied')} denied, {verdicts.count('error')} failed to check."
    )
    # As `cipdplugin check`: 3 when a check failed (a denial is the plugin's
    # answer, and the demo expects some).
    return 3 if "error" in verdicts else 0


def print_table(header: tuple[str, ...], rows: list[tuple[str, str, str, str]]) -> None:
    shown = [header] + [(p, i[:12] + "…", v, r) for p, i, v, r in rows]
    widths = [max(len(row[col]) for row in shown) for col in range(len(header) - 1)]
    for row in shown:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]))


if __name__ == "__main__":
    raise SystemExit(main())
