"""The wire format, pinned byte for byte against hand-encoded messages.

Expected bytes are written out by hand from the protobuf encoding rules
(tag = field_number << 3 | wire_type; varint = 0, length-delimited = 2), so a
change to a field number, a field type, a package or a method path fails
here rather than against the Go CIPD client. Fields 20 and 21 need two-byte
tags: 20 varint is a0 01, 20 length-delimited a2 01, 21 length-delimited aa 01.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc.status_pb2 import Status

from cipdplugin import protocol
from cipdplugin.host.checks import admission_id
from cipdplugin.plugins import admission
from cipdplugin.plugins.logs import HostLogHandler
from cipdplugin.protocol import cipd_pb2, plugin_pb2

# ObjectRef(hash_algo=SHA256, hex_digest="abcd"): 08 02 | 12 04 "abcd".
OBJECT_REF_SHA256 = b"\x08\x02\x12\x04abcd"
OBJECT_REF_SHA1 = b"\x08\x01\x12\x04abcd"


def _wire_cases() -> list[tuple[str, Message, bytes]]:
    return [
        (
            "cipd.ObjectRef",
            cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA256, hex_digest="abcd"),
            OBJECT_REF_SHA256,
        ),
        (
            "cipd.InstanceMetadata",
            cipd_pb2.InstanceMetadata(
                key="k",
                value=b"\x00\xff",
                content_type="text/plain",
                fingerprint="fp",
                attached_by="user:a",
                attached_ts=Timestamp(seconds=1, nanos=2),
            ),
            b"\x0a\x01k\x12\x02\x00\xff\x1a\x0atext/plain\x22\x02fp\x2a\x06user:a\x32\x04\x08\x01\x10\x02",
        ),
        (
            "cipd.ListMetadataRequest",
            cipd_pb2.ListMetadataRequest(
                package="a/b",
                instance=cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA256, hex_digest="abcd"),
                keys=["x", "yz"],
                page_size=300,
                page_token="t",
            ),
            b"\x0a\x03a/b"
            b"\x12\x08" + OBJECT_REF_SHA256 + b"\x1a\x01x"
            b"\x1a\x02yz"
            b"\xa0\x01\xac\x02"  # 300 = 0b10_0101100: ac 02
            b"\xaa\x01\x01t",
        ),
        (
            "cipd.ListMetadataResponse",
            cipd_pb2.ListMetadataResponse(metadata=[cipd_pb2.InstanceMetadata(key="k")], next_page_token="n"),
            b"\x0a\x03\x0a\x01k\xa2\x01\x01n",
        ),
        (
            "cipd.plugin.Handshake",
            plugin_pb2.Handshake(port=12345, ticket="tk"),
            b"\x08\xb9\x60\x12\x02tk",  # 12345 = 0x3039: b9 60
        ),
        (
            "cipd.plugin.LogRequest",
            plugin_pb2.LogRequest(severity="info", message="hi"),
            b"\x0a\x04info\x12\x02hi",
        ),
        (
            "cipd.plugin.ListMetadataRequest",
            plugin_pb2.ListMetadataRequest(
                service_url="u",
                package="p",
                instance=cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA256, hex_digest="abcd"),
                keys=["k"],
                page_size=20,
                page_token="t",
            ),
            b"\x0a\x01u\x12\x01p\x1a\x08" + OBJECT_REF_SHA256 + b"\x22\x01k\xa0\x01\x14\xaa\x01\x01t",
        ),
        (
            "cipd.plugin.ListMetadataResponse",
            plugin_pb2.ListMetadataResponse(
                metadata=[cipd_pb2.InstanceMetadata(key="k", value=b"v")], next_page_token="n"
            ),
            b"\x0a\x06\x0a\x01k\x12\x01v\xa2\x01\x01n",
        ),
        (
            "cipd.plugin.ListAdmissionsRequest",
            plugin_pb2.ListAdmissionsRequest(protocol_version=1, plugin_version="v1"),
            b"\x08\x01\x12\x02v1",
        ),
        (
            "cipd.plugin.Admission",
            plugin_pb2.Admission(
                admission_id="id",
                service_url="https://x",
                package="p/q",
                instance=cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA1, hex_digest="abcd"),
            ),
            b"\x0a\x02id\x12\x09https://x\x1a\x03p/q\x22\x08" + OBJECT_REF_SHA1,
        ),
        (
            "cipd.plugin.ResolveAdmissionRequest",
            plugin_pb2.ResolveAdmissionRequest(admission_id="id", status=Status(code=9, message="no")),
            b"\x0a\x02id\x12\x06\x08\x09\x12\x02no",
        ),
        (
            # An OK status that is present still goes on the wire, empty.
            "cipd.plugin.ResolveAdmissionRequest",
            plugin_pb2.ResolveAdmissionRequest(admission_id="id", status=Status()),
            b"\x0a\x02id\x12\x00",
        ),
        (
            # The Go SDK admits by sending no status at all.
            "cipd.plugin.ResolveAdmissionRequest",
            plugin_pb2.ResolveAdmissionRequest(admission_id="id"),
            b"\x0a\x02id",
        ),
    ]


WIRE_CASES = _wire_cases()


@pytest.mark.parametrize(
    ("full_name", "message", "expected"), WIRE_CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(WIRE_CASES)]
)
def test_serialization_matches_hand_encoding(full_name: str, message: Message, expected: bytes) -> None:
    assert message.DESCRIPTOR.full_name == full_name
    assert message.SerializeToString() == expected
    assert message.SerializeToString(deterministic=True) == expected
    assert type(message).FromString(expected) == message


def test_negative_int32_is_a_ten_byte_varint() -> None:
    # int32 (not sint32): -1 is sign-extended to 64 bits, as Go encodes it.
    request = plugin_pb2.ListMetadataRequest(page_size=-1)
    assert request.SerializeToString() == b"\xa0\x01" + b"\xff" * 9 + b"\x01"


def test_unknown_fields_survive_a_round_trip() -> None:
    # A newer peer may add fields; an older one must pass them through intact.
    blob = b"\x08\x01\x12\x02v1" + b"\xf8\x01\x05"  # field 31 varint 5
    request = plugin_pb2.ListAdmissionsRequest.FromString(blob)
    assert request.protocol_version == 1
    assert request.SerializeToString() == blob


# Field name -> (number, type) for every message of SPEC section 3. Types are
# scalar names, or a message or enum full name; "repeated " marks lists.
SCHEMA: dict[str, dict[str, tuple[int, str]]] = {
    "cipd.ObjectRef": {"hash_algo": (1, "cipd.HashAlgo"), "hex_digest": (2, "string")},
    "cipd.InstanceMetadata": {
        "key": (1, "string"),
        "value": (2, "bytes"),
        "content_type": (3, "string"),
        "fingerprint": (4, "string"),
        "attached_by": (5, "string"),
        "attached_ts": (6, "google.protobuf.Timestamp"),
    },
    "cipd.ListMetadataRequest": {
        "package": (1, "string"),
        "instance": (2, "cipd.ObjectRef"),
        "keys": (3, "repeated string"),
        "page_size": (20, "int32"),
        "page_token": (21, "string"),
    },
    "cipd.ListMetadataResponse": {
        "metadata": (1, "repeated cipd.InstanceMetadata"),
        "next_page_token": (20, "string"),
    },
    "cipd.plugin.Handshake": {"port": (1, "int32"), "ticket": (2, "string")},
    "cipd.plugin.LogRequest": {"severity": (1, "string"), "message": (2, "string")},
    "cipd.plugin.ListMetadataRequest": {
        "service_url": (1, "string"),
        "package": (2, "string"),
        "instance": (3, "cipd.ObjectRef"),
        "keys": (4, "repeated string"),
        "page_size": (20, "int32"),
        "page_token": (21, "string"),
    },
    "cipd.plugin.ListMetadataResponse": {
        "metadata": (1, "repeated cipd.InstanceMetadata"),
        "next_page_token": (20, "string"),
    },
    "cipd.plugin.ListAdmissionsRequest": {"protocol_version": (1, "int32"), "plugin_version": (2, "string")},
    "cipd.plugin.Admission": {
        "admission_id": (1, "string"),
        "service_url": (2, "string"),
        "package": (3, "string"),
        "instance": (4, "cipd.ObjectRef"),
    },
    "cipd.plugin.ResolveAdmissionRequest": {
        "admission_id": (1, "string"),
        "status": (2, "google.rpc.Status"),
    },
}

_SCALAR_NAMES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_INT32: "int32",
}


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        name = field.message_type.full_name
    elif field.enum_type is not None:
        name = field.enum_type.full_name
    else:
        name = _SCALAR_NAMES.get(field.type, f"type {field.type}")
    return f"repeated {name}" if _is_repeated(field) else name


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 has only is_repeated; 4.25 has only label.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is None:
        return bool(getattr(field, "label") == FieldDescriptor.LABEL_REPEATED)  # noqa: B009
    return bool(is_repeated)


def _schema_of(descriptor: Descriptor) -> dict[str, tuple[int, str]]:
    return {field.name: (field.number, _field_type(field)) for field in descriptor.fields}


def test_files_declare_exactly_the_spec_messages() -> None:
    assert cipd_pb2.DESCRIPTOR.package == "cipd"
    assert plugin_pb2.DESCRIPTOR.package == "cipd.plugin"
    declared = {
        d.full_name
        for module in (cipd_pb2, plugin_pb2)
        for d in module.DESCRIPTOR.message_types_by_name.values()
    }
    assert declared == set(SCHEMA)


@pytest.mark.parametrize("full_name", sorted(SCHEMA))
def test_field_numbers_and_types_match_the_spec(full_name: str) -> None:
    package, _, name = full_name.rpartition(".")
    module = cipd_pb2 if package == "cipd" else plugin_pb2
    descriptor = module.DESCRIPTOR.message_types_by_name[name]
    assert descriptor.full_name == full_name
    assert _schema_of(descriptor) == SCHEMA[full_name]


def test_message_classes_carry_their_full_names() -> None:
    assert plugin_pb2.Admission.DESCRIPTOR.full_name == "cipd.plugin.Admission"
    assert plugin_pb2.ListMetadataRequest.DESCRIPTOR.full_name == "cipd.plugin.ListMetadataRequest"
    assert cipd_pb2.ListMetadataRequest.DESCRIPTOR.full_name == "cipd.ListMetadataRequest"
    assert cipd_pb2.ObjectRef.DESCRIPTOR.full_name == "cipd.ObjectRef"


def test_hash_algo_enum() -> None:
    enum = cipd_pb2.DESCRIPTOR.enum_types_by_name["HashAlgo"]
    assert enum.full_name == "cipd.HashAlgo"
    assert {v.name: v.number for v in enum.values} == {"HASH_ALGO_UNSPECIFIED": 0, "SHA1": 1, "SHA256": 2}


def test_handshake_json_names() -> None:
    # The handshake goes on stdin as JSON: these names are its keys.
    fields = plugin_pb2.Handshake.DESCRIPTOR.fields_by_name
    assert (fields["port"].json_name, fields["ticket"].json_name) == ("port", "ticket")


# Method name -> (input, output, server streaming), per service.
SERVICES: dict[str, dict[str, tuple[str, str, bool]]] = {
    "cipd.plugin.Host": {
        "Log": ("cipd.plugin.LogRequest", "google.protobuf.Empty", False),
        "ListMetadata": ("cipd.plugin.ListMetadataRequest", "cipd.plugin.ListMetadataResponse", False),
    },
    "cipd.plugin.Admissions": {
        "ListAdmissions": ("cipd.plugin.ListAdmissionsRequest", "cipd.plugin.Admission", True),
        "ResolveAdmission": ("cipd.plugin.ResolveAdmissionRequest", "google.protobuf.Empty", False),
    },
}


def test_service_descriptors() -> None:
    assert not cipd_pb2.DESCRIPTOR.services_by_name
    services = plugin_pb2.DESCRIPTOR.services_by_name
    assert {s.full_name for s in services.values()} == set(SERVICES)
    for service in services.values():
        methods = {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming)
            for m in service.methods
        }
        assert methods == SERVICES[service.full_name]
        assert not any(m.client_streaming for m in service.methods)


class RecordingChannel:
    """Stands in for a grpc.Channel: records what each call is built with."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[str, Callable[..., Any], Callable[..., Any]]] = {}

    def _record(self, kind: str, method: str, request_serializer: Any, response_deserializer: Any) -> str:
        self.calls[method] = (kind, request_serializer, response_deserializer)
        return method

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **_: Any
    ) -> str:
        return self._record("unary_unary", method, request_serializer, response_deserializer)

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **_: Any
    ) -> str:
        return self._record("unary_stream", method, request_serializer, response_deserializer)


def test_method_paths_are_the_service_descriptors() -> None:
    paths = {
        f"/{service.full_name}/{method.name}"
        for service in plugin_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    constants = {
        protocol.HOST_LOG,
        protocol.HOST_LIST_METADATA,
        protocol.ADMISSIONS_LIST,
        protocol.ADMISSIONS_RESOLVE,
    }
    assert paths == constants


def test_the_plugin_sdk_calls_the_spec_methods() -> None:
    # The SDK builds its calls from the paths of cipdplugin.protocol, with
    # explicit serializers: check each against the service descriptors.
    channel = RecordingChannel()
    sdk_channel = cast("grpc.Channel", channel)
    admission._Server(sdk_channel, threading.Event(), lambda request, info: None, max_workers=1)
    HostLogHandler(sdk_channel)
    kinds = {path: kind for path, (kind, _, _) in channel.calls.items()}
    assert kinds == {
        "/cipd.plugin.Host/Log": "unary_unary",
        "/cipd.plugin.Host/ListMetadata": "unary_unary",
        "/cipd.plugin.Admissions/ListAdmissions": "unary_stream",
        "/cipd.plugin.Admissions/ResolveAdmission": "unary_unary",
    }
    for service, methods in SERVICES.items():
        for name, (request_type, response_type, _) in methods.items():
            _, serialize, deserialize = channel.calls[f"/{service}/{name}"]
            assert deserialize(b"").DESCRIPTOR.full_name == response_type
            request_class = _message_class(request_type)
            assert serialize(request_class()) == b""


def _message_class(full_name: str) -> type[Message]:
    package, _, name = full_name.rpartition(".")
    module = {"cipd": cipd_pb2, "cipd.plugin": plugin_pb2}[package]
    cls: type[Message] = getattr(module, name)
    return cls


def test_protocol_constants() -> None:
    assert protocol.HOST_LOG == "/cipd.plugin.Host/Log"
    assert protocol.HOST_LIST_METADATA == "/cipd.plugin.Host/ListMetadata"
    assert protocol.ADMISSIONS_LIST == "/cipd.plugin.Admissions/ListAdmissions"
    assert protocol.ADMISSIONS_RESOLVE == "/cipd.plugin.Admissions/ResolveAdmission"
    assert protocol.PROTOCOL_VERSION == 1
    assert protocol.TICKET_METADATA_KEY == "x-plugin-ticket"


# Admission(service_url="https://x", package="p/q", instance=SHA1 "abcd"), no ID.
ADMISSION_WITHOUT_ID = b"\x12\x09https://x\x1a\x03p/q\x22\x08" + OBJECT_REF_SHA1


def _expected_admission_id(salt: bytes) -> str:
    digest = hashlib.sha256(salt + b"\n" + ADMISSION_WITHOUT_ID).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def _admission(**fields: Any) -> plugin_pb2.Admission:
    defaults: dict[str, Any] = {
        "service_url": "https://x",
        "package": "p/q",
        "instance": cipd_pb2.ObjectRef(hash_algo=cipd_pb2.SHA1, hex_digest="abcd"),
    }
    return plugin_pb2.Admission(**{**defaults, **fields})


def test_admission_id_rule() -> None:
    result = admission_id(_admission(), b"4242")
    assert result == _expected_admission_id(b"4242")
    # Standard alphabet, unpadded: 32 bytes make 43 characters.
    assert len(result) == 43
    assert "=" not in result


def test_admission_id_ignores_an_id_already_set() -> None:
    assert admission_id(_admission(admission_id="old"), b"1") == _expected_admission_id(b"1")


def test_admission_id_depends_on_salt_and_content() -> None:
    ids = {
        admission_id(_admission(), b"1"),
        admission_id(_admission(), b"2"),
        admission_id(_admission(service_url="https://y"), b"1"),
    }
    assert len(ids) == 3
