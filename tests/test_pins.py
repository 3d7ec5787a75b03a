"""Pins, package names, and the instance ID <-> ObjectRef codec."""

from __future__ import annotations

import base64
import dataclasses
import pickle
import string

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cipdplugin import AdmissionError, InvalidPinError, ObjectRef, Pin
from cipdplugin.pins import (
    instance_id_to_object_ref,
    object_ref_to_instance_id,
    validate_instance_id,
    validate_package_name,
)
from cipdplugin.protocol.cipd_pb2 import HASH_ALGO_UNSPECIFIED, SHA1, SHA256

SHA1_HEX = "0123456789abcdef0123456789abcdef01234567"
SHA256_HEX = "abcdef0123456789" * 4
# base64url(bytes.fromhex(SHA256_HEX) + b"\x02"), worked out by hand: every
# 3 bytes ab cd ef | 01 23 45 | 67 89 .. spell "q83v" "ASNF" "Z4mr" ...
SHA256_ID = "q83vASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4kC"

FUZZ = settings(max_examples=200, deadline=None)


def _b64_id(digest: bytes, algo: int) -> str:
    return base64.urlsafe_b64encode(digest + bytes([algo])).decode("ascii").rstrip("=")


# --- the two ID forms -------------------------------------------------------


def test_sha1_hex_form() -> None:
    ref = instance_id_to_object_ref(SHA1_HEX)
    assert ref == ObjectRef(hash_algo=SHA1, hex_digest=SHA1_HEX)
    assert object_ref_to_instance_id(ref) == SHA1_HEX


def test_sha256_base64_form() -> None:
    assert _b64_id(bytes.fromhex(SHA256_HEX), SHA256) == SHA256_ID
    assert len(SHA256_ID) == 44
    ref = instance_id_to_object_ref(SHA256_ID)
    assert ref == ObjectRef(hash_algo=SHA256, hex_digest=SHA256_HEX)
    assert object_ref_to_instance_id(ref) == SHA256_ID


def test_base64_form_is_url_safe() -> None:
    # 0xfb 0xff ... encodes to "-" and "_" in the URL-safe alphabet.
    digest = b"\xfb\xff" * 16
    iid = _b64_id(digest, SHA256)
    assert "-" in iid and "_" in iid
    assert instance_id_to_object_ref(iid).hex_digest == digest.hex()
    assert validate_instance_id(iid) == iid


@pytest.mark.parametrize(("algo", "size"), [(3, 20), (3, 28), (7, 30), (200, 32), (255, 64), (9, 200)])
def test_unknown_algorithm_with_sane_digest_is_accepted(algo: int, size: int) -> None:
    digest = bytes(range(size))
    iid = _b64_id(digest, algo)
    ref = instance_id_to_object_ref(iid)
    assert (ref.hash_algo, ref.hex_digest) == (algo, digest.hex())
    assert object_ref_to_instance_id(ref) == iid
    assert str(Pin("a", iid)) == f"a:{iid}"


# --- rejected instance IDs --------------------------------------------------


def _non_canonical() -> str:
    # 23 bytes make 31 characters, 2 bits of which are unused and must be 0.
    canonical = _b64_id(bytes(22), 3)
    last = canonical[-1]
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    return canonical[:-1] + alphabet[alphabet.index(last) + 1]


@pytest.mark.parametrize(
    ("instance_id", "fragment"),
    [
        pytest.param("", "expected 40 lowercase hex characters or unpadded URL-safe base64", id="empty"),
        pytest.param(SHA1_HEX + "0", "unpadded URL-safe base64", id="hex-41"),
        pytest.param(SHA1_HEX.upper(), "must be lowercase hex", id="hex-upper"),
        pytest.param("A" + SHA1_HEX[1:], "must be lowercase hex", id="hex-one-upper"),
        pytest.param("g" * 40, "must be lowercase hex", id="40-non-hex"),
        pytest.param("+" * 40, "must be lowercase hex", id="40-symbols"),
        pytest.param(SHA1_HEX + "\n", "unpadded URL-safe base64", id="hex-newline"),
        pytest.param(SHA256_ID + "\n", "unpadded URL-safe base64", id="b64-newline"),
        pytest.param(" " + SHA256_ID, "unpadded URL-safe base64", id="b64-space"),
        pytest.param(SHA256_ID[:-4] + "+/+C", "unpadded URL-safe base64", id="std-alphabet"),
        pytest.param(SHA256_ID + "==", "unpadded URL-safe base64", id="padded"),
        pytest.param(SHA256_ID[:-1] + "é", "unpadded URL-safe base64", id="non-ascii"),
        pytest.param(SHA256_ID + "A", "unpadded URL-safe base64", id="length-1-mod-4"),
        pytest.param(_non_canonical(), "non-canonical base64", id="non-canonical"),
        pytest.param(_b64_id(bytes(31), SHA256), "an even number of bytes, got 31", id="sha256-short-odd"),
        pytest.param(_b64_id(bytes(30), SHA256), "a SHA256 digest has 32 bytes, got 30", id="sha256-short"),
        pytest.param(_b64_id(bytes(34), SHA256), "a SHA256 digest has 32 bytes, got 34", id="sha256-long"),
        pytest.param(_b64_id(bytes(20), SHA1), "SHA1 instance IDs are written as 40 hex", id="sha1-base64"),
        pytest.param(_b64_id(bytes(22), SHA1), "a SHA1 digest has 20 bytes, got 22", id="sha1-long"),
        pytest.param(_b64_id(bytes(32), HASH_ALGO_UNSPECIFIED), "hash algorithm is unspecified", id="algo-0"),
        pytest.param(_b64_id(bytes(18), 3), "at least 28 characters, got 26", id="unknown-18"),
        pytest.param(_b64_id(bytes(65), 3), "an even number of bytes, got 65", id="unknown-65"),
        # The example the Go client refuses: 32 decoded bytes, "the digest can't be odd".
        pytest.param(
            "qUiQTy8PR5uPgZdpSzAYSw0u0cHNKh7A-4XSmaGSpEc", "an even number of bytes, got 31", id="algo-71-odd"
        ),
        pytest.param("Ag", "at least 28 characters, got 2", id="algo-byte-only"),
    ],
)
def test_malformed_instance_id(instance_id: str, fragment: str) -> None:
    with pytest.raises(InvalidPinError) as info:
        instance_id_to_object_ref(instance_id)
    assert fragment in str(info.value)
    assert repr(instance_id) in str(info.value)
    with pytest.raises(InvalidPinError):
        validate_instance_id(instance_id)


@pytest.mark.parametrize("value", [None, 123, b"a" * 40, ["a" * 40]])
def test_instance_id_must_be_a_string(value: object) -> None:
    with pytest.raises(InvalidPinError, match="not a string"):
        instance_id_to_object_ref(value)  # type: ignore[arg-type]


def test_unknown_algorithm_digest_that_would_look_like_sha1_is_rejected() -> None:
    # 29 bytes + the algorithm byte encode to 40 characters: the length that
    # is always read as the legacy hex form. An odd digest is refused anyway.
    with pytest.raises(InvalidPinError, match="an even number of bytes, got 29"):
        object_ref_to_instance_id(ObjectRef(hash_algo=3, hex_digest="ab" * 29))  # type: ignore[arg-type]
    with pytest.raises(InvalidPinError, match="must be lowercase hex"):
        instance_id_to_object_ref(_b64_id(bytes(29), 3))


# --- rejected object refs ---------------------------------------------------


@pytest.mark.parametrize(
    ("algo", "hex_digest", "fragment"),
    [
        pytest.param(HASH_ALGO_UNSPECIFIED, SHA256_HEX, "hash algorithm is unspecified", id="unspecified"),
        pytest.param(256, SHA256_HEX, "hash algorithm 256 does not fit in one byte", id="algo-256"),
        pytest.param(-1, SHA256_HEX, "hash algorithm -1 does not fit in one byte", id="algo-negative"),
        pytest.param(SHA256, "zz" * 32, "is not lowercase hex", id="bad-hex"),
        pytest.param(SHA256, SHA256_HEX.upper(), "is not lowercase hex", id="upper-hex"),
        pytest.param(SHA256, SHA256_HEX[:-1], "is not lowercase hex", id="odd-length"),
        pytest.param(SHA256, SHA256_HEX + "\n", "is not lowercase hex", id="newline"),
        pytest.param(SHA256, " " + SHA256_HEX[1:], "is not lowercase hex", id="space"),
        pytest.param(SHA1, SHA1_HEX + "\n", "is not lowercase hex", id="sha1-newline"),
        pytest.param(SHA1, SHA1_HEX.upper(), "is not lowercase hex", id="sha1-upper"),
        pytest.param(SHA1, SHA256_HEX, "a SHA1 digest has 20 bytes, got 32", id="sha1-32-bytes"),
        pytest.param(SHA256, SHA1_HEX, "a SHA256 digest has 32 bytes, got 20", id="sha256-20-bytes"),
        pytest.param(SHA256, "", "a SHA256 digest has 32 bytes, got 0", id="empty"),
        pytest.param(9, "ab" * 18, "digest of 18 bytes for unknown hash algorithm 9", id="unknown-short"),
        pytest.param(9, "ab" * 15, "an even number of bytes, got 15", id="unknown-odd"),
        pytest.param(9, "ab" * 65, "an even number of bytes, got 65", id="unknown-long-odd"),
    ],
)
def test_malformed_object_ref(algo: int, hex_digest: str, fragment: str) -> None:
    ref = ObjectRef(hash_algo=algo, hex_digest=hex_digest)  # type: ignore[arg-type]
    with pytest.raises(InvalidPinError) as info:
        object_ref_to_instance_id(ref)
    assert fragment in str(info.value)
    assert "object ref" in str(info.value)


# --- package names ----------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "a/b", "infra/tools/cipd/linux-amd64", "a-b_c.d/e0", "x/.a", "a..b/c", "_/-", "9"]
)
def test_valid_package_name(name: str) -> None:
    assert validate_package_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "use lowercase letters"),
        ("A", "use lowercase letters"),
        ("a/B", "use lowercase letters"),
        ("/a", "use lowercase letters"),
        ("a/", "use lowercase letters"),
        ("a//b", "use lowercase letters"),
        ("a b", "use lowercase letters"),
        ("a:b", "use lowercase letters"),
        ("a\\b", "use lowercase letters"),
        ("a\n", "use lowercase letters"),
        ("\na", "use lowercase letters"),
        ("é", "use lowercase letters"),
        (".", "dots only"),
        ("..", "dots only"),
        ("...", "dots only"),
        ("a/./b", "dots only"),
        ("a/../b", "dots only"),
        ("a/...", "dots only"),
        ("../a", "dots only"),
    ],
)
def test_invalid_package_name(name: str, fragment: str) -> None:
    with pytest.raises(InvalidPinError) as info:
        validate_package_name(name)
    assert fragment in str(info.value)
    assert f"invalid package name {name!r}" in str(info.value)


@pytest.mark.parametrize("value", [None, 1, b"a", ["a"]])
def test_package_name_must_be_a_string(value: object) -> None:
    with pytest.raises(InvalidPinError, match="invalid package name"):
        validate_package_name(value)  # type: ignore[arg-type]


# --- Pin --------------------------------------------------------------------


@pytest.mark.parametrize("instance_id", [SHA1_HEX, SHA256_ID])
def test_pin_str_and_parse_round_trip(instance_id: str) -> None:
    pin = Pin("infra/tools/x", instance_id)
    text = str(pin)
    assert text == f"infra/tools/x:{instance_id}"
    assert Pin.parse(text) == pin
    assert pin.object_ref == instance_id_to_object_ref(instance_id)


def test_pin_object_ref_is_a_fresh_message() -> None:
    pin = Pin("a", SHA1_HEX)
    first = pin.object_ref
    first.hex_digest = "changed"
    assert pin.object_ref.hex_digest == SHA1_HEX


def test_pin_is_a_frozen_hashable_value() -> None:
    pin = Pin("a", SHA1_HEX)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pin.package = "b"  # type: ignore[misc]
    assert {pin, Pin("a", SHA1_HEX)} == {pin}
    assert pin != Pin("b", SHA1_HEX)


def test_pin_names_the_bad_field() -> None:
    with pytest.raises(InvalidPinError) as info:
        Pin("Bad/Name", SHA1_HEX)
    assert "package name 'Bad/Name'" in str(info.value)
    with pytest.raises(InvalidPinError) as info:
        Pin("good/name", "bad-id")
    assert "instance ID 'bad-id'" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        SHA1_HEX,
        f"a:b:{SHA1_HEX}",
        f"a:{SHA1_HEX}:",
        f"a::{SHA1_HEX}",
    ],
)
def test_pin_parse_needs_exactly_one_colon(text: str) -> None:
    with pytest.raises(InvalidPinError) as info:
        Pin.parse(text)
    assert "expected 'package:instance_id'" in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(f":{SHA1_HEX}", "package name ''"), ("a:", "instance ID ''"), (f"A:{SHA1_HEX}", "package name 'A'")],
)
def test_pin_parse_validates_both_halves(text: str, fragment: str) -> None:
    with pytest.raises(InvalidPinError, match=fragment):
        Pin.parse(text)


def test_pin_parse_rejects_non_strings() -> None:
    with pytest.raises(InvalidPinError):
        Pin.parse(None)  # type: ignore[arg-type]


# --- InvalidPinError --------------------------------------------------------


def test_invalid_pin_error_is_both_value_error_and_admission_error() -> None:
    with pytest.raises(InvalidPinError) as info:
        Pin("a", "nope")
    error = info.value
    assert isinstance(error, ValueError)
    assert isinstance(error, AdmissionError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(error) == error.message
    assert error.message.startswith("invalid instance ID 'nope'")


def test_invalid_pin_error_pickles() -> None:
    error = InvalidPinError("invalid pin 'x'")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is InvalidPinError
    assert (copy.code, copy.message, str(copy)) == (error.code, error.message, str(error))


# --- properties -------------------------------------------------------------


@st.composite
def _digests(draw: st.DrawFn) -> tuple[int, bytes]:
    algo = draw(st.sampled_from([SHA1, SHA256]) | st.integers(3, 255))
    if algo == SHA1:
        size = 20
    elif algo == SHA256:
        size = 32
    else:
        size = 2 * draw(st.integers(10, 60))
    return algo, draw(st.binary(min_size=size, max_size=size))


@FUZZ
@given(_digests())
def test_round_trip_for_every_algorithm(algo_and_digest: tuple[int, bytes]) -> None:
    algo, digest = algo_and_digest
    ref = ObjectRef(hash_algo=algo, hex_digest=digest.hex())  # type: ignore[arg-type]
    iid = object_ref_to_instance_id(ref)
    assert iid == (digest.hex() if algo == SHA1 else _b64_id(digest, algo))
    assert instance_id_to_object_ref(iid) == ref
    assert Pin.parse(f"p/q:{iid}").object_ref == ref


_B64_ALPHABET = string.ascii_letters + string.digits + "-_"


@FUZZ
@given(
    st.text(max_size=60)
    | st.text(alphabet=_B64_ALPHABET, max_size=90)
    | st.text(alphabet="0123456789abcdefABCDEF", min_size=38, max_size=42)
    | st.builds(_b64_id, st.binary(max_size=70), st.integers(0, 255))
)
def test_any_text_round_trips_or_is_rejected(text: str) -> None:
    try:
        ref = instance_id_to_object_ref(text)
    except InvalidPinError:
        return
    assert object_ref_to_instance_id(ref) == text


@FUZZ
@given(
    st.integers(-3, 300),
    st.text(max_size=140) | st.binary(max_size=70).map(bytes.hex),
)
def test_any_object_ref_round_trips_or_is_rejected(algo: int, hex_digest: str) -> None:
    ref = ObjectRef(hash_algo=algo, hex_digest=hex_digest)  # type: ignore[arg-type]
    try:
        iid = object_ref_to_instance_id(ref)
    except InvalidPinError:
        return
    assert instance_id_to_object_ref(iid) == ref


@FUZZ
@given(st.text(max_size=30) | st.text(alphabet="ab./_-", max_size=12))
def test_any_package_name_is_accepted_or_rejected_cleanly(name: str) -> None:
    try:
        validate_package_name(name)
    except InvalidPinError:
        return
    parts = name.split("/")
    assert all(parts) and not any(set(part) == {"."} for part in parts)
    assert set(name) <= set(string.ascii_lowercase + string.digits + "_-./")


# --- the Go client's rules (luci-go cipd/common/iid.go) ------------------------
#
# The Go client's verdict on an instance ID, restated from its rules:
# ValidateInstanceID with AnyHash, and decodeObjectRef for non-hex IDs.
# Lengths are in bytes, as Go's len() of a string is.

_GO_B64_ALPHABET = set((string.ascii_letters + string.digits + "-_").encode())
_GO_KNOWN_DIGEST_BYTES: dict[int, int] = {SHA1: 20, SHA256: 32}


def go_decode(iid: str) -> tuple[int, str] | None:
    """(hash algorithm, hex digest) if the Go client accepts ``iid``, else None."""
    raw = iid.encode("utf-8", errors="surrogatepass")
    if len(raw) == 40:
        return (SHA1, iid) if set(raw) <= set(b"0123456789abcdef") else None
    if len(raw) < 28:
        return None
    # Go's base64 decoder skips CR and LF wherever they are, and does not
    # insist that the unused bits of the last character be zero.
    symbols = raw.replace(b"\r", b"").replace(b"\n", b"")
    if not set(symbols) <= _GO_B64_ALPHABET or len(symbols) % 4 == 1:
        return None
    blob = base64.urlsafe_b64decode(symbols + b"=" * (-len(symbols) % 4))
    if not blob or len(blob) % 2 != 1:
        return None
    algo, digest = blob[-1], blob[:-1]
    if algo == 0:
        return None
    if algo in _GO_KNOWN_DIGEST_BYTES and len(digest) != _GO_KNOWN_DIGEST_BYTES[algo]:
        return None
    return algo, digest.hex()


def ours(iid: str) -> tuple[int, str] | None:
    try:
        ref = instance_id_to_object_ref(iid)
    except InvalidPinError:
        return None
    return ref.hash_algo, ref.hex_digest


def _go_spelling_variants(blob: bytes) -> list[str]:
    """Ways to write ``blob`` that Go reads alike: canonical, with stray bits, with line breaks."""
    canonical = base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=")
    variants = [canonical, canonical[:10] + "\n" + canonical[10:], canonical + "\r\n"]
    if len(blob) % 3:
        alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
        variants.append(canonical[:-1] + alphabet[alphabet.index(canonical[-1]) + 1])
    return variants


def _is_refused_on_purpose(iid: str, go: tuple[int, str]) -> bool:
    """The spellings Go accepts and we refuse, as the module docs list them."""
    algo, hex_digest = go
    if algo == SHA1 and len(iid) != 40:
        return True  # the base64 spelling of a SHA-1 digest
    if "\r" in iid or "\n" in iid:
        return True
    return iid != object_ref_to_instance_id(ObjectRef(hash_algo=algo, hex_digest=hex_digest))  # type: ignore[arg-type]


_ID_BLOBS = st.builds(
    lambda digest, algo: digest + bytes([algo]),
    st.binary(max_size=70) | st.sampled_from([19, 20, 21, 30, 31, 32, 33]).map(bytes),
    st.integers(0, 255) | st.sampled_from([HASH_ALGO_UNSPECIFIED, SHA1, SHA256]),
)


@FUZZ
@given(
    st.text(max_size=60)
    | st.text(alphabet=_B64_ALPHABET + "\r\n", max_size=90)
    | st.text(alphabet="0123456789abcdefABCDEF", min_size=38, max_size=42)
    | _ID_BLOBS.flatmap(lambda blob: st.sampled_from(_go_spelling_variants(blob)))
)
def test_what_we_accept_the_go_client_accepts_alike(iid: str) -> None:
    """Never accept an ID Go refuses, and read every ID we accept as Go does."""
    mine = ours(iid)
    if mine is not None:
        assert go_decode(iid) == mine


@FUZZ
@given(_ID_BLOBS.flatmap(lambda blob: st.sampled_from(_go_spelling_variants(blob))))
def test_what_the_go_client_accepts_we_accept_unless_refused_on_purpose(iid: str) -> None:
    go = go_decode(iid)
    if go is not None and not _is_refused_on_purpose(iid, go):
        assert ours(iid) == go


@FUZZ
@given(st.binary(min_size=20, max_size=21).map(bytes.hex), st.integers(1, 255))
def test_hex_and_base64_boundaries_agree_with_go(hex_digest: str, algo: int) -> None:
    """40 lowercase hex characters are always SHA-1; other lengths decode as base64."""
    assert ours(hex_digest[:40]) == go_decode(hex_digest[:40]) == (SHA1, hex_digest[:40])
    blob = bytes.fromhex(hex_digest) + bytes([algo])
    iid = base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=")
    go = go_decode(iid)
    assert ours(iid) == (None if go is None or _is_refused_on_purpose(iid, go) else go)


def test_go_rules_on_examples() -> None:
    # The Go client refuses it: 32 decoded bytes, so "the digest can't be odd".
    assert go_decode("qUiQTy8PR5uPgZdpSzAYSw0u0cHNKh7A-4XSmaGSpEc") is None
    assert ours("qUiQTy8PR5uPgZdpSzAYSw0u0cHNKh7A-4XSmaGSpEc") is None
    assert go_decode(SHA256_ID) == ours(SHA256_ID) == (SHA256, SHA256_HEX)
    # An even digest of an unknown algorithm, but shorter than 28 characters.
    short = _b64_id(bytes(18), 9)
    assert len(short) == 26
    assert go_decode(short) is None and ours(short) is None
