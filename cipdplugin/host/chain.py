"""``AdmissionChain``: several admission plugins, each scoped to packages.

A pin is asked of every plugin whose scope covers its package, all at once,
and admitted only if all of them admit::

    chain = AdmissionChain([
        host.new_admission_plugin(["/opt/policy"]),                 # every package
        (host.new_admission_plugin(["/opt/infra-policy"]), ("infra/tools", "infra/ci")),
    ])
    error = chain.check_admission(pin).exception(timeout=60)     # None: admitted

The chain uses only the public API of its plugins (``check_admission``,
``clear_cache``, ``name``), so the plugins keep their own queues, caches,
deadlines and audit records: a check a plugin answers is recorded once, by
that plugin. The chain only records the pins no plugin covers, as
``unscoped``, in the audit log of its first plugin's host.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future

import grpc

from cipdplugin.errors import AdmissionError, PluginAbortedError
from cipdplugin.host.admission import AdmissionPlugin
from cipdplugin.host.promises import HostFuture, settle, settled
from cipdplugin.pins import Pin, validate_package_name
from cipdplugin.status import ERROR, verdict_of

#: A member of a chain: a plugin (covering every package), or a plugin and its scope.
Member = AdmissionPlugin | tuple[AdmissionPlugin, str | Sequence[str]]


def covers(scope: tuple[str, ...], package: str) -> bool:
    """Whether ``scope`` covers ``package``: prefixes match at ``/`` boundaries.

    ``infra/tools`` covers ``infra/tools`` and ``infra/tools/x``, not
    ``infra/toolsx``. An empty scope covers every package.
    """
    if not scope:
        return True
    return any(package == prefix or package.startswith(prefix + "/") for prefix in scope)


def checked_scope(scope: str | Sequence[str]) -> tuple[str, ...]:
    """``scope`` as a tuple of package-name prefixes; a string is one prefix.

    A trailing ``/`` is dropped (``infra/`` means ``infra``).

    Raises:
        TypeError: ``scope`` is not a string or a sequence of strings.
        ValueError: a prefix is not a valid package name.
    """
    prefixes = [scope] if isinstance(scope, str) else scope
    if not isinstance(prefixes, Sequence) or not all(isinstance(p, str) for p in prefixes):
        raise TypeError(f"a scope must be a sequence of package-name prefixes, got {scope!r}")
    checked = []
    for prefix in prefixes:
        trimmed = prefix[:-1] if prefix.endswith("/") else prefix
        try:
            validate_package_name(trimmed)
        except ValueError as exc:
            raise ValueError(f"invalid scope prefix {prefix!r}: {exc}") from None
        checked.append(trimmed)
    return tuple(checked)


def _named(error: BaseException, plugin: str) -> AdmissionError:
    """``error`` as an ``AdmissionError`` of the same kind whose message names ``plugin``."""
    if not isinstance(error, AdmissionError):
        return AdmissionError(
            f"plugin {plugin!r}: {type(error).__name__}: {error}", code=grpc.StatusCode.UNKNOWN
        )
    named = copy.copy(error)
    named.message = f"plugin {plugin!r}: {error.message}"
    named.args = (named.message,)
    return named


class AdmissionChain:
    """Asks every plugin whose scope covers a pin; admitted only if all admit.

    Thread-safe. The chain owns no resources: its plugins belong to their
    host and stop with it.
    """

    def __init__(self, members: Iterable[Member]) -> None:
        """Make a chain of ``members``, asked in this order.

        Raises:
            TypeError: a member is not a plugin or a ``(plugin, scope)`` pair.
            ValueError: a scope prefix is not a valid package name.
        """
        checked: list[tuple[AdmissionPlugin, tuple[str, ...]]] = []
        for member in members:
            if isinstance(member, AdmissionPlugin):
                checked.append((member, ()))
            elif isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], AdmissionPlugin):
                checked.append((member[0], checked_scope(member[1])))
            else:
                raise TypeError(
                    f"a chain member must be an AdmissionPlugin or a (plugin, scope) pair, got {member!r}"
                )
        self._members = tuple(checked)
        # Guards the cache. Held only to look up and insert, never while a
        # plugin is asked: its check_admission may block on a full queue.
        self._lock = threading.Lock()
        self._promises: dict[Pin, HostFuture[None]] = {}

    @property
    def members(self) -> tuple[tuple[AdmissionPlugin, tuple[str, ...]], ...]:
        """The ``(plugin, scope)`` pairs, in chain order; an empty scope covers all."""
        return self._members

    def __repr__(self) -> str:
        return f"<AdmissionChain {[plugin.name for plugin, _ in self._members]!r}>"

    def check_admission(self, pin: Pin | str) -> Future[None]:
        """Ask every plugin whose scope covers ``pin``, all at once.

        Returns a Future that resolves to None if every one of them admits
        (or none covers the pin). Otherwise it holds the error of the
        first plugin in chain order that failed the check (an error beats a
        denial), or else of the first that denied, of the same type as the
        plugin's and with a message naming the plugin. It resolves once
        every covering plugin has answered; only the host settles it. The
        same pin gets the same Future until ``clear_cache()``. Blocks while
        a plugin's queue is full. An exception raised while asking (a
        KeyboardInterrupt, say) fails the plugins not yet asked, so the
        Future still resolves once the others answer.

        Raises:
            InvalidPinError: ``pin`` is a malformed ``"package:instance_id"`` string.
        """
        if not isinstance(pin, Pin):
            pin = Pin.parse(pin)
        future = self._promises.get(pin)  # a single lookup: atomic
        if future is not None:
            return future
        asked = [plugin for plugin, scope in self._members if covers(scope, pin.package)]
        combination = None
        try:
            with self._lock:
                future = self._promises.get(pin)
                if future is not None:
                    return future
                future = HostFuture()
                combination = _Combination(future, asked)
                # Cached only with the combination that settles it.
                self._promises[pin] = future
            if not asked:
                self._record_unscoped(pin)
            for slot, plugin in enumerate(asked):
                try:
                    answer = plugin.check_admission(pin)
                except Exception as exc:  # a closed host, say: an error like any other
                    answer = settled(exc)
                combination.add(slot, answer)
        finally:
            if combination is not None:
                combination.fail_unasked()
        return future

    def clear_cache(self) -> None:
        """Forget resolved promises, here and in every plugin; pending ones stay."""
        with self._lock:
            self._promises = {pin: f for pin, f in self._promises.items() if not f.done()}
        for plugin, _ in self._members:
            plugin.clear_cache()

    def _record_unscoped(self, pin: Pin) -> None:
        if not self._members:
            return
        host = self._members[0][0].host
        audit = host.audit_log
        if audit is not None:
            audit.record_unscoped(pin, service_url=host.service_url)


class _Combination:
    """Settles a chain's promise once every asked plugin has answered.

    Each plugin has a slot, in chain order. An answer counts once per slot,
    however often its slot is registered, so that ``fail_unasked`` can
    fill every slot an interrupted ``check_admission`` left without a
    registered answer, and none is counted twice.
    """

    def __init__(self, future: HostFuture[None], plugins: list[AdmissionPlugin]):
        self._future = future
        self._plugins = plugins
        # Guards the fields below; the callbacks run on whichever threads
        # settle the answers.
        self._lock = threading.Lock()
        self._answers: list[Future[None] | None] = [None] * len(plugins)  # by slot
        self._registered: list[bool] = [False] * len(plugins)  # the slot's callback was added
        self._answered_slots: set[int] = set()
        self._done = not plugins
        if not plugins:
            settle(future, None)

    def add(self, slot: int, answer: Future[None]) -> None:
        """Plugin ``slot``'s answer."""
        self._answers[slot] = answer
        answer.add_done_callback(functools.partial(self._answered, slot))
        self._registered[slot] = True

    def fail_unasked(self) -> None:
        """Plugins whose answer was not registered (asking was interrupted) count as failed."""
        for slot, registered in enumerate(self._registered):
            if not registered:
                self.add(
                    slot,
                    settled(PluginAbortedError("the check was interrupted before this plugin was asked")),
                )

    def _answered(self, slot: int, _: Future[None]) -> None:
        with self._lock:
            self._answered_slots.add(slot)
            if self._done or len(self._answered_slots) < len(self._plugins):
                return
            self._done = True  # first to see every slot answered settles
        outcomes = [answer.exception(timeout=0) if answer is not None else None for answer in self._answers]
        failures = [(p, e) for p, e in zip(self._plugins, outcomes, strict=True) if e is not None]
        errors = [(p, e) for p, e in failures if verdict_of(e).verdict == ERROR]
        blamed = errors or failures
        if not blamed:
            settle(self._future, None)
        else:
            plugin, error = blamed[0]
            settle(self._future, _named(error, plugin.name))
