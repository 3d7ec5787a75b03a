"""Package names, instance IDs and pins, and the instance ID <-> ObjectRef codec.

An instance ID has one of two forms:

* 40 lowercase hex characters: the legacy SHA-1 form;
* unpadded URL-safe base64 of the digest bytes followed by one byte holding
  the hash algorithm number (a SHA-256 ID is 44 characters).

The Go client (``decodeObjectRef``) accepts a base64 ID only if it has at
least 28 characters and decodes to an odd number of bytes (a digest of an
even number of bytes, and the algorithm byte), with a nonzero algorithm, and
a SHA-1 or SHA-256 digest of the right size; a digest of an algorithm it does
not know may have any (even) size. Every ID accepted here is accepted by Go
and names the same ``ObjectRef``. A few IDs Go accepts are refused here so
that every valid ID has exactly one spelling and both conversions round-trip
exactly: the base64 spelling of a SHA-1 digest (Go writes SHA-1 IDs in the
legacy hex form), non-canonical base64 (stray bits in the last character),
and IDs with CR or LF characters in them (Go's base64 decoder skips those).
Every 40-character ID is read as the legacy form, as in Go.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cipdplugin.errors import InvalidPinError
from cipdplugin.protocol.cipd_pb2 import HASH_ALGO_UNSPECIFIED, SHA1, SHA256, ObjectRef

# Matched with fullmatch: "$" would also accept a trailing newline.
_PACKAGE_NAME = re.compile(r"([a-z0-9_\-.]+/)*[a-z0-9_\-.]+")
_LEGACY_HEX_ID = re.compile(r"[0-9a-f]{40}")
_BASE64_URL = re.compile(r"[A-Za-z0-9_-]+")
_LOWER_HEX = re.compile(r"(?:[0-9a-f]{2})*")

#: Digest length in bytes of each known hash algorithm.
DIGEST_SIZES: dict[int, int] = {SHA1: 20, SHA256: 32}
#: The Go client's shortest base64 instance ID (it assumes digests of at least 160 bits).
MIN_ENCODED_ID = 28
#: The smallest digest, in bytes, whose base64 ID is that long: 20 bytes and
#: the algorithm byte make 28 characters.
_MIN_DIGEST_BYTES = 20


def validate_package_name(name: str) -> str:
    """Return ``name`` if it is a valid package name, else raise ``InvalidPinError``."""
    if not isinstance(name, str) or not _PACKAGE_NAME.fullmatch(name):
        raise InvalidPinError(
            f"invalid package name {name!r}: use lowercase letters, digits and '_-.', "
            "with '/' between path components"
        )
    if any(part.strip(".") == "" for part in name.split("/")):
        raise InvalidPinError(f"invalid package name {name!r}: a path component consists of dots only")
    return name


def _validate_digest(algo: int, hex_digest: str, what: str) -> None:
    if algo == HASH_ALGO_UNSPECIFIED:
        raise InvalidPinError(f"invalid {what}: hash algorithm is unspecified")
    if not 0 < algo < 256:
        raise InvalidPinError(f"invalid {what}: hash algorithm {algo} does not fit in one byte")
    if not _LOWER_HEX.fullmatch(hex_digest):
        raise InvalidPinError(f"invalid {what}: digest {hex_digest!r} is not lowercase hex")
    size = len(hex_digest) // 2
    expected = DIGEST_SIZES.get(algo)
    if expected is not None and size != expected:
        raise InvalidPinError(f"invalid {what}: a {_algo_name(algo)} digest has {expected} bytes, got {size}")
    if size % 2:
        raise InvalidPinError(f"invalid {what}: a digest has an even number of bytes, got {size}")
    if size < _MIN_DIGEST_BYTES:
        raise InvalidPinError(
            f"invalid {what}: digest of {size} bytes for unknown hash algorithm {algo}; "
            f"at least {_MIN_DIGEST_BYTES} are needed"
        )


def _algo_name(algo: int) -> str:
    names: dict[int, str] = {SHA1: "SHA1", SHA256: "SHA256"}
    return names.get(algo, f"algorithm {algo}")


def instance_id_to_object_ref(instance_id: str) -> ObjectRef:
    """Convert an instance ID into the ``ObjectRef`` it names.

    Raises:
        InvalidPinError: the ID is malformed (see the module docs for the forms).
    """
    if not isinstance(instance_id, str):
        raise InvalidPinError(f"invalid instance ID {instance_id!r}: not a string")
    if len(instance_id) == 40 and _LEGACY_HEX_ID.fullmatch(instance_id):
        return ObjectRef(hash_algo=SHA1, hex_digest=instance_id)
    what = f"instance ID {instance_id!r}"
    if len(instance_id) == 40:
        raise InvalidPinError(f"invalid {what}: a 40-character instance ID must be lowercase hex")
    if not _BASE64_URL.fullmatch(instance_id) or len(instance_id) % 4 == 1:
        raise InvalidPinError(
            f"invalid {what}: expected 40 lowercase hex characters or unpadded URL-safe base64"
        )
    if len(instance_id) < MIN_ENCODED_ID:
        raise InvalidPinError(
            f"invalid {what}: a base64 instance ID has at least {MIN_ENCODED_ID} characters, "
            f"got {len(instance_id)}"
        )
    try:
        blob = base64.urlsafe_b64decode(instance_id + "=" * (-len(instance_id) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidPinError(f"invalid {what}: bad base64 ({exc})") from None
    if _encode_id(blob) != instance_id:
        raise InvalidPinError(f"invalid {what}: non-canonical base64")
    if len(blob) % 2 == 0:
        # Checked before the algorithm, as Go does, so the message is Go's reason.
        raise InvalidPinError(f"invalid {what}: a digest has an even number of bytes, got {len(blob) - 1}")
    ref = ObjectRef(hash_algo=blob[-1], hex_digest=blob[:-1].hex())  # type: ignore[arg-type]
    _validate_digest(blob[-1], ref.hex_digest, what)
    if blob[-1] == SHA1:
        raise InvalidPinError(f"invalid {what}: SHA1 instance IDs are written as 40 hex characters")
    return ref


def object_ref_to_instance_id(ref: ObjectRef) -> str:
    """Convert an ``ObjectRef`` into its canonical instance ID.

    Raises:
        InvalidPinError: the algorithm is unspecified or out of range, or the
            digest is not lowercase hex of a length that fits the algorithm.
    """
    _validate_digest(
        ref.hash_algo, ref.hex_digest, f"object ref ({_algo_name(ref.hash_algo)}, {ref.hex_digest!r})"
    )
    if ref.hash_algo == SHA1:
        return ref.hex_digest
    return _encode_id(bytes.fromhex(ref.hex_digest) + bytes([ref.hash_algo]))


def _encode_id(blob: bytes) -> str:
    return base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=")


def validate_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it is valid, else raise ``InvalidPinError``."""
    instance_id_to_object_ref(instance_id)
    return instance_id


@dataclass(frozen=True, slots=True)
class Pin:
    """A package name and one of its instances: what a deployment installs.

    Construction validates both fields and raises ``InvalidPinError`` naming
    the bad one.
    """

    package: str
    instance_id: str

    def __post_init__(self) -> None:
        validate_package_name(self.package)
        validate_instance_id(self.instance_id)

    def __str__(self) -> str:
        return f"{self.package}:{self.instance_id}"

    @property
    def object_ref(self) -> ObjectRef:
        """The instance as an ``ObjectRef`` (a new message on each access)."""
        return instance_id_to_object_ref(self.instance_id)

    @classmethod
    def parse(cls, text: str) -> Pin:
        """Parse ``"package:instance_id"``, the inverse of ``str(pin)``.

        Raises:
            InvalidPinError: there is no single ':' or either half is invalid.
        """
        if not isinstance(text, str) or text.count(":") != 1:
            raise InvalidPinError(f"invalid pin {text!r}: expected 'package:instance_id'")
        package, instance_id = text.split(":")
        return cls(package, instance_id)
