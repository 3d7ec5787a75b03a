"""StaticRepository and its JSON format, Config, and the error hierarchy."""

from __future__ import annotations

import base64
import calendar
import copy
import hashlib
import json
import pickle
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cipdplugin import (
    DEFAULT_SERVICE_URL,
    AdmissionDenied,
    AdmissionError,
    Config,
    InstanceMetadata,
    InvalidPinError,
    ListMetadataRequest,
    ListMetadataResponse,
    ObjectRef,
    Pin,
    PluginAbortedError,
    PluginStartError,
    RepositoryClient,
    RepositoryFileError,
    StaticRepository,
)
from cipdplugin.constants import REPOSITORY_PAGE_SIZE
from cipdplugin.pins import instance_id_to_object_ref
from cipdplugin.protocol.cipd_pb2 import HASH_ALGO_UNSPECIFIED
from cipdplugin.repository import MAX_PAGE_SIZE, metadata_fingerprint

SHA1_ID = "0123456789abcdef0123456789abcdef01234567"
SHA256_ID = "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4kC"
PACKAGE = "example/tool"

FUZZ = settings(max_examples=200, deadline=None)


def _ts(text: str) -> int:
    """Seconds since the epoch of a UTC "YYYY-MM-DDTHH:MM:SS" time."""
    return calendar.timegm(datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timetuple())


def _repo(*entries: dict[str, Any], package: str = PACKAGE, instance_id: str = SHA1_ID) -> StaticRepository:
    data = {"instances": [{"package": package, "instance_id": instance_id, "metadata": list(entries)}]}
    return StaticRepository.from_json(data)


def _request(
    package: str = PACKAGE, instance_id: str = SHA1_ID, keys: tuple[str, ...] = (), **fields: Any
) -> ListMetadataRequest:
    return ListMetadataRequest(
        package=package, instance=instance_id_to_object_ref(instance_id), keys=list(keys), **fields
    )


def _values(response: ListMetadataResponse) -> list[bytes]:
    return [md.value for md in response.metadata]


def _list_all(repo: StaticRepository, request: ListMetadataRequest) -> list[list[bytes]]:
    pages = []
    while True:
        response = repo.list_metadata(request)
        pages.append(_values(response))
        if not response.next_page_token:
            return pages
        request.page_token = response.next_page_token


def _invalid_argument(repo: StaticRepository, request: ListMetadataRequest) -> AdmissionError:
    with pytest.raises(AdmissionError) as info:
        repo.list_metadata(request)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    return info.value


# --- the file format --------------------------------------------------------


def test_file_in_the_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "metadata.json"
    document = {
        "instances": [
            {
                "package": PACKAGE,
                "instance_id": SHA256_ID,
                "metadata": [
                    {
                        "key": "allowed-sha256",
                        "value": "yes ✓",
                        "content_type": "text/plain",
                        "attached_by": "user:someone@example.com",
                        "attached_ts": "2026-01-31T12:00:00Z",
                        "fingerprint": "f" * 32,
                    },
                    {"key": "blob", "value_base64": "AP8="},
                ],
            }
        ]
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    repo = StaticRepository.from_file(path)
    response = repo.list_metadata(_request(instance_id=SHA256_ID))
    first, second = response.metadata
    assert first.attached_ts.seconds == _ts("2026-01-31T12:00:00")
    assert (first.key, first.value, first.content_type, first.attached_by, first.fingerprint) == (
        "allowed-sha256",
        "yes ✓".encode(),
        "text/plain",
        "user:someone@example.com",
        "f" * 32,
    )
    assert (second.key, second.value, second.content_type, second.HasField("attached_ts")) == (
        "blob",
        b"\x00\xff",
        "",
        False,
    )
    assert not response.next_page_token
    assert isinstance(repo, RepositoryClient)


def test_minimal_file() -> None:
    assert not StaticRepository.from_json({"instances": []}).list_metadata(_request()).metadata
    repo = StaticRepository.from_json({"instances": [{"package": PACKAGE, "instance_id": SHA1_ID}]})
    assert not repo.list_metadata(_request()).metadata


def test_unknown_instance_has_no_metadata() -> None:
    repo = _repo({"key": "k", "value": "v"})
    assert repo.list_metadata(_request(package="other/pkg")) == ListMetadataResponse()
    assert repo.list_metadata(_request(instance_id=SHA256_ID)) == ListMetadataResponse()
    assert StaticRepository().list_metadata(_request()) == ListMetadataResponse()


def test_same_pin_in_two_blocks_is_merged_in_file_order() -> None:
    block = {"package": PACKAGE, "instance_id": SHA1_ID}
    data = {
        "instances": [
            {**block, "metadata": [{"key": "k", "value": "1"}]},
            {**block, "metadata": [{"key": "k", "value": "2"}]},
        ]
    }
    # No timestamps: all tie, and the later file entry comes first.
    assert _values(StaticRepository.from_json(data).list_metadata(_request())) == [b"2", b"1"]


@pytest.mark.parametrize(
    ("text", "seconds", "nanos"),
    [
        ("2026-01-31T12:00:00Z", _ts("2026-01-31T12:00:00"), 0),
        ("2026-01-31t12:00:00z", _ts("2026-01-31T12:00:00"), 0),
        ("2026-01-31 12:00:00Z", _ts("2026-01-31T12:00:00"), 0),
        ("2026-01-31T12:00:00", _ts("2026-01-31T12:00:00"), 0),
        ("2026-01-31T13:30:00+01:30", _ts("2026-01-31T12:00:00"), 0),
        ("2026-01-31T07:00:00-05:00", _ts("2026-01-31T12:00:00"), 0),
        ("2026-01-31T12:00:00.5Z", _ts("2026-01-31T12:00:00"), 500_000_000),
        ("2026-01-31T12:00:00.123456789Z", _ts("2026-01-31T12:00:00"), 123_456_789),
        ("1969-12-31T23:59:59Z", -1, 0),
        ("0001-01-01T00:00:00Z", -62135596800, 0),
        ("9999-12-31T23:59:59.999999999Z", 253402300799, 999_999_999),
    ],
)
def test_timestamps(text: str, seconds: int, nanos: int) -> None:
    (entry,) = _repo({"key": "k", "value": "v", "attached_ts": text}).list_metadata(_request()).metadata
    assert (entry.attached_ts.seconds, entry.attached_ts.nanos) == (seconds, nanos)


# --- fingerprints and values ------------------------------------------------


def test_fingerprint_is_derived_from_key_and_value() -> None:
    expected = hashlib.sha256(b"k:v").hexdigest()[:32]
    assert metadata_fingerprint("k", b"v") == expected
    (entry,) = _repo({"key": "k", "value": "v"}).list_metadata(_request()).metadata
    assert entry.fingerprint == expected
    # The same pair has the same fingerprint however it is spelt.
    (again,) = (
        _repo({"key": "k", "value_base64": "dg=="}, package="other")
        .list_metadata(_request(package="other"))
        .metadata
    )
    assert again.fingerprint == expected
    assert metadata_fingerprint("k", b"w") != expected
    assert metadata_fingerprint("j", b"v") != expected


def test_given_fingerprint_is_kept() -> None:
    (entry,) = _repo({"key": "k", "value": "v", "fingerprint": "abc"}).list_metadata(_request()).metadata
    assert entry.fingerprint == "abc"


def test_value_base64_holds_any_bytes() -> None:
    blob = bytes(range(256))
    (entry,) = (
        _repo({"key": "k", "value_base64": base64.b64encode(blob).decode()})
        .list_metadata(_request())
        .metadata
    )
    assert entry.value == blob


# --- keys filter and order --------------------------------------------------


def test_keys_filter() -> None:
    repo = _repo(
        {"key": "a", "value": "1"},
        {"key": "b", "value": "2"},
        {"key": "c", "value": "3"},
        {"key": "a", "value": "4"},
    )
    assert _values(repo.list_metadata(_request(keys=("a",)))) == [b"4", b"1"]
    assert _values(repo.list_metadata(_request(keys=("c", "a", "c")))) == [b"4", b"3", b"1"]
    assert _values(repo.list_metadata(_request(keys=("zzz",)))) == []
    assert _values(repo.list_metadata(_request())) == [b"4", b"3", b"2", b"1"]


def test_newest_first_with_ties_later_entry_first() -> None:
    repo = _repo(
        {"key": "k", "value": "none-1"},
        {"key": "k", "value": "noon", "attached_ts": "2026-01-31T12:00:00Z"},
        {"key": "k", "value": "tie-1", "attached_ts": "2026-02-01T00:00:00Z"},
        {"key": "k", "value": "pre-1970", "attached_ts": "1960-01-01T00:00:00Z"},
        {"key": "k", "value": "tie-2", "attached_ts": "2026-02-01T00:00:00Z"},
        {"key": "k", "value": "later-by-1ns", "attached_ts": "2026-02-01T00:00:00.000000001Z"},
        {"key": "k", "value": "none-2"},
        {"key": "k", "value": "morning", "attached_ts": "2026-01-31T06:00:00Z"},
    )
    assert _values(repo.list_metadata(_request())) == [
        b"later-by-1ns",
        b"tie-2",
        b"tie-1",
        b"noon",
        b"morning",
        b"pre-1970",
        b"none-2",
        b"none-1",
    ]


def test_constructor_copies_its_messages() -> None:
    entry = InstanceMetadata(key="k", value=b"v")
    repo = StaticRepository({Pin(PACKAGE, SHA1_ID): [entry]})
    entry.value = b"changed"
    assert _values(repo.list_metadata(_request())) == [b"v"]
    # And answers are copies too.
    repo.list_metadata(_request()).metadata[0].value = b"changed"
    assert _values(repo.list_metadata(_request())) == [b"v"]


# --- paging -----------------------------------------------------------------


def _fifteen() -> StaticRepository:
    return _repo(
        *({"key": "k", "value": str(n), "attached_ts": f"2026-01-01T00:00:{n:02d}Z"} for n in range(15))
    )


def test_paging_with_opaque_tokens() -> None:
    repo = _fifteen()
    request = _request(page_size=7)
    first = repo.list_metadata(request)
    assert _values(first) == [str(n).encode() for n in range(14, 7, -1)]
    token = first.next_page_token
    assert token and not token.isdigit()
    pages = _list_all(repo, _request(page_size=7))
    assert [len(p) for p in pages] == [7, 7, 1]
    assert [v for page in pages for v in page] == [str(n).encode() for n in range(14, -1, -1)]
    # Tokens carry no server state: the same token gives the same page again.
    again = _request(page_size=7, page_token=token)
    assert repo.list_metadata(again) == repo.list_metadata(again)


def test_page_size_exactly_fits() -> None:
    assert [len(p) for p in _list_all(_fifteen(), _request(page_size=15))] == [15]
    assert [len(p) for p in _list_all(_fifteen(), _request(page_size=5))] == [5, 5, 5]


def test_paging_with_keys() -> None:
    repo = _repo(*({"key": "ab"[n % 2], "value": str(n)} for n in range(10)))
    pages = _list_all(repo, _request(keys=("a",), page_size=2))
    assert pages == [[b"8", b"6"], [b"4", b"2"], [b"0"]]


@pytest.mark.parametrize(
    "token",
    ["garbage", "!!!!", "é", "MTA=", "LTE6YWJj", "=", "Zm9vOmJhcjpiYXo="],
)
def test_garbage_page_token_is_invalid_argument(token: str) -> None:
    error = _invalid_argument(_fifteen(), _request(page_size=7, page_token=token))
    assert "page token" in error.message


def test_token_from_another_query_is_invalid_argument() -> None:
    repo = _fifteen()
    token = repo.list_metadata(_request(page_size=7)).next_page_token
    _invalid_argument(repo, _request(page_size=7, page_token=token, keys=("k",)))
    _invalid_argument(repo, _request(page_size=7, page_token=token, package="other/pkg"))
    _invalid_argument(repo, _request(page_size=7, page_token=token, instance_id=SHA256_ID))
    # The page size may change between pages; the query may not.
    assert len(repo.list_metadata(_request(page_size=3, page_token=token)).metadata) == 3


def test_default_and_maximum_page_size() -> None:
    repo = _repo(*({"key": "k", "value": str(n)} for n in range(MAX_PAGE_SIZE + 1)))
    first = repo.list_metadata(_request())
    assert len(first.metadata) == REPOSITORY_PAGE_SIZE == 100
    assert first.next_page_token
    assert len(repo.list_metadata(_request(page_size=0)).metadata) == REPOSITORY_PAGE_SIZE
    assert len(repo.list_metadata(_request(page_size=10**6)).metadata) == MAX_PAGE_SIZE


def test_bad_requests_are_invalid_argument() -> None:
    repo = _fifteen()
    _invalid_argument(repo, _request(page_size=-1))
    bad_ref = ListMetadataRequest(
        package=PACKAGE, instance=ObjectRef(hash_algo=HASH_ALGO_UNSPECIFIED, hex_digest="ab" * 20)
    )
    assert "unspecified" in _invalid_argument(repo, bad_ref).message
    _invalid_argument(repo, ListMetadataRequest(package=PACKAGE))
    _invalid_argument(repo, _request(package="Bad"))


# --- malformed files --------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(RepositoryFileError, match="cannot read metadata file") as info:
        StaticRepository.from_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(RepositoryFileError, match="cannot read"):
        StaticRepository.from_file(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"{", b"{'instances': []}", b"\xff\xfe{}", b'{"instances": [] } trailing']
)
def test_file_that_is_not_json(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(RepositoryFileError, match="is not valid JSON") as info:
        StaticRepository.from_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("depth", [100_000, 995])
def test_deeply_nested_file(tmp_path: Path, depth: int) -> None:
    """Too deep for the JSON parser, or just deep enough to parse: a file error either way."""
    path = tmp_path / "deep.json"
    path.write_text('{"instances": ' + "[" * depth + "]" * depth + "}", encoding="utf-8")
    with pytest.raises(RepositoryFileError) as info:
        StaticRepository.from_file(path)
    assert str(path) in str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wrong.json"
    path.write_text('{"instances": [{"package": "a", "instance_id": "x"}]}', encoding="utf-8")
    with pytest.raises(RepositoryFileError) as info:
        StaticRepository.from_file(path)
    assert str(info.value).startswith(f"{path}: instances[0]: invalid instance ID 'x'")


def test_lone_surrogate_in_file(tmp_path: Path) -> None:
    path = tmp_path / "surrogate.json"
    entry = '{"key": "k", "value": "\\ud800"}'
    path.write_text(
        f'{{"instances": [{{"package": "a", "instance_id": "{SHA1_ID}", "metadata": [{entry}]}}]}}',
        encoding="utf-8",
    )
    with pytest.raises(RepositoryFileError, match=r"metadata\[0\]\.value: not valid Unicode text"):
        StaticRepository.from_file(path)


def _with_entry(**entry: Any) -> dict[str, Any]:
    return {"instances": [{"package": "a", "instance_id": SHA1_ID, "metadata": [entry]}]}


def _with_instance(**instance: Any) -> dict[str, Any]:
    return {"instances": [instance]}


ENTRY = "src: instances[0].metadata[0]"

MALFORMED: list[tuple[str, Any, str]] = [
    ("top-list", [], "src: expected an object with an 'instances' list"),
    ("top-null", None, "src: expected an object with an 'instances' list"),
    ("no-instances", {}, "src: expected an object with an 'instances' list"),
    ("instances-object", {"instances": {}}, "src: expected an object with an 'instances' list"),
    ("top-unknown", {"instances": [], "instance": []}, "src: unknown field(s) instance"),
    ("instance-not-object", {"instances": [1]}, "src: instances[0]: expected an object"),
    ("no-package", _with_instance(instance_id=SHA1_ID), "src: instances[0]: missing 'package'"),
    ("no-instance-id", _with_instance(package="a"), "src: instances[0]: missing 'instance_id'"),
    (
        "package-type",
        _with_instance(package=1, instance_id=SHA1_ID),
        "src: instances[0].package: expected str, got int",
    ),
    (
        "instance-id-type",
        _with_instance(package="a", instance_id=None),
        "src: instances[0].instance_id: expected str, got NoneType",
    ),
    (
        "bad-package",
        _with_instance(package="A", instance_id=SHA1_ID),
        "src: instances[0]: invalid package name 'A'",
    ),
    (
        "bad-instance-id",
        _with_instance(package="a", instance_id=SHA1_ID.upper()),
        f"src: instances[0]: invalid instance ID '{SHA1_ID.upper()}'",
    ),
    (
        "instance-unknown",
        _with_instance(package="a", instance_id=SHA1_ID, metdata=[]),
        "src: instances[0]: unknown field(s) metdata",
    ),
    (
        "metadata-type",
        _with_instance(package="a", instance_id=SHA1_ID, metadata={}),
        "src: instances[0].metadata: expected a list",
    ),
    (
        "entry-type",
        _with_instance(package="a", instance_id=SHA1_ID, metadata=["k=v"]),
        f"{ENTRY}: expected an object",
    ),
    ("no-key", _with_entry(value="v"), f"{ENTRY}: missing 'key'"),
    ("empty-key", _with_entry(key="", value="v"), f"{ENTRY}.key: '' is not a metadata key"),
    ("upper-case-key", _with_entry(key="Key", value="v"), f"{ENTRY}.key: 'Key' is not a metadata key"),
    ("key-with-colon", _with_entry(key="k:x", value="v"), f"{ENTRY}.key: 'k:x' is not a metadata key"),
    ("long-key", _with_entry(key="k" * 401, value="v"), "is not a metadata key (1 to 400"),
    ("long-value", _with_entry(key="k", value="v" * (512 * 1024 + 1)), "more than 524288"),
    ("key-type", _with_entry(key=1, value="v"), f"{ENTRY}.key: expected str, got int"),
    ("both-values", _with_entry(key="k", value="v", value_base64="dg=="), "exactly one of 'value' and"),
    ("no-value", _with_entry(key="k"), f"{ENTRY}: give exactly one of 'value' and 'value_base64'"),
    ("value-type", _with_entry(key="k", value=1), f"{ENTRY}.value: expected str, got int"),
    ("value-bytes-list", _with_entry(key="k", value=[1]), f"{ENTRY}.value: expected str, got list"),
    ("base64-chars", _with_entry(key="k", value_base64="***"), f"{ENTRY}.value_base64:"),
    ("base64-padding", _with_entry(key="k", value_base64="dg"), f"{ENTRY}.value_base64:"),
    ("base64-non-ascii", _with_entry(key="k", value_base64="é"), f"{ENTRY}.value_base64:"),
    ("base64-type", _with_entry(key="k", value_base64=None), f"{ENTRY}.value_base64: expected str"),
    ("entry-unknown", _with_entry(key="k", value="v", colour="red"), f"{ENTRY}: unknown field(s) colour"),
    ("content-type", _with_entry(key="k", value="v", content_type=1), f"{ENTRY}.content_type: expected str"),
    ("attached-by", _with_entry(key="k", value="v", attached_by=[]), f"{ENTRY}.attached_by: expected str"),
    ("fingerprint", _with_entry(key="k", value="v", fingerprint=0), f"{ENTRY}.fingerprint: expected str"),
    (
        "ts-type",
        _with_entry(key="k", value="v", attached_ts=0),
        f"{ENTRY}.attached_ts: expected str, got int",
    ),
    ("ts-words", _with_entry(key="k", value="v", attached_ts="yesterday"), "'yesterday' is not an RFC 3339"),
    ("ts-date-only", _with_entry(key="k", value="v", attached_ts="2026-01-31"), "is not an RFC 3339 time"),
    ("ts-no-day", _with_entry(key="k", value="v", attached_ts="2026-02-30T00:00:00Z"), "not an RFC 3339"),
    ("ts-hour-24", _with_entry(key="k", value="v", attached_ts="2026-01-31T24:00:00Z"), "not an RFC 3339"),
    (
        "ts-offset",
        _with_entry(key="k", value="v", attached_ts="2026-01-31T12:00:00+24:00"),
        "not an RFC 3339",
    ),
    (
        "ts-nanos-10",
        _with_entry(key="k", value="v", attached_ts="2026-01-31T12:00:00.1234567890Z"),
        "RFC 3339",
    ),
    ("ts-newline", _with_entry(key="k", value="v", attached_ts="2026-01-31T12:00:00Z\n"), "RFC 3339"),
    (
        "ts-before-year-1",
        _with_entry(key="k", value="v", attached_ts="0001-01-01T00:00:00+01:00"),
        f"{ENTRY}.attached_ts: '0001-01-01T00:00:00+01:00' is outside years 1 to 9999",
    ),
    (
        "ts-after-9999",
        _with_entry(key="k", value="v", attached_ts="9999-12-31T23:00:00-01:00"),
        "is outside years 1 to 9999",
    ),
    ("surrogate-key", _with_entry(key="\ud800", value="v"), f"{ENTRY}.key: not valid Unicode text"),
    (
        "surrogate-content-type",
        _with_entry(key="k", value="v", content_type="\udfff"),
        f"{ENTRY}.content_type: not valid Unicode text",
    ),
    (
        "second-instance",
        {
            "instances": [
                {"package": "a", "instance_id": SHA1_ID},
                {"package": "b", "instance_id": SHA1_ID, "metadata": [{"key": "k", "value": "v"}, {}]},
            ]
        },
        "src: instances[1].metadata[1]: missing 'key'",
    ),
]


@pytest.mark.parametrize(("data", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_data(data: Any, fragment: str) -> None:
    with pytest.raises(RepositoryFileError) as info:
        StaticRepository.from_json(data, source="src")
    assert fragment in str(info.value)
    assert str(info.value).startswith("src")


def test_repository_file_error_is_a_value_error() -> None:
    assert issubclass(RepositoryFileError, ValueError)
    assert not issubclass(RepositoryFileError, AdmissionError)


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.just("\ud800")
)
_json = st.recursive(
    _json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_timestamps = st.sampled_from(
    [
        "2026-01-31T12:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-00:01",
        "2026-13-01T00:00:00Z",
        "2026-01-31T12:00:00+99:00",
        "1970-01-01T00:00:00.5",
    ]
) | st.text(alphabet="0123456789-:.TZ+ ", max_size=30)
_texts = st.text(max_size=6) | st.sampled_from(["\ud800", "é", ""])
_values_text = _texts | _json
_values_base64 = st.sampled_from(["dg==", "dg", "", "é", "\ud800", "d g="]) | _json
_optional_fields = {
    "content_type": _texts | _json,
    "attached_by": _texts | _json,
    "attached_ts": _timestamps | _json,
    "fingerprint": _texts | _json,
}
# Mostly well-formed skeletons, so that the deep paths get exercised, and
# anything at all in every position.
_entries = (
    st.fixed_dictionaries({"key": st.just("k"), "value": _values_text}, optional=_optional_fields)
    | st.fixed_dictionaries({"key": st.just("k"), "value_base64": _values_base64}, optional=_optional_fields)
    | st.fixed_dictionaries(
        {},
        optional={
            **_optional_fields,
            "key": _texts | _json,
            "value": _values_text,
            "value_base64": _values_base64,
            "extra": _json,
        },
    )
    | _json
)
_instances = st.fixed_dictionaries(
    {"package": st.sampled_from(["a", "a/b"]), "instance_id": st.sampled_from([SHA1_ID, SHA256_ID])},
    optional={"metadata": st.lists(_entries, min_size=1, max_size=3)},
) | st.fixed_dictionaries(
    {},
    optional={
        "package": st.sampled_from(["a", "A", "", "./a", "a\n"]) | _json,
        "instance_id": st.sampled_from([SHA1_ID, "x", SHA1_ID.upper()]) | _json,
        "metadata": st.lists(_entries, max_size=3) | _json,
        "metdata": _json,
    },
)
_documents = (
    st.fixed_dictionaries({"instances": st.lists(_instances, min_size=1, max_size=3)})
    | st.fixed_dictionaries(
        {}, optional={"instances": st.lists(_instances | _json, max_size=3) | _json, "other": _json}
    )
    | _json
)


@FUZZ
@given(_documents)
def test_from_json_accepts_or_raises_repository_file_error(data: Any) -> None:
    try:
        repo = StaticRepository.from_json(data)
    except RepositoryFileError:
        return
    expected: dict[tuple[str, str], int] = {}
    for instance in data["instances"]:
        pin = (instance["package"], instance["instance_id"])
        expected[pin] = expected.get(pin, 0) + len(instance.get("metadata", []))
    for (package, instance_id), count in expected.items():
        response = repo.list_metadata(_request(package, instance_id, page_size=MAX_PAGE_SIZE))
        assert len(response.metadata) == count


# --- Config -----------------------------------------------------------------


def test_config() -> None:
    repo = StaticRepository()
    config = Config("https://cipd.example.com", repo)
    assert (config.service_url, config.repository) == ("https://cipd.example.com", repo)
    assert Config(DEFAULT_SERVICE_URL).repository is None
    assert DEFAULT_SERVICE_URL == "https://chrome-infra-packages.appspot.com"


@pytest.mark.parametrize(
    "url",
    [
        "",
        None,
        1,
        "not a url",
        "cipd.example.com",
        "ftp://cipd.example.com",
        "https://",
        "https://:443",
        "https://cipd.example.com/path",
        "https://cipd.example.com:port",
        "https://cipd example.com",
    ],
)
def test_config_rejects_a_bad_url(url: Any) -> None:
    with pytest.raises(ValueError, match="service_url must be an http:// or https:// URL") as caught:
        Config(url)
    assert repr(url) in str(caught.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "https://x/", "https://[::1]:5", "HTTPS://X"])
def test_config_accepts_the_root_url_of_a_backend(url: str) -> None:
    assert Config(url).service_url == url


class _NotCallable:
    list_metadata = None


@pytest.mark.parametrize("repository", [object(), "repo", _NotCallable()])
def test_config_rejects_a_repository_without_list_metadata(repository: Any) -> None:
    with pytest.raises(TypeError, match="list_metadata"):
        Config("https://cipd.example.com", repository)


def test_config_accepts_any_object_with_list_metadata() -> None:
    class Answering:
        def list_metadata(self, request: ListMetadataRequest) -> ListMetadataResponse:
            return ListMetadataResponse()

    assert isinstance(Config("https://x", Answering()).repository, Answering)


# --- errors -----------------------------------------------------------------


def test_error_hierarchy_and_default_codes() -> None:
    cases: list[tuple[AdmissionError, grpc.StatusCode]] = [
        (AdmissionDenied("no"), grpc.StatusCode.FAILED_PRECONDITION),
        (PluginStartError("did not start"), grpc.StatusCode.UNAVAILABLE),
        (PluginAbortedError("closed"), grpc.StatusCode.ABORTED),
        (InvalidPinError("bad pin"), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for error, code in cases:
        assert isinstance(error, AdmissionError)
        assert error.code is code


def test_errors_take_the_message_first_and_accept_the_code_first() -> None:
    assert AdmissionError("boom", code=grpc.StatusCode.INTERNAL).code is grpc.StatusCode.INTERNAL
    legacy = AdmissionError(grpc.StatusCode.INTERNAL, "boom")
    assert (legacy.code, legacy.message, legacy.args) == (grpc.StatusCode.INTERNAL, "boom", ("boom",))
    assert AdmissionError("boom").code is grpc.StatusCode.UNKNOWN
    with pytest.raises(TypeError):
        AdmissionError("boom", code="INTERNAL")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AdmissionDenied("boom", "again")
    with pytest.raises(TypeError):
        AdmissionError(grpc.StatusCode.INTERNAL, "boom", code=grpc.StatusCode.INTERNAL)


def test_error_str_and_repr() -> None:
    error = AdmissionError("boom", code=grpc.StatusCode.INTERNAL)
    assert str(error) == "INTERNAL: boom"
    assert repr(error) == "AdmissionError('boom', code=<StatusCode.INTERNAL: (13, 'internal')>)"
    assert str(AdmissionError("", code=grpc.StatusCode.INTERNAL)) == "INTERNAL"
    assert str(AdmissionDenied("not on the list")) == "FAILED_PRECONDITION: not on the list"
    assert str(AdmissionDenied("x", code=grpc.StatusCode.PERMISSION_DENIED)).startswith("PERMISSION_DENIED")
    assert str(InvalidPinError("invalid pin 'x'")) == "invalid pin 'x'"


@pytest.mark.parametrize(
    "error",
    [
        AdmissionError("boom", code=grpc.StatusCode.INTERNAL),
        AdmissionDenied("no"),
        AdmissionDenied("no", code=grpc.StatusCode.PERMISSION_DENIED),
        PluginStartError("exited with code 2"),
        PluginAbortedError("terminating"),
        InvalidPinError("bad"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickle_and_copy(error: AdmissionError) -> None:
    # Futures may carry these across processes (e.g. ProcessPoolExecutor).
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(clone) is type(error)
        assert (clone.code, clone.message, str(clone), repr(clone)) == (
            error.code,
            error.message,
            str(error),
            repr(error),
        )
