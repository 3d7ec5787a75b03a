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
#: so this only covers the kernel's and the reaper's latency (milliseconds,
#: or a few hundred on a machine under load). Ours (the Go host waits for
#: the reaping without a bound).
KILL_SETTLE = 0.3
#: What ``Host.close()`` may take beyond its kill deadline: SIGKILLed
#: processes vanishing (``KILL_SETTLE``), the server's threads leaving and
#: the audit log writing what it holds all fit in it. One budget for the
#: whole close: ``close()`` returns within the kill deadline plus this.
#: Ours (the Go host's ``Host.Close`` waits for every plugin's reaping and
#: stops its server without a bound of its own). Test:
#: ``test_close_returns_within_the_kill_deadline_plus_the_margin``.
CLOSE_MARGIN = 0.5
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
#: ResolveAdmission calls a plugin may have open beyond one per unsettled
#: check. An answer's call stays open a moment after its check is settled
#: (and so no longer counted), and answers race their checks' deadlines: a
#: burst's last answers can outnumber the checks left by hundreds. As large
#: as the budget of short calls, so that a well-behaved plugin never meets
#: it (the Go SDK does not retry a refused answer); a plugin that opens
#: answers and never sends them holds at most this many threads beyond its
#: checks. Ours (the Go host refuses no call for capacity).
ANSWER_SLACK = 1024

#: Checks the stream takes from the queue at a time. The rest stay queued,
#: so a check whose deadline passes before the stream reaches it (a plugin
#: that stopped reading) is never sent, and a burst's messages are not all
#: held at once by the stream. Ours (Go's stream sends from a channel, one
#: admission at a time).
STREAM_BATCH = 256

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
#: Once a pool of ours has this many threads, the process's futex table is
#: widened to ``FUTEX_TABLE_SLOTS`` buckets (``cipdplugin.futexes``).
FUTEX_TABLE_WIDEN_AT = 64
#: Buckets of the widened futex table: about one per thread of four plugins
#: each holding a budget of ``PLUGIN_CALL_BUDGET`` calls. 64 bytes each, so
#: 256 KiB of kernel memory. The kernel's own default (Linux 6.16 and later)
#: is four per online CPU and at least 16.
FUTEX_TABLE_SLOTS = 4096
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

#: Tickets are this many random bytes (before base64), as the Go host's:
#: luci-go ``host/host.go``, ``Host.LaunchPlugin`` (``make([]byte, 64)`` from
#: ``crypto/rand``, encoded with ``base64.RawStdEncoding``: 86 characters).
#: Test: ``test_go_handshake_has_our_fields_and_ticket_length``.
TICKET_BYTES = 64
#: Short calls (Log, ListMetadata) one plugin may have open at once; each
#: holds a thread of the server's pool while its servant runs. Per plugin,
#: so that one plugin using up its budget delays no other; large enough for
#: a plugin that lists the metadata of every pin of a deployment at once
#: (luci's example plugin does: the Go host served 540 at once). Calls
#: beyond it are refused with RESOURCE_EXHAUSTED before they take a thread;
#: calls without a valid ticket are refused before that. Ours: the Go
#: host's server (``host/host.go``, ``Host.initServer``) sets no limit, each
#: call being a goroutine. Test: ``test_a_plugin_holding_its_budget_delays_no_other``.
PLUGIN_CALL_BUDGET = 1024
#: How long ``Host`` waits for its server's event loop to listen before it
#: gives up on launching a plugin. Ours (the Go host listens on its own
#: goroutine and waits without a bound); it takes milliseconds.
SERVER_START_TIMEOUT = 30.0
#: Calls grpc's core holds for the server before they are served. Its
#: default refuses a call with RESOURCE_EXHAUSTED once 1,000 wait and it has
#: waited a moment, or once 3,000 wait: a burst of answers from one plugin
#: (one per check) can be more, and luci's SDK drops an answer refused.
#: The plugins' budgets bound the calls served; this only lets them queue.
SERVER_PENDING_CALLS = 1 << 20
#: How much sooner than its caller's deadline the host gives up on a
#: repository that takes a timeout: time for the answer to reach the plugin.
#: Ours (the Go host passes the call's context to its repository, which
#: then fails with the context's own DEADLINE_EXCEEDED).
METADATA_ANSWER_MARGIN = 1.0

# -- Output of plugins ---------------------------------------------------------

#: Longer output lines are cut before they reach the log: one runaway line
#: must not become one giant log record. Ours: the Go host
#: (``host/host.go``, ``Host.launchProcess``: ``cmd.Stdout = os.Stdout``,
#: ``cmd.Stderr = os.Stderr``) passes the plugin's output through untouched.
MAX_LOG_LINE = 16 * 1024
#: How many of the plugin's last stderr lines are kept for error messages.
#: Ours (the Go host keeps none; see ``MAX_LOG_LINE``).
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

# -- The backend client (cipdplugin/backend/) ------------------------------------

#: Default limit, in seconds, for one backend call, retries and the token
#: included: the plugin SDK's own limit on a ListMetadata call
#: (``plugins/admission.py``), so a call never outlasts the plugin's. A host
#: passes what is left of the plugin's call (``list_metadata(timeout=...)``),
#: so that the backend's own message reaches the plugin first.
BACKEND_TIMEOUT = 30.0
#: First retry delay, in seconds; it doubles per retry up to
#: ``BACKEND_MAX_BACKOFF``, each delay drawn between half and all of it.
BACKEND_INITIAL_BACKOFF = 0.5
BACKEND_MAX_BACKOFF = 10.0
#: A retry is only worth it with this much of the call's time left, in seconds.
BACKEND_MIN_ATTEMPT = 0.05
#: Idle keep-alive connections kept per repository. The pool opens one per
#: concurrent call (HTTP/1.1 carries one call at a time), so it grows with a
#: burst; this many stay open for the next burst (a plugin may have hundreds
#: of handlers listing metadata at once), each checked for a close by the
#: backend before reuse. Ours (Go's pRPC client multiplexes calls over
#: HTTP/2 connections of its transport).
MAX_IDLE_CONNECTIONS = 64
#: Larger answers are refused, on the wire and again once decompressed: the
#: Go pRPC client's ``DefaultMaxContentLength`` (luci-go ``grpc/prpc/client.go``),
#: which Go applies to the body its transport has already decompressed.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: Error messages from a body are cut to this many bytes (``ErrBodySize`` there).
ERROR_BODY_LIMIT = 256
#: Longest status, header or trailer line, and most header (or trailer) fields
#: in one answer: ``http.client``'s limits, which no real backend comes near.
MAX_HEADER_LINE = 64 * 1024
MAX_HEADER_FIELDS = 100
#: Informational (1xx) answers skipped before the real one: Go's net/http
#: ``max1xxResponses`` (``net/http/transport.go``), an arbitrary bound.
MAX_INTERIM_RESPONSES = 5

# -- Access tokens (cipdplugin/backend/tokens.py) ------------------------------------

#: A cached token is refreshed when it expires within this many seconds plus
#: a random share of ``TOKEN_EXPIRY_JITTER``: luci-go ``auth/auth.go``
#: (``Options.MinTokenLifetime``, 10 s by default) and
#: ``auth/internal/common.go`` (``TokenExpiresInRnd``, ``expiryRandInterval``
#: 30 s), so that many processes sharing an account do not refresh at once.
MIN_TOKEN_LIFETIME = 10.0
TOKEN_EXPIRY_JITTER = 30.0
#: How long a token given without an expiry is used, in seconds.
PLAIN_TOKEN_LIFETIME = 300.0
#: How long a token source's failure is remembered, in seconds: longer than a
#: burst of concurrent calls (they share one request anyway), short enough
#: that the next check a few seconds later asks the source again.
TOKEN_FAILURE_MEMORY = 5.0
#: Bound on one token request made on its own (not for a call, which brings
#: its own deadline): luci's metadata client waits 10 s to connect and 15 s
#: for the headers (``auth/internal/gce.go``); this covers both.
TOKEN_SOURCE_TIMEOUT = 30.0
#: Delays between attempts of a token request that failed transiently (a
#: local server's HTTP 500, no connection): luci's ``retryParams`` in
#: ``auth/auth.go`` start at 10 ms and double; ours stop doubling at 1 s and
#: end with the call's deadline.
TOKEN_RETRY_INITIAL = 0.01
TOKEN_RETRY_MAX = 1.0
#: Largest answer read from a token endpoint (JSON of a few hundred bytes).
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
#: Most bytes ``luci-auth token`` may print: a JSON token is a few KiB; a
#: command that prints more is broken and is stopped, not buffered.
MAX_TOKEN_COMMAND_OUTPUT = 64 * 1024
#: The token lifetime asked of ``luci-auth token -lifetime``: at least
#: ``MIN_TOKEN_LIFETIME + TOKEN_EXPIRY_JITTER`` plus a call's length.
LUCI_AUTH_LIFETIME = 120.0
#: Bound on one ``luci-auth token`` run made on its own.
LUCI_AUTH_TIMEOUT = 60.0
