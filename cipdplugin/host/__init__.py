"""The host side: the transport (server, tickets, services), plugin processes, admission plugins."""

from cipdplugin.host.admission import AdmissionFuture, AdmissionPlugin, PluginState
from cipdplugin.host.audit import AuditLog
from cipdplugin.host.chain import AdmissionChain
from cipdplugin.host.host import Host, PluginController
from cipdplugin.host.process import PluginProcess

__all__ = [
    "AdmissionChain",
    "AdmissionFuture",
    "AdmissionPlugin",
    "AuditLog",
    "Host",
    "PluginController",
    "PluginProcess",
    "PluginState",
]
