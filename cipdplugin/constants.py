"""Every tunable number of cipdplugin, each with the reason for its value.

Both sides read it (the host and the plugin SDK), so it imports nothing.

A value that mirrors the Go CIPD client names its source in luci-go (paths
under ``cipd/client/cipd/plugin/``, then the function and what it says); one
that is ours says so, and what Go does instead (docs/design.md has the table
of where we differ on purpose). The values a Go binary can show are compared
with luci-go's binaries by tests/test_go_interop.py, named beside each.
"""

from __future__ import annotations

# -- Stopping a plugin --------------------------------------------------------

#: Termination never takes longer than this (plus a small constant): the
#: deadline the SPEC gives ``close()``, after which whatever is left is killed.
#: luci-go: ``host/host.go``, ``PluginProcess.Terminate``
#: (``context.WithTimeout(ctx, 5*time.Second)``, then ``Process.Kill``).
#: Test: ``test_stop_grace_and_kill_deadline_beside_the_go_host``.
KILL_DEADLINE = 5.0
#: How long a plugin may take to exit on its own once its stdin is closed,
#: before the host sends SIGTERM. The SDK exits within ``SDK_STOP_GRACE`` of
#: its stdin closing; the rest is room for a loaded machine. Ours: the Go
#: host's ``PluginProcess.Terminate`` (``host/host.go``) sends no SIGTERM at
#: all, it closes stdin and kills at ``KILL_DEADLINE``. Test:
#: ``test_stop_grace_and_kill_deadline_beside_the_go_host``.
STOP_GRACE = 1.0
#: The SDK's share of ``STOP_GRACE``: after stdin closes, the plugin's run
#: loop and then its log flush get this long in all, so a plugin built with
#: the SDK is gone before the host would SIGTERM it. Ours: luci's SDK
#: (``plugins/plugins.go``, ``Run``) cancels its context when stdin closes and
#: returns when its run loop does, without a bound. Test (under the Go host,
#: which would kill it only at 5 s):
#: ``test_our_plugin_leaves_promptly_when_the_go_host_closes``.
SDK_STOP_GRACE = STOP_GRACE / 2
#: Bound on the wait for SIGKILLed processes to vanish: they cannot refuse,
#: so this only covers the kernel's and the reaper's latency. Ours (the Go
#: host waits for the reaping without a bound).
KILL_SETTLE = 1.0
#: Bound on stopping the gRPC server, added to ``close()``'s deadline. Active
#: calls are cancelled, not drained, so this is only thread wake-up latency.
#: Ours (the Go host's ``Host.Close`` calls ``grpc.Server.Stop``, unbounded).
SERVER_STOP = 1.0
#: After a plugin's stream breaks, how long to wait for its exit status so the
#: error can say "exited with code N". The Go host waits 50 ms (``host/admission.go``,
#: ``AdmissionPlugin.onDisconnected``: ``time.After(50 * time.Millisecond)``); our exit is
#: noticed by a monitor thread that may wait for the GIL behind busy server
#: threads, and the wait ends the moment the status arrives, so a longer
#: bound costs nothing when the plugin does exit, and only matters for one
#: that closes its stream yet keeps running.
EXIT_STATUS_WAIT = 1.0
#: After refusing a plugin's protocol version, how long its answer gets to
#: reach it (and the plugin to leave on its own) before its stdin is closed.
#: The server's "call done" comes when the status is written to the socket,
#: not when the plugin has read it; a plugin that exits on stdin EOF must
#: still learn why it was refused. Ours: the Go host (``host/admission.go``,
#: ``AdmissionPlugin.onConnected``, then ``launchPlugin`` calling
#: ``Terminate``) closes the plugin's stdin at once, racing its answer. Test
#: (the answer arrives):
#: ``test_protocol_version_2_is_refused_as_the_go_host_refuses_it``.
REFUSAL_GRACE = 1.0
#: Bound on ``close()`` waiting for a launch in progress (Popen plus the
#: server's start); a launch that takes longer is cleaned up by its launcher.
#: Ours (the Go ``AdmissionPlugin.Close`` waits for its launch unbounded).
LAUNCH_JOIN = 2.0
#: Added to ``Host.close()``'s deadline for the audit log to write what it
#: still holds: formatting and writing thousands of records takes tens of
#: milliseconds, and only a sink that hangs needs the rest. Ours (the Go
#: client has no audit log).
AUDIT_FLUSH = 0.5

# -- Admission plugins -------------------------------------------------------

#: How long a new plugin has to call ListAdmissions. luci-go:
#: ``host/admission.go``, ``NewAdmissionPlugin`` (``timeout: 30 * time.Second``,
#: waited for in ``launchPlugin``). Test (slow, ``make soak``):
#: ``test_connect_timeout_is_the_go_hosts``.
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Checks queued but not yet sent, per plugin, before ``check_admission``
#: blocks: enough for a large deployment in one go, small enough to bound memory.
#: Ours: the Go host's queue (``host/admission.go``, ``NewAdmissionPlugin``:
#: ``make(chan *Promise, 1000000)``) never blocks in practice.
DEFAULT_MAX_PENDING = 1024
#: The largest message a plugin accepts: gRPC's default receive limit, which
#: the Go SDK and ours keep. A check whose Admission is larger is refused
#: before it is sent, alone, instead of breaking the plugin's stream (a Go
#: plugin sent one crashes). luci-go sets no limit of its own
#: (``host/host.go``, ``Host.initServer``: ``grpc.NewServer`` without one;
#: ``plugins/plugins.go``, ``Run``: ``grpc.DialContext`` without one), so
#: grpc-go's defaults hold: ``defaultServerMaxReceiveMessageSize`` and
#: ``defaultClientMaxReceiveMessageSize``, 4 MiB. Test:
#: ``test_message_limit_is_the_go_plugins``.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: The stream thread's longest sleep between looks at its call. gRPC's
#: termination callback wakes it at once when it can take the plugin's lock
#: without waiting; when it cannot (the lock's holder is being interrupted by
#: a signal handler), the stream notices within this interval. Ours (Go's
#: stream waits on a channel and its context).
STREAM_RECHECK = 0.5

# -- Metadata ----------------------------------------------------------------

#: Entries per ListMetadata page the plugin SDK asks for when its handler
#: does not say: luci-go ``cipd/client/cipd/plugin/plugins/admission/admission.go``,
#: ``infoImpl.VisitMetadata`` (``if pageSize <= 0 { pageSize = 20 }``). Test:
#: ``test_go_host_pages_metadata_for_our_sdk_as_for_luci_sdk``.
SDK_PAGE_SIZE = 20
#: Entries per page ``StaticRepository`` returns for a request without a page
#: size (ours: such a request comes from a caller other than the SDK, which
#: always sends one).
REPOSITORY_PAGE_SIZE = 100

# -- The server --------------------------------------------------------------

#: Tickets are this many random bytes (before base64), as the Go host's:
#: luci-go ``host/host.go``, ``Host.LaunchPlugin`` (``make([]byte, 64)`` from
#: ``crypto/rand``, encoded with ``base64.RawStdEncoding``: 86 characters).
#: Test: ``test_go_handshake_has_our_fields_and_ticket_length``.
TICKET_BYTES = 64
#: Bound on the server's threads and on the calls it serves at once: each
#: connected admission plugin holds one for its stream (the SPEC asks for 32
#: plugins at once), short calls reuse idle threads. Calls beyond it are
#: refused with RESOURCE_EXHAUSTED without taking a thread; calls without a
#: valid ticket are refused before they can hold one. Ours: the Go host's
#: server (``host/host.go``, ``Host.initServer``) sets no limit, each call
#: being a goroutine.
MAX_CONCURRENT_RPCS = 256

# -- Output of plugins ---------------------------------------------------------

#: Longer output lines are cut before they reach the log: one runaway line
#: must not become one giant log record. Ours: the Go host
#: (``host/host.go``, ``Host.launchProcess``: ``cmd.Stdout = os.Stdout``,
#: ``cmd.Stderr = os.Stderr``) passes the plugin's output through untouched.
MAX_LOG_LINE = 16 * 1024
#: How many of the plugin's last stderr lines are kept for error messages.
#: Ours (the Go host keeps none; see ``MAX_LOG_LINE``).
STDERR_TAIL = 5
