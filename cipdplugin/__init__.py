"""cipdplugin: CIPD deployment-admission plugins for Python.

The host side (``Host``, ``AdmissionPlugin``) asks out-of-process plugins
whether package instances may be deployed; the plugin side
(``cipdplugin.plugins.admission``) is an SDK for writing such plugins. Both
speak the CIPD plugin wire protocol of the Go CIPD client.
"""

from cipdplugin.backend import LuciAuthTokenSource, PrpcRepository
from cipdplugin.config import DEFAULT_SERVICE_URL, Config, RepositoryClient
from cipdplugin.errors import (
    AdmissionDenied,
    AdmissionError,
    InvalidPinError,
    PluginAbortedError,
    PluginStartError,
)
from cipdplugin.host import AdmissionPlugin, Host, PluginProcess
from cipdplugin.options import ClientOptions, ConfigError, load_client_options
from cipdplugin.pins import Pin, instance_id_to_object_ref, object_ref_to_instance_id
from cipdplugin.protocol.cipd_pb2 import (
    InstanceMetadata,
    ListMetadataRequest,
    ListMetadataResponse,
    ObjectRef,
)
from cipdplugin.repository import RepositoryFileError, StaticRepository

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SERVICE_URL",
    "AdmissionDenied",
    "AdmissionError",
    "AdmissionPlugin",
    "ClientOptions",
    "Config",
    "ConfigError",
    "Host",
    "InstanceMetadata",
    "InvalidPinError",
    "ListMetadataRequest",
    "ListMetadataResponse",
    "LuciAuthTokenSource",
    "ObjectRef",
    "Pin",
    "PluginAbortedError",
    "PluginProcess",
    "PluginStartError",
    "PrpcRepository",
    "RepositoryClient",
    "RepositoryFileError",
    "StaticRepository",
    "instance_id_to_object_ref",
    "load_client_options",
    "object_ref_to_instance_id",
]
