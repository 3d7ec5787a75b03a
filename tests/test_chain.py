"""``AdmissionChain``: several real plugins, scoped to overlapping package prefixes."""

from __future__ import annotations

import io
import json
import signal
from collections.abc import Callable

import grpc
import pytest

from cipdplugin import AdmissionChain, AdmissionDenied, AdmissionError, Host, Pin, PluginStartError
from cipdplugin.host.chain import checked_scope, covers
from tests.conftest import hex_id, plugin_cmd


def pin(package: str, n: int = 1) -> Pin:
    return Pin(package, hex_id(n))


@pytest.mark.parametrize(
    ("package", "covered"),
    [
        ("infra/tools", True),
        ("infra/tools/x", True),
        ("infra/tools/x/y", True),
        ("infra/toolsx", False),
        ("infra/tool", False),
        ("infra", False),
        ("other/infra/tools", False),
    ],
)
def test_scopes_match_at_slash_boundaries(package: str, covered: bool) -> None:
    assert covers(("infra/tools",), package) is covered
    assert covers((), package)  # an empty scope covers everything


def test_scopes_are_validated() -> None:
    assert checked_scope("infra/tools/") == ("infra/tools",)
    assert checked_scope(["a", "b/c"]) == ("a", "b/c")
    with pytest.raises(ValueError, match="invalid scope prefix 'Infra'"):
        checked_scope(["Infra"])
    with pytest.raises(ValueError, match="invalid scope prefix ''"):
        checked_scope([""])
    with pytest.raises(TypeError):
        checked_scope([1])  # type: ignore[list-item]


def test_members_are_validated(make_host: Callable[..., Host]) -> None:
    plugin = make_host().new_admission_plugin(plugin_cmd("admit"))
    with pytest.raises(TypeError, match="chain member"):
        AdmissionChain([plugin, "not a plugin"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="scope prefix"):
        AdmissionChain([(plugin, ("bad prefix",))])
    chain = AdmissionChain([plugin, (plugin, "infra")])
    assert chain.members == ((plugin, ()), (plugin, ("infra",)))


def test_three_overlapping_scopes_ask_exactly_the_covering_plugins(make_host: Callable[..., Host]) -> None:
    records: list[dict[str, object]] = []
    host = make_host(audit_log=records.append)
    # Each plugin denies one package, whoever asks: a denial shows who was asked.
    wide = host.new_admission_plugin(plugin_cmd("deny-prefix", "infra/tools/wide"))
    narrow = host.new_admission_plugin(plugin_cmd("deny-prefix", "infra/tools/narrow"))
    everything = host.new_admission_plugin(plugin_cmd("deny-prefix", "infra/tools/all,top"))
    chain = AdmissionChain([(wide, ("infra",)), (narrow, ("infra/tools",)), everything])

    assert chain.check_admission(pin("infra/tools/ok")).result(timeout=30) is None
    assert chain.check_admission(pin("top")).exception(timeout=30) is not None  # only `everything` covers it

    def denier(package: str) -> str:
        error = chain.check_admission(pin(package)).exception(timeout=30)
        assert isinstance(error, AdmissionDenied), error
        return error.message

    assert denier("infra/tools/wide") == f"plugin {wide.name!r}: infra/tools/wide is under infra/tools/wide"
    assert denier("infra/tools/narrow").endswith("infra/tools/narrow is under infra/tools/narrow")
    assert denier("infra/tools/all").endswith("infra/tools/all is under infra/tools/all")
    host.close()
    asked: dict[str, int] = {}
    for record in records:
        asked[str(record["package"])] = asked.get(str(record["package"]), 0) + 1
    # infra/tools/* is covered by all three; "top" only by the unscoped one.
    assert asked == {
        "infra/tools/ok": 3,
        "top": 1,
        "infra/tools/wide": 3,
        "infra/tools/narrow": 3,
        "infra/tools/all": 3,
    }


def test_infra_toolsx_is_not_in_the_infra_tools_scope(make_host: Callable[..., Host]) -> None:
    host = make_host()
    strict = host.new_admission_plugin(plugin_cmd("deny-prefix", "infra"))
    chain = AdmissionChain([(strict, ("infra/tools",))])
    assert isinstance(chain.check_admission(pin("infra/tools")).exception(timeout=30), AdmissionDenied)
    assert isinstance(chain.check_admission(pin("infra/tools/x")).exception(timeout=30), AdmissionDenied)
    assert chain.check_admission(pin("infra/toolsx")).result(timeout=30) is None  # unscoped: admitted


def test_the_first_denial_in_chain_order_is_reported(make_host: Callable[..., Host]) -> None:
    host = make_host()
    # The first is slow to deny, the second quick: order, not speed, decides.
    slow = host.new_admission_plugin(plugin_cmd("slow", "0.3"))
    first = host.new_admission_plugin(plugin_cmd("deny-prefix", "infra"))
    second = host.new_admission_plugin(plugin_cmd("deny-prefix", "infra/tools"))
    chain = AdmissionChain([slow, first, second])
    error = chain.check_admission(pin("infra/tools/x")).exception(timeout=30)
    assert isinstance(error, AdmissionDenied)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.message == f"plugin {first.name!r}: infra/tools/x is under infra"


def test_an_error_beats_a_denial_and_names_its_plugin(make_host: Callable[..., Host]) -> None:
    host = make_host()
    denying = host.new_admission_plugin(plugin_cmd("deny-prefix", "error"))
    failing = host.new_admission_plugin(plugin_cmd("admit"))  # answers PERMISSION_DENIED for error/*
    missing = host.new_admission_plugin(["/nonexistent/policy-plugin"])
    chain = AdmissionChain([denying, failing])
    error = chain.check_admission(pin("error/x")).exception(timeout=30)
    assert type(error) is AdmissionError
    assert error.code is grpc.StatusCode.PERMISSION_DENIED
    assert error.message == f"plugin {failing.name!r}: no access"
    # A plugin that cannot start fails the whole check, with its own error type.
    chain = AdmissionChain([failing, (missing, ("ok",))])
    error = chain.check_admission(pin("ok/x")).exception(timeout=30)
    assert isinstance(error, PluginStartError)
    assert error.message.startswith("plugin 'policy-plugin': ")
    assert chain.check_admission(pin("other/x")).result(timeout=30) is None  # not in its scope


def test_futures_are_shared_per_pin_and_clear_cache_forwards(make_host: Callable[..., Host]) -> None:
    records: list[dict[str, object]] = []
    host = make_host(audit_log=records.append)
    one = host.new_admission_plugin(plugin_cmd("slow", "0.2"))
    two = host.new_admission_plugin(plugin_cmd("admit"))
    chain = AdmissionChain([one, two])
    first = chain.check_admission(pin("a/b"))
    assert chain.check_admission("a/b:" + hex_id(1)) is first  # pending
    assert not first.cancel()
    assert first.result(timeout=30) is None
    assert chain.check_admission(pin("a/b")) is first  # resolved
    chain.clear_cache()
    second = chain.check_admission(pin("a/b"))
    assert second is not first
    assert second.result(timeout=30) is None
    host.close()
    # Two checks per plugin: clear_cache() reached the plugins too.
    assert sorted(str(r["plugin"]) for r in records) == sorted([one.name, one.name, two.name, two.name])


def test_an_unscoped_pin_is_admitted_and_audited_as_unscoped(make_host: Callable[..., Host]) -> None:
    stream = io.StringIO()
    host = make_host(audit_log=stream)
    plugin = host.new_admission_plugin(plugin_cmd("deny-prefix", "infra"))
    chain = AdmissionChain([(plugin, ("infra",))])
    assert chain.check_admission(pin("other/tool")).result(timeout=1) is None
    host.close()
    [record] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["verdict"] == "unscoped"
    assert record["code"] == "OK"
    assert record["pin"] == str(pin("other/tool"))
    assert record["plugin"] == ""


def test_an_empty_chain_admits_everything() -> None:
    chain = AdmissionChain([])
    assert chain.check_admission(pin("any/thing")).result(timeout=1) is None


class _Interrupted(BaseException):
    """What a signal handler raises here: like KeyboardInterrupt, but not one
    that ends the test session."""


def test_an_interrupt_while_a_member_queue_is_full_leaves_no_future_pending(
    make_host: Callable[..., Host],
) -> None:
    """An exception that lands while the chain waits for room in a member's
    full queue fails that member's slot, so the chain's promise still
    resolves once its other members have answered, or the host closes."""
    host = make_host()
    admitting = host.new_admission_plugin(plugin_cmd("admit"))
    # A plugin that never connects: its queue of one fills and stays full.
    stuck = host.new_admission_plugin(plugin_cmd("never-connect"), max_pending=1)
    chain = AdmissionChain([admitting, stuck])
    first = chain.check_admission(pin("a/first"))  # fills the stuck member's queue

    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(_Interrupted):
            chain.check_admission(pin("a/second"))  # blocks on the full queue
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    second = chain.check_admission(pin("a/second"))  # the cached promise
    # It resolves without the stuck member: that slot failed when the
    # interrupt landed, and the admitting member answers.
    error = second.exception(timeout=30)
    assert isinstance(error, AdmissionError) and "interrupted" in error.message
    host.close()
    assert first.done() and second.done()
    chain.clear_cache()
    assert chain.check_admission(pin("a/second")).done()
