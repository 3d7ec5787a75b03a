"""Where the time goes in the steady-state burst of 10,000 checks (not part of ``make bench``).

Usage: ``python benchmarks/profile_burst.py [--checks N] [--rate HZ] [--raw FILE]``.

Runs one steady-state burst through one warm plugin (as ``benchmarks/run.py``
does) with py-spy attached to the host and the plugin process for the
burst only, and
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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import ADMIT_PLUGIN, SERVICE_URL, expect_admitted, make_pins, warm_up_pin
from cipdplugin import Config, Host

#: Time for py-spy to attach before the burst starts.
ATTACH_DELAY = 1.0

#: (area, pattern on "function (file:line)") in order; the first match wins.
AREAS = [
    ("cipdplugin host", re.compile(r"cipdplugin/host")),
    ("cipdplugin pins (both sides)", re.compile(r"cipdplugin/pins")),
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


def profile_burst(py_spy: str, checks: int, rate: int, raw: Path) -> float:
    """Run a steady-state burst with py-spy attached to this process and its plugin.

    py-spy is attached after the warm-up and stopped right after the burst,
    so start-up and shutdown are not in the samples. Returns checks/s.
    """
    host = Host(Config(SERVICE_URL))
    try:
        plugin = host.new_admission_plugin(ADMIT_PLUGIN)
        expect_admitted(plugin.check_admission(warm_up_pin(0)))
        pins = make_pins(checks)
        command = [
            py_spy, "record", "--pid", str(os.getpid()), "--subprocesses", "--gil", "--nonblocking",
            "--format", "raw", "--rate", str(rate), "--output", str(raw),
        ]  # fmt: skip
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as sampler:
            time.sleep(ATTACH_DELAY)
            start = time.perf_counter()
            for future in [plugin.check_admission(pin) for pin in pins]:
                expect_admitted(future)
            elapsed = time.perf_counter() - start
            sampler.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
            _, errors = sampler.communicate(timeout=60)
            if sampler.returncode != 0 and not raw.exists():
                raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace').strip()}")
    finally:
        host.close()
    return checks / elapsed


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
        lines.append("  cipdplugin functions, including callees:")
        ours = [(call, count) for call, count in inclusive[process].most_common() if "cipdplugin/" in call]
        for call, count in ours[:top]:
            lines.append(f"    {count / total:6.1%}  {call}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions listed per table")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw samples here")
    args = parser.parse_args(argv)
    py_spy = find_py_spy()
    if py_spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        raw = args.raw or Path(scratch) / "samples.txt"
        rate = profile_burst(py_spy, args.checks, args.rate, raw)
        print(f"{args.checks} checks through one warm plugin: {rate:.0f} checks/s under the profiler\n")
        print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
