"""The CIPD plugin wire protocol: ``.proto`` sources and the modules built from them.

``cipd_pb2`` holds the shared repository messages (package ``cipd``),
``plugin_pb2`` the plugin protocol (package ``cipd.plugin``), ``config_pb2``
the CIPD client's configuration file (package ``cipd.client.config``).
Regenerate them with ``make protos``: each registers its file's descriptor
and builds the message classes when imported, on every supported protobuf
(4.25 to 7). The services have no generated stubs: both sides build their
calls and handlers from the method paths below.
"""

from cipdplugin.protocol import cipd_pb2, plugin_pb2

#: The admission protocol version this implementation speaks.
PROTOCOL_VERSION = 1

#: Metadata key that carries a plugin's ticket on every RPC.
TICKET_METADATA_KEY = "x-plugin-ticket"

#: Full gRPC method paths, as they go on the wire.
HOST_LOG = "/cipd.plugin.Host/Log"
HOST_LIST_METADATA = "/cipd.plugin.Host/ListMetadata"
ADMISSIONS_LIST = "/cipd.plugin.Admissions/ListAdmissions"
ADMISSIONS_RESOLVE = "/cipd.plugin.Admissions/ResolveAdmission"

__all__ = [
    "ADMISSIONS_LIST",
    "ADMISSIONS_RESOLVE",
    "HOST_LIST_METADATA",
    "HOST_LOG",
    "PROTOCOL_VERSION",
    "TICKET_METADATA_KEY",
    "cipd_pb2",
    "plugin_pb2",
]
