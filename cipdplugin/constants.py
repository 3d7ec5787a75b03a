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

# -- The plugin SDK ------------------------------------------------------------

#: Handlers an SDK plugin runs at once unless ``admission.run(max_workers=)``
#: says otherwise. The Go SDK runs a goroutine per admission, so a slow
#: repository never throttles it; a Python thread costs more, so ours is
#: bounded, but high enough not to be what limits a plugin: at 100 ms per
#: ListMetadata, 512 handlers can answer 5,000 admissions a second, more than
#: the CPU of a plugin that reads metadata allows (about 2,000 on 2 cores).
#: A thread waiting in a call costs about 56 KiB of RSS: 1,000 admissions in
#: flight make 524 threads and 67 MiB of RSS, against 13 threads and 39 MiB
#: idle (measured with handlers waiting on ListMetadata).
SDK_MAX_WORKERS = 512
#: Of those, how many may be *running* at once: a handler waiting on the host
#: (in ``info.metadata()``) does not count, nor one running for longer than
#: ``PRESUMED_WAITING``. Under the GIL, more threads running Python at once
#: only take turns, and each one more makes every admission slower: a flood
#: of quick admissions under the Go host, served by 220 threads, went at
#: 0.75x a bare grpcio plugin; by 16, 1.7x; by 4, 2.6x. A few, not one, so
#: that handlers whose work releases the GIL (hashing, I/O) still overlap.
SDK_RUNNING_HANDLERS = 8
#: A pool call running longer than this is presumed to wait on something the
#: pool cannot see (a sleep, the handler's own network call) and stops
#: counting as running, so a handler that blocks outside ``info.metadata()``
#: does not hold the others back for long. Long enough that a quick call
#: slowed by taking turns for the GIL (5 ms a turn) is not mistaken for one.
PRESUMED_WAITING = 0.05
#: An idle pool thread (``cipdplugin.threads``, both sides) leaves after this
#: long without work: a burst's hundreds of threads do not outlive it by
#: much, while the bursts of one deployment, seconds apart, reuse them.
IDLE_THREAD_EXPIRY = 30.0
#: Per-call deadline of the SDK's ListMetadata and ResolveAdmission calls, so
#: that a host that never answers cannot hold a handler forever. It travels
#: with each call (gRPC deadline propagation): the host bounds its backend
#: call by what is left of it. As long as ``PrpcRepository``'s default
#: timeout, so a backend call that takes all of its own time still answers.
SDK_CALL_LIMIT = 30.0
#: ResolveAdmission calls an SDK plugin has in flight at once; more answers
#: wait their turn. Answers are sent without waiting for them, and a flood of
#: calls is what a host refuses: a grpcio server cancels the calls beyond
#: about 1,000 it has not taken up yet, for all its plugins together. Under
#: the Go host, 64 went faster than 16 (fewer calls in flight hold answers
#: back) and than 256 (more contend for the channel).
SDK_MAX_ANSWERS_IN_FLIGHT = 64
#: The SDK sends again a call the host refused for capacity after this delay,
#: doubled on each refusal up to ``SDK_RETRY_MAX_DELAY`` and jittered: an
#: answer (ResolveAdmission) until the host takes it, the plugin stops or
#: ``SDK_CALL_LIMIT`` has passed (an answer must not be lost); a ListMetadata
#: page within its own deadline (a refusal is not the repository's answer).
SDK_RETRY_FIRST_DELAY = 0.01
SDK_RETRY_MAX_DELAY = 1.0
#: How long the SDK keeps sending again a Log record refused for capacity
#: before it drops it (and counts it: the next record delivered says how many
#: were lost). Records go out one at a time, so this also bounds how long one
#: record can hold back those queued behind it.
SDK_LOG_RETRY_LIMIT = 5.0

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
