"""Every tunable number of cipdplugin, each with the reason for its value.

Both sides read it (the host and the plugin SDK), so it imports nothing.
"""

from __future__ import annotations

# -- Stopping a plugin --------------------------------------------------------

#: Termination never takes longer than this (plus a small constant): the
#: deadline the SPEC gives ``close()``, after which whatever is left is killed.
KILL_DEADLINE = 5.0
#: How long a plugin may take to exit on its own once its stdin is closed,
#: before the host sends SIGTERM. The SDK exits within ``SDK_STOP_GRACE`` of
#: its stdin closing; the rest is room for a loaded machine.
STOP_GRACE = 1.0
#: The SDK's share of ``STOP_GRACE``: after stdin closes, the plugin's run
#: loop and then its log flush get this long in all, so a plugin built with
#: the SDK is gone before the host would SIGTERM it.
SDK_STOP_GRACE = STOP_GRACE / 2
#: Bound on the wait for SIGKILLed processes to vanish: they cannot refuse,
#: so this only covers the kernel's and the reaper's latency.
KILL_SETTLE = 1.0
#: Bound on stopping the gRPC server, added to ``close()``'s deadline. Active
#: calls are cancelled, not drained, so this is only thread wake-up latency.
SERVER_STOP = 1.0
#: After a plugin's stream breaks, how long to wait for its exit status so the
#: error can say "exited with code N". The Go host waits 50 ms; our exit is
#: noticed by a monitor thread that may wait for the GIL behind busy server
#: threads, and the wait ends the moment the status arrives, so a longer
#: bound costs nothing when the plugin does exit, and only matters for one
#: that closes its stream yet keeps running.
EXIT_STATUS_WAIT = 1.0
#: After refusing a plugin's protocol version, how long its answer gets to
#: reach it (and the plugin to leave on its own) before its stdin is closed.
#: The server's "call done" comes when the status is written to the socket,
#: not when the plugin has read it; a plugin that exits on stdin EOF must
#: still learn why it was refused.
REFUSAL_GRACE = 1.0
#: Bound on ``close()`` waiting for a launch in progress (Popen plus the
#: server's start); a launch that takes longer is cleaned up by its launcher.
LAUNCH_JOIN = 2.0
#: Added to ``Host.close()``'s deadline for the audit log to write what it
#: still holds: formatting and writing thousands of records takes tens of
#: milliseconds, and only a sink that hangs needs the rest.
AUDIT_FLUSH = 0.5

# -- Admission plugins -------------------------------------------------------

#: How long a new plugin has to call ListAdmissions (the Go host's default).
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Checks queued but not yet sent, per plugin, before ``check_admission``
#: blocks: enough for a large deployment in one go, small enough to bound memory.
DEFAULT_MAX_PENDING = 1024
#: The largest message a plugin accepts: gRPC's default receive limit, which
#: the Go SDK and ours keep. A check whose Admission is larger is refused
#: before it is sent, alone, instead of breaking the plugin's stream.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: The stream thread's longest sleep between looks at its call. gRPC's
#: termination callback wakes it at once when it can take the plugin's lock
#: without waiting; when it cannot (the lock's holder is being interrupted by
#: a signal handler), the stream notices within this interval.
STREAM_RECHECK = 0.5

# -- Metadata ----------------------------------------------------------------

#: Entries per ListMetadata page the plugin SDK asks for when its handler
#: does not say: luci-go ``cipd/client/cipd/plugin/plugins/admission/admission.go``,
#: ``VisitMetadata`` (``if pageSize <= 0 { pageSize = 20 }``).
SDK_PAGE_SIZE = 20
#: Entries per page ``StaticRepository`` returns for a request without a page
#: size (ours: such a request comes from a caller other than the SDK, which
#: always sends one).
REPOSITORY_PAGE_SIZE = 100

# -- The server --------------------------------------------------------------

#: Tickets are this many random bytes (before base64), as the Go host's.
TICKET_BYTES = 64
#: Bound on the server's threads and on the calls it serves at once: each
#: connected admission plugin holds one for its stream (the SPEC asks for 32
#: plugins at once), short calls reuse idle threads. Calls beyond it are
#: refused with RESOURCE_EXHAUSTED without taking a thread; calls without a
#: valid ticket are refused before they can hold one.
MAX_CONCURRENT_RPCS = 256

# -- Output of plugins ---------------------------------------------------------

#: Longer output lines are cut before they reach the log: one runaway line
#: must not become one giant log record.
MAX_LOG_LINE = 16 * 1024
#: How many of the plugin's last stderr lines are kept for error messages.
STDERR_TAIL = 5

# -- Input files ---------------------------------------------------------------

#: Bounds on the files the library and the command line read whole. Each is
#: far above any real file of its kind and far below what would exhaust
#: memory once parsed (a parsed JSON file takes several times its size).
#: The CIPD config file holds one plugin command line: a few hundred bytes.
MAX_CONFIG_FILE_BYTES = 1024 * 1024
#: A metadata file (``StaticRepository.from_file``, ``--metadata``): values
#: are at most 512 KiB each, and an offline file holds a few instances.
MAX_METADATA_FILE_BYTES = 64 * 1024 * 1024
#: A ``cipd ensure -json-output`` file (``--pins-json``): about 100 bytes a pin.
MAX_PINS_FILE_BYTES = 16 * 1024 * 1024
