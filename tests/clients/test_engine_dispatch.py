"""The event-driven dispatch for Flower 1.41's simulation engine: where it installs, where it
leaves Flower alone, and that a stored message wakes it without waiting for a tick."""

from __future__ import annotations

import inspect
import queue
import sys
import threading
import types

import pytest

from clients import engine_dispatch


class FakeState:
    """The two LinkState calls the dispatch uses: messages by node, delivered once."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def store_message_ins(self, node_id: int, message: str) -> str:
        with self.lock:
            self.pending.append((node_id, message))
        return message

    def get_message_ins(self, *, node_id: int, limit: int) -> list[str]:
        with self.lock:
            mine = [m for m in self.pending if m[0] == node_id][:limit]
            for m in mine:
                self.pending.remove(m)
        return [message for _, message in mine]


def flower_loop(state, queue, nodes_mapping, f_stop) -> None:  # the signature read
    """A stand-in with the signature of flwr 1.41's ``add_messages_to_queue``."""


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A fake engine module in ``sys.modules``, flwr reporting 1.41.0, the dispatch asked for."""
    module = types.ModuleType(engine_dispatch.ENGINE_MODULE)
    module.add_messages_to_queue = flower_loop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, engine_dispatch.ENGINE_MODULE, module)
    monkeypatch.setattr(engine_dispatch, "_flwr_version", lambda: "1.41.0")
    monkeypatch.setenv(engine_dispatch.DISPATCH_ENV, "event")
    return module


def test_installs_in_the_engine_of_flwr_1_41(engine: types.ModuleType) -> None:
    assert engine_dispatch.install()
    assert engine.add_messages_to_queue is engine_dispatch.add_messages_to_queue
    assert engine_dispatch.install()  # twice is once


def test_leaves_other_versions_alone(
    engine: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_dispatch, "_flwr_version", lambda: "1.42.0")
    assert not engine_dispatch.install()
    assert engine.add_messages_to_queue is flower_loop


def test_leaves_a_loop_of_another_signature_alone(engine: types.ModuleType) -> None:
    def other(state, queue, f_stop) -> None:
        pass

    engine.add_messages_to_queue = other  # type: ignore[attr-defined]
    assert not engine_dispatch.install()
    assert engine.add_messages_to_queue is other


def test_flowers_loop_when_asked(engine: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine_dispatch.DISPATCH_ENV, "tick")
    assert not engine_dispatch.install()
    assert engine.add_messages_to_queue is flower_loop


def test_on_by_default(engine: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(engine_dispatch.DISPATCH_ENV, raising=False)
    assert engine_dispatch.install()
    assert engine.add_messages_to_queue is engine_dispatch.add_messages_to_queue


def test_nothing_without_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray actor, a SuperNode's ClientApp or an in-process test: no engine, no change."""
    monkeypatch.delitem(sys.modules, engine_dispatch.ENGINE_MODULE, raising=False)
    assert not engine_dispatch.install()
    assert engine_dispatch.ENGINE_MODULE not in sys.modules


def test_the_installed_flwr_is_the_one_read() -> None:
    """The pin and the loop this module replaces: if flwr moves, this says so."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    assert engine_dispatch._flwr_version() == engine_dispatch.FLWR_VERSION
    original = vce_api.add_messages_to_queue
    assert tuple(inspect.signature(original).parameters) == engine_dispatch._PARAMETERS
    assert "f_stop.wait(0.1)" in inspect.getsource(original)
    assert hasattr(InMemoryLinkState, "store_message_ins")


def test_a_stored_message_wakes_the_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fallback of a minute, a message still reaches the queue at once: the store
    wakes the loop. Each node gets at most one message per pass, in node order."""
    monkeypatch.setattr(engine_dispatch, "FALLBACK_S", 60.0)
    state, out, f_stop = FakeState(), queue.Queue(), threading.Event()
    state.store_message_ins(1, "early")  # stored before the dispatch started
    thread = threading.Thread(
        target=engine_dispatch.add_messages_to_queue, args=(state, out, {1: 0, 2: 1}, f_stop)
    )
    thread.start()
    try:
        assert out.get(timeout=30) == "early"
        state.store_message_ins(2, "b")
        assert out.get(timeout=30) == "b"
        state.store_message_ins(1, "c")
        state.store_message_ins(1, "d")
        assert [out.get(timeout=30), out.get(timeout=30)] == ["c", "d"]
    finally:
        f_stop.set()
        state.store_message_ins(0, "stop")  # wakes the wait, which then sees f_stop
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert out.empty()
