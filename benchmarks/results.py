"""What every benchmark section records: figures with their repetitions,
target verdicts and notes, shared by ``run.py`` and the sections kept in
modules of their own (``go.py``)."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from typing import Any


class BenchmarkError(RuntimeError):
    """A measurement could not be taken (a check failed, a process misbehaved)."""


@dataclass
class Measurement:
    """One figure: its value in each repetition, and per-repetition details."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    details: list[dict[str, float]] = field(default_factory=list)

    def add(self, value: float, **details: float) -> None:
        self.values.append(value)
        self.details.append(details)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def median_detail(self, key: str) -> float:
        return statistics.median(d[key] for d in self.details)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": self.median,
            "repetitions": self.values,
            "details": self.details,
        }


@dataclass
class Target:
    name: str
    unit: str
    value: float
    bound: float
    passed: bool
    explanation: str


class Results:
    def __init__(self) -> None:
        self.measurements: dict[str, Measurement] = {}
        self.targets: list[Target] = []
        self.notes: dict[str, Any] = {}

    def get(self, name: str, unit: str) -> Measurement:
        if name not in self.measurements:
            self.measurements[name] = Measurement(name, unit)
        return self.measurements[name]

    def has(self, name: str) -> bool:
        return name in self.measurements and bool(self.measurements[name].values)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
