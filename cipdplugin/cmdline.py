"""What a plugin command line must be, checked in one place.

Whoever takes one checks it here: ``Host.new_admission_plugin`` and
``launch_plugin`` (a sequence), the client options (``admission_plugin=``,
``$CIPD_ADMISSION_PLUGIN``) and the CLI's ``--plugin`` (JSON text). Each
turns ``CommandLineError`` into its own error type.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Sequence

_EXAMPLE = 'e.g. \'["/path/to/plugin", "--flag"]\''


class CommandLineError(ValueError):
    """A plugin command line is malformed; the message names where it came from."""


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def checked_cmdline(
    value: object, *, source: str = "a plugin command line", allow_empty: bool = False, text: bool = False
) -> tuple[str, ...]:
    """``value`` as a command line: a list or tuple of strings whose first
    item, the executable, is not empty, and each of which the OS can take
    (file names that are not UTF-8 arrive as ``os.fsdecode`` makes them).

    ``allow_empty``: an empty sequence means "no plugin" and is returned as is.
    ``text``: the strings came from text (JSON), so they must be valid Unicode.

    Raises:
        CommandLineError: anything else, naming ``source`` and the item at fault.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise CommandLineError(
            f"{source} must be a list of strings, got {_kind(value)} {reprlib.repr(value)}"
        )
    if not value:
        if allow_empty:
            return ()
        raise CommandLineError(f"{source} is an empty list; it must name at least the plugin executable")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            # reprlib: an item may be nested too deeply for repr() itself.
            raise CommandLineError(
                f"{source}: item {index} must be a string, got {_kind(item)} {reprlib.repr(item)}"
            )
        try:
            item.encode("utf-8") if text else os.fsencode(item)
        except UnicodeEncodeError:
            raise CommandLineError(f"{source}: item {index} is not valid Unicode text") from None
    if not value[0]:
        raise CommandLineError(f"{source}: the executable (item 0) must not be empty")
    return tuple(value)


def parse_cmdline(text: str, *, source: str, allow_empty: bool = False) -> tuple[str, ...]:
    """The command line written as JSON in ``text`` (a list of strings).

    ``allow_empty``: ``[]`` and ``null`` mean "no plugin" (returned as ``()``).

    Raises:
        CommandLineError: not JSON, nested too deeply, or not a valid
            command line (see ``checked_cmdline``).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandLineError(
            f"{source} is not valid JSON ({exc}); expected a list of strings, {_EXAMPLE}"
        ) from None
    except RecursionError:
        raise CommandLineError(
            f"{source} is nested too deeply; expected a list of strings, {_EXAMPLE}"
        ) from None
    if value is None and allow_empty:
        return ()
    if not isinstance(value, list):
        raise CommandLineError(f"{source} must be a JSON list of strings, got {_kind(value)}; {_EXAMPLE}")
    return checked_cmdline(value, source=source, allow_empty=allow_empty, text=True)
