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
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future

import grpc

from cipdplugin.errors import AdmissionError
from cipdplugin.host.admission import AdmissionFuture, AdmissionPlugin
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
        self._promises: dict[Pin, AdmissionFuture] = {}

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
        every covering plugin has answered. The same pin gets the same
        Future until ``clear_cache()``. Blocks while a plugin's queue is full.

        Raises:
            InvalidPinError: ``pin`` is a malformed ``"package:instance_id"`` string.
        """
        if not isinstance(pin, Pin):
            pin = Pin.parse(pin)
        with self._lock:
            future = self._promises.get(pin)
            if future is not None:
                return future
            future = self._promises[pin] = AdmissionFuture()
        asked = [plugin for plugin, scope in self._members if covers(scope, pin.package)]
        if not asked:
            self._record_unscoped(pin)
            future.set_result(None)
            return future
        answers: list[Future[None]] = []
        for plugin in asked:
            try:
                answers.append(plugin.check_admission(pin))
            except Exception as exc:  # a closed host, say: an error like any other
                failed: Future[None] = Future()
                failed.set_exception(exc)
                answers.append(failed)
        _Combination(future, asked, answers)
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
    """Resolves a chain's promise once every asked plugin has answered."""

    def __init__(self, future: AdmissionFuture, plugins: list[AdmissionPlugin], answers: list[Future[None]]):
        self._future = future
        self._plugins = plugins
        self._answers = answers
        # Guards ``_waiting``; the callbacks run on whichever threads resolve the answers.
        self._lock = threading.Lock()
        self._waiting = len(answers)
        for answer in answers:
            answer.add_done_callback(self._answered)

    def _answered(self, _: Future[None]) -> None:
        with self._lock:
            self._waiting -= 1
            if self._waiting:
                return
        outcomes = [answer.exception(timeout=0) for answer in self._answers]
        failures = [(p, e) for p, e in zip(self._plugins, outcomes, strict=True) if e is not None]
        errors = [(p, e) for p, e in failures if verdict_of(e).verdict == ERROR]
        blamed = errors or failures
        if not blamed:
            self._future.set_result(None)
        else:
            plugin, error = blamed[0]
            self._future.set_exception(_named(error, plugin.name))
