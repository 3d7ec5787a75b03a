"""Run the test suite at both ends of the supported range, from the sdist.

Run by ``make test-matrix``. Builds the sdist and, from it, the wheel;
checks what each carries; unpacks the sdist; then for each leg makes a fresh
virtual environment, installs the wheel with its ``test`` extra and runs the
sdist's own tests against the installed package:

* ``floor``: the oldest Python, every dependency pinned at its floor by
  ``constraints/floor.txt`` (the install fails rather than move a pin);
* ``newest``: the newest Python and the newest release of everything.

The legs run one after the other (about two minutes each on two cores):
run at once they finish sooner, but the doubled load stretches the suite's
few timing-sensitive steps (a plugin's one-second grace to exit on its own)
past their limits. ``--parallel`` runs them at once anyway.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOOR_CONSTRAINTS = REPO_ROOT / "constraints" / "floor.txt"
#: Bound on one install or one test run, so that CI fails instead of hanging.
STEP_TIMEOUT = 1200.0

#: Files each distribution must carry, relative to its root.
SDIST_REQUIRED = (
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "setup.cfg",
    "cipdplugin/__init__.py",
    "cipdplugin/protocol/plugin.proto",
    "tests/conftest.py",
    "tests/plugins/admission_plugin.py",
    "examples/allowlist_plugin.py",
    "scripts/generate_protos.py",
)
WHEEL_REQUIRED = (
    "cipdplugin/py.typed",
    "cipdplugin/protocol/plugin.proto",
    "cipdplugin/protocol/plugin_pb2.pyi",
    "cipdplugin/protocol/cipd_pb2.pyi",
)


@dataclass
class Leg:
    name: str
    python: str
    install_options: list[str]
    pins: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    passed: bool = False


def floor_pins() -> dict[str, str]:
    """``name==version`` lines of the constraints file, as {name: version}."""
    pins = {}
    for text in FLOOR_CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = text.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise ValueError(f"{FLOOR_CONSTRAINTS.name}: {line!r} is not pinned with ==")
            pins[name.strip().lower()] = version.strip()
    return pins


def build(work: Path) -> tuple[Path, Path]:
    """Build the sdist, then the wheel from it; return (sdist, wheel)."""
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(REPO_ROOT)],
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=STEP_TIMEOUT,
    )
    if result.returncode != 0:
        raise SystemExit(f"building the distributions failed:\n{result.stdout}")
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


def check_contents(sdist: Path, wheel: Path) -> None:
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        names = {name.removeprefix(root + "/") for name in archive.getnames()}
    missing = [name for name in SDIST_REQUIRED if name not in names]
    if missing or any("__pycache__" in name for name in names):
        raise SystemExit(f"{sdist.name}: missing {missing} (or carries __pycache__)")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = [name for name in WHEEL_REQUIRED if name not in names]
    if not any(name.endswith(".dist-info/licenses/LICENSE") for name in names):
        missing.append("*.dist-info/licenses/LICENSE")
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    outside = sorted(top_level - {"cipdplugin"})
    if missing or outside:
        raise SystemExit(f"{wheel.name}: missing {missing}; unexpected top-level entries {outside}")


def unpack(sdist: Path, work: Path) -> Path:
    target = work / "src"
    shutil.rmtree(target, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        if hasattr(tarfile, "data_filter"):
            archive.extractall(work / "unpacked", filter="data")
        else:  # Python before 3.10.12: our own archive, just built
            archive.extractall(work / "unpacked")
    shutil.move(str(work / "unpacked" / root), target)
    shutil.rmtree(work / "unpacked")
    return target


def _run(leg: Leg, args: list[str], cwd: Path | None = None) -> bool:
    leg.log.append(f"$ {' '.join(args)}")
    try:
        result = subprocess.run(
            args,
            check=False,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=STEP_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        leg.log.append(f"timed out after {exc.timeout} s")
        return False
    leg.log.append(result.stdout)
    return result.returncode == 0


def run_leg(leg: Leg, work: Path, wheel: Path, source: Path, pytest_args: list[str]) -> None:
    venv = work / leg.name
    shutil.rmtree(venv, ignore_errors=True)
    python = str(venv / "bin" / "python")
    steps = [
        [leg.python, "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "--quiet", f"{wheel}[test]", *leg.install_options],
        [python, "-m", "pip", "list", "--format=freeze"],
        [python, "-c", _CHECK_PINS, repr(leg.pins)],
    ]
    if all(_run(leg, step) for step in steps):
        # --import-mode=append: the tests import the installed package, not
        # the sdist's copy beside them.
        pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append"]
        leg.passed = _run(leg, [*pytest, *pytest_args], cwd=source)


_CHECK_PINS = """
import ast, sys
from importlib.metadata import version
pins = ast.literal_eval(sys.argv[1])
moved = {name: (pin, version(name)) for name, pin in pins.items() if version(name) != pin}
if moved:
    sys.exit(f"the install moved pinned packages (pin, installed): {moved}")
names = ("grpcio", "protobuf", "googleapis-common-protos", "psutil")
print("Python", sys.version.split()[0], "with", ", ".join(f"{n} {version(n)}" for n in names))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--oldest", required=True, help="the oldest supported Python (floor leg)")
    parser.add_argument("--newest", required=True, help="the newest supported Python (newest leg)")
    parser.add_argument("--work", default=str(REPO_ROOT / ".matrix"), help="scratch folder")
    parser.add_argument("--parallel", action="store_true", help="run the legs at once")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    sdist, wheel = build(work)
    check_contents(sdist, wheel)
    source = unpack(sdist, work)
    print(f"built and checked {sdist.name} and {wheel.name}", flush=True)

    pins = floor_pins()
    legs = [
        Leg("floor", args.oldest, ["--constraint", str(FLOOR_CONSTRAINTS)], pins),
        Leg("newest", args.newest, ["--upgrade", "--upgrade-strategy", "eager"]),
    ]
    threads = [
        threading.Thread(target=run_leg, args=(leg, work, wheel, source, args.pytest_args), name=leg.name)
        for leg in legs
    ]
    for thread in threads:
        thread.start()
        if not args.parallel:
            thread.join()
    for thread in threads:
        thread.join()  # Cannot hang for good: every step has STEP_TIMEOUT.

    for leg in legs:
        print(f"\n===== {leg.name} ({leg.python}): {'passed' if leg.passed else 'FAILED'}")
        print("\n".join(leg.log).rstrip())
    print(f"\ntest matrix: {time.monotonic() - started:.0f} s")
    return 0 if all(leg.passed for leg in legs) else 1


if __name__ == "__main__":
    sys.exit(main())
