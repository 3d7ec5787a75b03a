"""The host side, in layers (docs/design.md has the picture):

* ``process`` and ``spawn``: one plugin subprocess, knowing nothing of gRPC or kinds;
* ``transport``: the gRPC server, tickets, per-plugin budgets, routing to services;
* ``lifecycle``: the life of one plugin of any kind (launch, connect, exit, end, close);
* ``host_service``: ``cipd.plugin.Host``, the service every plugin may call;
* the admission kind: ``admission`` (``AdmissionPlugin``), ``checks``,
  ``admission_service`` (``cipd.plugin.Admissions``), ``deadlines``;
* ``promises``, ``audit``, ``chain``; and ``host``, which owns all of it.
"""

from cipdplugin.host.admission import AdmissionPlugin
from cipdplugin.host.audit import AuditLog
from cipdplugin.host.chain import AdmissionChain
from cipdplugin.host.host import Host, PluginController
from cipdplugin.host.lifecycle import PluginLifecycle, PluginState
from cipdplugin.host.process import PluginProcess
from cipdplugin.host.promises import HostFuture

#: The promises ``check_admission`` hands out (the name of earlier releases).
AdmissionFuture = HostFuture

__all__ = [
    "AdmissionChain",
    "AdmissionFuture",
    "AdmissionPlugin",
    "AuditLog",
    "Host",
    "HostFuture",
    "PluginController",
    "PluginLifecycle",
    "PluginProcess",
    "PluginState",
]
