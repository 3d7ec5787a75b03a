"""cipdplugin: CIPD deployment-admission plugins for Python.

The host side (``Host``, ``AdmissionPlugin``) asks out-of-process plugins
whether package instances may be deployed; the plugin side
(``cipdplugin.plugins.admission``) is an SDK for writing such plugins. Both
speak the CIPD plugin wire protocol of the Go CIPD client.

The names below load on first use (PEP 562): a plugin imports
``cipdplugin.plugins.admission``, which runs this module, and must not pay
for the host side (psutil, ``cipdplugin.host``) it never uses.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# A library's logs are its application's to show: without a handler of the
# application's, records (a plugin's stderr among them) would reach stderr
# through logging's last-resort handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from cipdplugin.backend import (
        GceTokenSource,
        GoogleAuthTokenSource,
        LuciAuthTokenSource,
        LuciContextTokenSource,
        PrpcRepository,
        default_token_source,
    )
    from cipdplugin.config import DEFAULT_SERVICE_URL, Config, RepositoryClient
    from cipdplugin.errors import (
        AdmissionDenied,
        AdmissionError,
        InvalidPinError,
        PluginAbortedError,
        PluginStartError,
    )
    from cipdplugin.host import AdmissionChain, AdmissionPlugin, Host, PluginProcess
    from cipdplugin.options import ClientOptions, ConfigError, load_client_options
    from cipdplugin.pins import Pin, instance_id_to_object_ref, object_ref_to_instance_id
    from cipdplugin.protocol.cipd_pb2 import (
        InstanceMetadata,
        ListMetadataRequest,
        ListMetadataResponse,
        ObjectRef,
    )
    from cipdplugin.repository import RepositoryFileError, StaticRepository

#: Public name -> the module that defines it.
_EXPORTS = {
    "GceTokenSource": "cipdplugin.backend",
    "GoogleAuthTokenSource": "cipdplugin.backend",
    "LuciAuthTokenSource": "cipdplugin.backend",
    "LuciContextTokenSource": "cipdplugin.backend",
    "PrpcRepository": "cipdplugin.backend",
    "default_token_source": "cipdplugin.backend",
    "DEFAULT_SERVICE_URL": "cipdplugin.config",
    "Config": "cipdplugin.config",
    "RepositoryClient": "cipdplugin.config",
    "AdmissionDenied": "cipdplugin.errors",
    "AdmissionError": "cipdplugin.errors",
    "InvalidPinError": "cipdplugin.errors",
    "PluginAbortedError": "cipdplugin.errors",
    "PluginStartError": "cipdplugin.errors",
    "AdmissionChain": "cipdplugin.host",
    "AdmissionPlugin": "cipdplugin.host",
    "Host": "cipdplugin.host",
    "PluginProcess": "cipdplugin.host",
    "ClientOptions": "cipdplugin.options",
    "ConfigError": "cipdplugin.options",
    "load_client_options": "cipdplugin.options",
    "Pin": "cipdplugin.pins",
    "instance_id_to_object_ref": "cipdplugin.pins",
    "object_ref_to_instance_id": "cipdplugin.pins",
    "InstanceMetadata": "cipdplugin.protocol.cipd_pb2",
    "ListMetadataRequest": "cipdplugin.protocol.cipd_pb2",
    "ListMetadataResponse": "cipdplugin.protocol.cipd_pb2",
    "ObjectRef": "cipdplugin.protocol.cipd_pb2",
    "RepositoryFileError": "cipdplugin.repository",
    "StaticRepository": "cipdplugin.repository",
}

# Kept literal for type checkers; tests/test_light_import.py checks it against _EXPORTS.
__all__ = [
    "DEFAULT_SERVICE_URL",
    "AdmissionChain",
    "AdmissionDenied",
    "AdmissionError",
    "AdmissionPlugin",
    "ClientOptions",
    "Config",
    "ConfigError",
    "GceTokenSource",
    "GoogleAuthTokenSource",
    "Host",
    "InstanceMetadata",
    "InvalidPinError",
    "ListMetadataRequest",
    "ListMetadataResponse",
    "LuciAuthTokenSource",
    "LuciContextTokenSource",
    "ObjectRef",
    "Pin",
    "PluginAbortedError",
    "PluginProcess",
    "PluginStartError",
    "PrpcRepository",
    "RepositoryClient",
    "RepositoryFileError",
    "StaticRepository",
    "default_token_source",
    "instance_id_to_object_ref",
    "load_client_options",
    "object_ref_to_instance_id",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    # The public names and the module's dunders, not the helpers this module
    # imports for itself (importlib, logging, typing).
    return sorted({*_EXPORTS, *(name for name in globals() if name.startswith("__"))})
