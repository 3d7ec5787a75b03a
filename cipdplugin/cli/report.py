"""The verdicts of ``cipdplugin check`` and how they are reported: text
lines, the ``--json`` report and the exit status."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from cipdplugin.cli.inputs import PinRequest
from cipdplugin.status import ADMITTED, DENIED, ERROR
from cipdplugin.text import printable

EXIT_ADMITTED = 0
EXIT_DENIED = 1
#: A usage or configuration error: nothing was checked.
EXIT_ERROR = 2
#: Some check failed (invalid pin, plugin missing or crashed, timeout, ...).
EXIT_CHECK_FAILED = 3
#: A bug in cipdplugin: never a verdict (one line on stderr, the traceback at -vv).
EXIT_INTERNAL = 4

#: A denial under ``--warn-only``: reported, but not failing the run.
WARNED = "warned"
#: Width of the verdict column of the text report.
_VERDICT_WIDTH = 10


@dataclass(frozen=True)
class PinReport:
    """What the report says of one pin: ``verdict`` is ADMITTED, DENIED, WARNED or ERROR."""

    request: PinRequest
    verdict: str
    code: grpc.StatusCode
    message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "pin": self.request.text,
            "package": self.request.package,
            "instance_id": self.request.instance_id,
            "verdict": self.verdict,
            "code": self.code.name,
            "message": self.message,
        }

    def as_line(self) -> str:
        """The text report's line: the pin as given and the plugin's message,
        with control characters escaped (one line, nothing a terminal acts on)."""
        line = f"{self.verdict:<{_VERDICT_WIDTH}}{printable(self.request.text)}"
        if self.verdict in (DENIED, WARNED):
            line += f": {printable(self.message)}"
        elif self.verdict == ERROR:
            line += (
                f": {self.code.name}: {printable(self.message)}" if self.message else f": {self.code.name}"
            )
        return line


def exit_status(verdicts: Sequence[PinReport]) -> int:
    """0 if all admitted (or only warned), 3 if any check failed, else 1 (some denied)."""
    outcomes = {verdict.verdict for verdict in verdicts}
    if ERROR in outcomes:
        return EXIT_CHECK_FAILED
    if DENIED in outcomes:
        return EXIT_DENIED
    return EXIT_ADMITTED


def json_report(verdicts: Sequence[PinReport], *, warn_only: bool = False) -> dict[str, Any]:
    """The ``--json`` report (its schema is in the help text); totals count
    ``warned`` pins only under ``--warn-only``."""
    totals = dict.fromkeys((ADMITTED, DENIED, WARNED, ERROR) if warn_only else (ADMITTED, DENIED, ERROR), 0)
    for verdict in verdicts:
        totals[verdict.verdict] += 1
    return {"pins": [verdict.as_json() for verdict in verdicts], "totals": totals}
