"""``StaticRepository``: instance metadata held in memory, loadable from JSON.

The file format (all keys but ``instances`` optional)::

    {
      "instances": [
        {
          "package": "example/tool",
          "instance_id": "<instance ID>",
          "metadata": [
            {
              "key": "allowed-sha256",
              "value": "<text>",            // or "value_base64": "<base64>"
              "content_type": "text/plain",
              "attached_by": "user:someone@example.com",
              "attached_ts": "2026-01-31T12:00:00Z",  // RFC 3339; no offset means UTC
              "fingerprint": "<hex>"        // derived from key and value if absent
            }
          ]
        }
      ]
    }

Unknown fields are errors, so that a misspelt one is not silently ignored.

Listings return entries newest first (by ``attached_ts``; entries without
one are oldest, and ties keep file order, later first), filtered by
``keys`` when given, in pages of ``page_size`` (100 when unset, at most
1000) with opaque page tokens. An instance the file does not mention has no
metadata.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cipdplugin.constants import MAX_METADATA_FILE_BYTES, REPOSITORY_PAGE_SIZE
from cipdplugin.errors import AdmissionError, InvalidPinError
from cipdplugin.files import UnusableFile, read_regular_file
from cipdplugin.pins import Pin, object_ref_to_instance_id
from cipdplugin.protocol.cipd_pb2 import InstanceMetadata, ListMetadataRequest, ListMetadataResponse

MAX_PAGE_SIZE = 1000
#: The CIPD backend's limits on metadata keys and values.
MAX_KEY_LENGTH = 400
MAX_VALUE_BYTES = 512 * 1024
_METADATA_KEY = re.compile(r"[a-z0-9_\-]+")

_FILE_FIELDS = {"instances"}
_INSTANCE_FIELDS = {"package", "instance_id", "metadata"}
_ENTRY_FIELDS = {"key", "value", "value_base64", "content_type", "attached_by", "attached_ts", "fingerprint"}
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})?")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: The range of google.protobuf.Timestamp: years 1 to 9999.
_TIMESTAMP_SECONDS = range(-62135596800, 253402300800)


class RepositoryFileError(ValueError):
    """A metadata file is missing, unreadable or malformed; the message says where."""


def metadata_fingerprint(key: str, value: bytes) -> str:
    """A stable identifier of one key/value pair (hex, 32 characters)."""
    return hashlib.sha256(key.encode() + b":" + value).hexdigest()[:32]


class StaticRepository:
    """A ``RepositoryClient`` over a fixed set of metadata entries.

    Thread-safe: the entries never change after construction.
    """

    def __init__(self, entries: Mapping[Pin, Iterable[InstanceMetadata]] | None = None) -> None:
        self._entries: dict[Pin, list[InstanceMetadata]] = {}
        for pin, items in (entries or {}).items():
            # Copies, so that callers changing their messages cannot change ours.
            self._entries[pin] = _newest_first([_copy(md) for md in items])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StaticRepository:
        """Load a repository from a JSON file in the format of the module docs.

        Only a regular file of at most 64 MiB is read: a FIFO or a device
        is refused before any read, so loading never hangs.

        Raises:
            RepositoryFileError: the file cannot be read, is not a regular
                file, is too large, or does not match the format.
        """
        shown = repr(os.fspath(path))
        try:
            blob = read_regular_file(path, limit=MAX_METADATA_FILE_BYTES)
        except OSError as exc:
            raise RepositoryFileError(f"cannot read metadata file {shown}: {exc.strerror or exc}") from None
        except UnusableFile as exc:
            raise RepositoryFileError(f"cannot read metadata file {shown}: it {exc}") from None
        try:
            data = json.loads(blob.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RepositoryFileError(f"metadata file {shown} is not valid JSON: {exc}") from None
        except RecursionError:
            raise RepositoryFileError(
                f"metadata file {shown} is nested too deeply to be a metadata file"
            ) from None
        return cls.from_json(data, source=os.fspath(path))

    @classmethod
    def from_json(cls, data: Any, *, source: str = "metadata") -> StaticRepository:
        """Build a repository from already-parsed JSON (see ``from_file``)."""
        if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
            raise RepositoryFileError(f"{source}: expected an object with an 'instances' list")
        _reject_unknown(data, _FILE_FIELDS, source)
        entries: dict[Pin, list[InstanceMetadata]] = {}
        for index, instance in enumerate(data["instances"]):
            where = f"{source}: instances[{index}]"
            if not isinstance(instance, dict):
                raise RepositoryFileError(f"{where}: expected an object")
            _reject_unknown(instance, _INSTANCE_FIELDS, where)
            try:
                pin = Pin(
                    _field(instance, "package", str, where), _field(instance, "instance_id", str, where)
                )
            except InvalidPinError as exc:
                raise RepositoryFileError(f"{where}: {exc}") from None
            items = instance.get("metadata", [])
            if not isinstance(items, list):
                raise RepositoryFileError(f"{where}.metadata: expected a list")
            parsed = [_parse_entry(item, f"{where}.metadata[{i}]") for i, item in enumerate(items)]
            entries.setdefault(pin, []).extend(parsed)
        return cls(entries)

    def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
        """Answer one page of an instance's metadata.

        Raises:
            AdmissionError: INVALID_ARGUMENT for a malformed instance, a
                negative page size, or a page token this listing did not issue.
        """
        try:
            pin = Pin(request.package, object_ref_to_instance_id(request.instance))
        except InvalidPinError as exc:
            raise AdmissionError(str(exc), code=grpc.StatusCode.INVALID_ARGUMENT) from None
        if request.page_size < 0:
            raise AdmissionError("page_size must not be negative", code=grpc.StatusCode.INVALID_ARGUMENT)
        keys = set(request.keys)
        matching = [md for md in self._entries.get(pin, ()) if not keys or md.key in keys]
        query = _query_fingerprint(request)
        start = _decode_token(request.page_token, query) if request.page_token else 0
        size = min(request.page_size or REPOSITORY_PAGE_SIZE, MAX_PAGE_SIZE)
        page = matching[start : start + size]
        response = ListMetadataResponse(metadata=page)
        if start + size < len(matching):
            response.next_page_token = _encode_token(start + size, query)
        return response


def _field(obj: Mapping[str, Any], name: str, kind: type, where: str, *, required: bool = True) -> Any:
    if name not in obj:
        if required:
            raise RepositoryFileError(f"{where}: missing {name!r}")
        return None
    value = obj[name]
    if not isinstance(value, kind):
        raise RepositoryFileError(f"{where}.{name}: expected {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON escapes can spell lone surrogates, which no protobuf string holds.
            raise RepositoryFileError(f"{where}.{name}: not valid Unicode text") from None
    return value


def _reject_unknown(obj: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = set(obj) - known
    if unknown:
        raise RepositoryFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")


def _parse_entry(item: Any, where: str) -> InstanceMetadata:
    if not isinstance(item, dict):
        raise RepositoryFileError(f"{where}: expected an object")
    _reject_unknown(item, _ENTRY_FIELDS, where)
    key = _field(item, "key", str, where)
    if not _METADATA_KEY.fullmatch(key) or len(key) > MAX_KEY_LENGTH:
        raise RepositoryFileError(
            f"{where}.key: {key!r} is not a metadata key (1 to {MAX_KEY_LENGTH} of a-z, 0-9, '_' and '-')"
        )
    if ("value" in item) == ("value_base64" in item):
        raise RepositoryFileError(f"{where}: give exactly one of 'value' and 'value_base64'")
    if "value" in item:
        value = _field(item, "value", str, where).encode("utf-8")
    else:
        try:
            value = base64.b64decode(_field(item, "value_base64", str, where), validate=True)
        except ValueError as exc:  # binascii.Error, or non-ASCII text
            raise RepositoryFileError(f"{where}.value_base64: {exc}") from None
    if len(value) > MAX_VALUE_BYTES:
        raise RepositoryFileError(f"{where}: the value has {len(value)} bytes, more than {MAX_VALUE_BYTES}")
    entry = InstanceMetadata(
        key=key,
        value=value,
        content_type=_field(item, "content_type", str, where, required=False) or "",
        attached_by=_field(item, "attached_by", str, where, required=False) or "",
        fingerprint=_field(item, "fingerprint", str, where, required=False)
        or metadata_fingerprint(key, value),
    )
    attached = _field(item, "attached_ts", str, where, required=False)
    if attached is not None:
        entry.attached_ts.CopyFrom(_parse_timestamp(attached, f"{where}.attached_ts"))
    return entry


def _parse_timestamp(text: str, where: str) -> Timestamp:
    # A pattern first: datetime.fromisoformat accepts other forms, differently
    # on each Python version, and does not keep nanoseconds.
    match = _RFC3339.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        date, clock, fraction, offset = match.groups()
        offset = "+00:00" if offset in (None, "Z", "z") else offset
        moment = datetime.fromisoformat(f"{date}T{clock}{offset}")
    except ValueError:
        raise RepositoryFileError(f"{where}: {text!r} is not an RFC 3339 time") from None
    seconds = (moment - _EPOCH) // timedelta(seconds=1)
    if seconds not in _TIMESTAMP_SECONDS:
        raise RepositoryFileError(f"{where}: {text!r} is outside years 1 to 9999")
    return Timestamp(seconds=seconds, nanos=int((fraction or "").ljust(9, "0")))


def _copy(entry: InstanceMetadata) -> InstanceMetadata:
    copy = InstanceMetadata()
    copy.CopyFrom(entry)
    return copy


def _newest_first(entries: list[InstanceMetadata]) -> list[InstanceMetadata]:
    # Reverse first so that, with a stable sort, later file entries win ties.
    entries = entries[::-1]
    entries.sort(
        key=lambda md: (md.HasField("attached_ts"), md.attached_ts.seconds, md.attached_ts.nanos),
        reverse=True,
    )
    return entries


def _query_fingerprint(request: ListMetadataRequest) -> str:
    query = ListMetadataRequest(
        package=request.package, instance=request.instance, keys=sorted(set(request.keys))
    )
    return hashlib.sha256(query.SerializeToString(deterministic=True)).hexdigest()[:16]


def _encode_token(offset: int, query: str) -> str:
    return base64.urlsafe_b64encode(f"{offset}:{query}".encode()).decode("ascii")


def _decode_token(token: str, query: str) -> int:
    try:
        offset_text, token_query = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii").split(":")
        offset = int(offset_text)
    except (ValueError, UnicodeError, binascii.Error):
        offset, token_query = -1, ""
    if offset < 0 or token_query != query:
        raise AdmissionError(f"invalid page token {token!r}", code=grpc.StatusCode.INVALID_ARGUMENT)
    return offset
