"""Reading what ``cipdplugin check`` is asked: the plugin's command line, the
pins (arguments and ``cipd ensure -json-output`` files) and the metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from cipdplugin import (
    Config,
    InvalidPinError,
    Pin,
    RepositoryFileError,
    StaticRepository,
)
from cipdplugin.cmdline import CommandLineError, parse_cmdline
from cipdplugin.constants import MAX_PINS_FILE_BYTES
from cipdplugin.files import UnusableFile, describe_size, read_regular_file
from cipdplugin.host.chain import checked_scope


class UsageError(Exception):
    """The command line or an input file is unusable; the message says why."""


@dataclass(frozen=True)
class PinRequest:
    """One pin as the user gave it, valid or not.

    ``pin`` is None exactly when the input is invalid, and ``problem`` then
    says why. ``package`` and ``instance_id`` are what could be read of it.
    """

    text: str
    package: str | None
    instance_id: str | None
    pin: Pin | None
    problem: str = ""


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def parse_plugin_cmdline(text: str, source: str) -> list[str]:
    """The plugin command line from ``text``, a JSON list of strings.

    Raises:
        UsageError: ``text`` is not JSON, not a list, empty, or holds a
            non-string or an empty executable; ``source`` names where it came from.
    """
    try:
        return list(parse_cmdline(text, source=source))
    except CommandLineError as exc:
        raise UsageError(str(exc)) from None


@dataclass(frozen=True)
class PluginSpec:
    """One plugin to run: its command line, and the package prefixes it covers
    (empty: every package)."""

    cmdline: tuple[str, ...]
    scope: tuple[str, ...] = ()


def parse_scope(text: str) -> tuple[str, ...]:
    """The prefixes of ``--plugin-scope PREFIX[,PREFIX...]``.

    Raises:
        UsageError: no prefix is given, or one is not a package name.
    """
    prefixes = [prefix.strip() for prefix in text.split(",")]
    if not any(prefixes):
        raise UsageError("--plugin-scope needs at least one package prefix, e.g. 'infra/tools,infra/ci'")
    try:
        return checked_scope(prefixes)
    except ValueError as exc:
        raise UsageError(f"--plugin-scope {text!r}: {exc}") from None


def plugin_specs(options: Sequence[tuple[str, str | None]]) -> list[PluginSpec]:
    """The plugins of the ``--plugin`` options, each with its ``--plugin-scope``.

    Raises:
        UsageError: a command line or a scope is malformed.
    """
    specs = []
    for index, (text, scope) in enumerate(options):
        source = "--plugin" if len(options) == 1 else f"--plugin #{index + 1}"
        cmdline = parse_plugin_cmdline(text, source)
        specs.append(PluginSpec(tuple(cmdline), parse_scope(scope) if scope is not None else ()))
    return specs


def pin_request(package: str, instance_id: str, text: str | None = None) -> PinRequest:
    """A request for ``package`` at ``instance_id``, invalid if either is malformed."""
    shown = f"{package}:{instance_id}" if text is None else text
    try:
        return PinRequest(shown, package, instance_id, Pin(package, instance_id))
    except InvalidPinError as exc:
        return PinRequest(shown, package, instance_id, None, str(exc))


def parse_pin_argument(text: str) -> PinRequest:
    """A request from a ``package:instance_id`` argument, invalid if malformed."""
    try:
        pin = Pin.parse(text)
    except InvalidPinError as exc:
        if text.count(":") == 1:
            package, instance_id = text.split(":")
            return PinRequest(text, package, instance_id, None, str(exc))
        return PinRequest(text, None, None, None, str(exc))
    return PinRequest(text, pin.package, pin.instance_id, pin)


def read_pins_file(path: str, stdin: TextIO) -> list[PinRequest]:
    """The pins of a ``cipd ensure -json-output`` file (``"-"``: ``stdin``), in file order.

    Pins with malformed names or IDs come back as invalid requests. A path
    must name a regular file (a FIFO or a device is refused before any
    read); neither it nor ``stdin`` may hold more than 16 MiB.

    Raises:
        UsageError: the file cannot be read, is not a regular file, is too
            large, is not JSON, or has another shape.
    """
    name = "pins from standard input" if path == "-" else f"pins file {path!r}"
    too_large = f"{name} is larger than {describe_size(MAX_PINS_FILE_BYTES)}"
    try:
        if path == "-":
            # Standard input may be a pipe: it is read to its end, as a filter reads.
            text = stdin.read(MAX_PINS_FILE_BYTES + 1)
            if len(text) > MAX_PINS_FILE_BYTES:
                raise UsageError(too_large)
        else:
            text = read_regular_file(path, limit=MAX_PINS_FILE_BYTES).decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnusableFile as exc:
        raise UsageError(f"cannot read {name}: it {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name} is not UTF-8 text: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{name} is nested too deeply to be a pins file") from None
    shape = 'expected {"result": {"<subdir>": [{"package": ..., "instance_id": ...}]}}'
    if not isinstance(data, dict):
        raise UsageError(f"{name}: {shape}, got {_json_type(data)}")
    if data.get("result") is None and data.get("error"):
        raise UsageError(f"{name} records a failed cipd run, not pins: {data['error']}")
    if "result" not in data:
        raise UsageError(f"{name}: no 'result' key; {shape}")
    result = data["result"]
    if not isinstance(result, dict):
        raise UsageError(f"{name}: 'result' must map subdirectories to lists, got {_json_type(result)}")
    requests: list[PinRequest] = []
    for subdir, entries in result.items():
        if not isinstance(entries, list):
            raise UsageError(f"{name}: result[{subdir!r}] must be a list, got {_json_type(entries)}")
        for index, entry in enumerate(entries):
            where = f"{name}: result[{subdir!r}][{index}]"
            if not isinstance(entry, dict):
                raise UsageError(f"{where} must be an object, got {_json_type(entry)}")
            for field in ("package", "instance_id"):
                if not isinstance(entry.get(field), str):
                    found = "missing" if field not in entry else _json_type(entry[field])
                    raise UsageError(f"{where}: {field!r} must be a string, got {found}")
            requests.append(pin_request(entry["package"], entry["instance_id"]))
    return requests


def load_config(service_url: str, metadata: str | None) -> Config:
    """The host's config: the backend URL and, with a metadata file, a repository.

    Raises:
        UsageError: the URL is empty or the metadata file is unusable.
    """
    if not service_url:
        raise UsageError("--service-url must not be empty")
    if metadata is None:
        return Config(service_url)
    try:
        return Config(service_url, StaticRepository.from_file(metadata))
    except RepositoryFileError as exc:
        raise UsageError(str(exc)) from None
