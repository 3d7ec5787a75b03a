"""The host side: the transport (server, tickets, services), plugin processes, admission plugins."""

from cipdplugin.host.admission import AdmissionFuture, AdmissionPlugin, PluginState
from cipdplugin.host.host import Host, PluginController
from cipdplugin.host.process import PluginProcess

__all__ = ["AdmissionFuture", "AdmissionPlugin", "Host", "PluginController", "PluginProcess", "PluginState"]
