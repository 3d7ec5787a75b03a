"""Where the time goes in the steady-state burst of 10,000 checks (not part of ``make bench``).

Usage: ``python benchmarks/profile_burst.py [--checks N] [--rate HZ] [--raw FILE]``.

Runs one steady-state burst through one plugin (as ``benchmarks/run.py``
does) under py-spy, sampling the host and the plugin process together, and
prints for each process the share of samples per area of code (our host
code, our plugin SDK, grpc's Python layer, the standard library's threading
and futures, other) and the top functions, by own time and including
callees. Only samples of threads holding the GIL are counted (``--gil``),
so the figures show Python CPU time; the gRPC core's native threads are
not seen.

py-spy is not a dependency of the project: install it into the virtualenv
(``.venv/bin/pip install py-spy``) to use this script.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: (area, pattern on "function (file:line)") in order; the first match wins.
AREAS = [
    ("cipdplugin host", re.compile(r"cipdplugin/(host|pins|errors)")),
    ("cipdplugin plugin SDK", re.compile(r"cipdplugin/plugins|benchmarks/plugins")),
    ("cipdplugin other", re.compile(r"cipdplugin/")),
    ("grpc (Python layer)", re.compile(r"grpc/")),
    ("protobuf", re.compile(r"google/protobuf")),
    ("threading, queue, futures", re.compile(r"threading\.py|queue\.py|concurrent/futures|contextlib")),
    ("imports (start-up)", re.compile(r"importlib")),
    ("benchmark driver", re.compile(r"benchmarks/")),
]


def area_of(frame: str) -> str:
    for name, pattern in AREAS:
        if pattern.search(frame):
            return name
    return "other"


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def run_target(checks: int) -> None:
    from benchmarks.run import library_burst, make_pins

    details = library_burst(make_pins(checks), 1, warm=True)
    print(f"profiled burst: {checks / details['seconds']:.0f} checks/s", file=sys.stderr)


def summarize(raw: Path, top: int) -> str:
    """Per process: samples by area (own time), then top functions by own and inclusive time."""
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    areas: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        process = "plugin" if len(processes) > 1 else "host"
        calls = [re.sub(r":\d+\)$", ")", f) for f in frames if not f.startswith(("process ", "thread "))]
        if not calls:
            continue
        own[process][calls[-1]] += count
        areas[process][area_of(calls[-1])] += count
        for call in set(calls):
            inclusive[process][call] += count
    lines: list[str] = []
    for process in ("host", "plugin"):
        total = sum(areas[process].values())
        if not total:
            continue
        lines.append(f"== {process} process: {total} samples with the GIL held")
        lines.append("  own time by area:")
        for name, count in areas[process].most_common():
            lines.append(f"    {count / total:6.1%}  {name}")
        lines.append("  top functions, own time:")
        for call, count in own[process].most_common(top):
            lines.append(f"    {count / total:6.1%}  {call}")
        lines.append("  top functions, including callees:")
        for call, count in inclusive[process].most_common(top):
            lines.append(f"    {count / total:6.1%}  {call}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions listed per table")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw samples here")
    parser.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.target:
        run_target(args.checks)
        return 0
    py_spy = find_py_spy()
    if py_spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        raw = args.raw or Path(scratch) / "samples.txt"
        command = [
            py_spy, "record", "--subprocesses", "--gil", "--nonblocking", "--format", "raw",
            "--rate", str(args.rate), "--output", str(raw), "--",
            sys.executable, os.path.abspath(__file__), "--target", "--checks", str(args.checks),
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
