"""An event-driven dispatch for Flower 1.41's simulation engine: a message reaches its
ClientApp as soon as the ServerApp stores it, not on the engine's next 0.1 s tick.

Flower's engine hands stored messages to the Ray workers in one loop
(``flwr/server/superlink/fleet/vce/vce_api.py``, ``add_messages_to_queue``): it asks the
LinkState for one undelivered message per node, then ``f_stop.wait(0.1)``, a constant in the
function body. Every exchange therefore waits 50 ms on average before any client starts, a
fixed cost a split-learning step pays once per exchange (``benchmarks/bench_overhead.py``).

:func:`install` replaces that loop, in the process that runs the engine only, by the same scan
that also wakes when the LinkState stores a message (``store_message_ins``, the one call
through which the ServerApp's ``InMemoryGrid.push_messages`` queues messages), with Flower's
0.1 s as the fallback. What is delivered, and in which order, is unchanged: the same scan, at
most one message per node per pass; only the wait between passes is shorter (none after a
pass that delivered something). It applies to
flwr 1.41.0 only, and only where the loop has the signature and the LinkState the method read
here; anything else leaves Flower's loop as it is. It is on by default: on a quiet 2-core
machine it shortened a `flwr run` step by 23 ms at 4 clients and 117 ms at 16 (BENCHMARKS.md,
"Flower overhead"); ``ADC_ENGINE_DISPATCH=tick`` in the environment of
``scripts/flwr_run.sh`` keeps Flower's own loop.

The ClientApp module calls :func:`install` when it is imported: the engine imports it (to check
that it loads) before it starts its dispatch thread; Ray actors, SuperNodes and in-process
tests import it without the engine, and there it does nothing.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections.abc import Callable
from logging import INFO
from typing import Any

FLWR_VERSION = "1.41.0"  # the engine whose loop this replaces (read from its source)
ENGINE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"
DISPATCH_ENV = "ADC_ENGINE_DISPATCH"  # "event" (this module, the default) or "tick" (Flower's)
FALLBACK_S = 0.1  # Flower's tick: the longest a pass waits (and the reaction to f_stop)
_PARAMETERS = ("state", "queue", "nodes_mapping", "f_stop")


def _flwr_version() -> str:
    import flwr

    return str(getattr(flwr, "__version__", ""))


def wake_on_store(state: Any) -> threading.Event:
    """An event set after every ``state.store_message_ins`` (wrapped on this instance only;
    the grid and the engine share the LinkState instance)."""
    wake = threading.Event()
    store: Callable[..., Any] | None = getattr(state, "store_message_ins", None)
    if store is None:  # not the LinkState read here: the event stays unset (Flower's tick)
        return wake

    def store_and_wake(*args: Any, **kwargs: Any) -> Any:
        try:
            return store(*args, **kwargs)
        finally:
            wake.set()

    state.store_message_ins = store_and_wake
    return wake


def add_messages_to_queue(
    state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event
) -> None:
    """Flower 1.41's ``add_messages_to_queue``, with the wait between passes ended by a
    stored message (at most :data:`FALLBACK_S`)."""
    wake = wake_on_store(state)
    while not f_stop.is_set():
        wake.clear()  # a message stored during the pass below wakes the next one
        delivered = False
        for node_id in nodes_mapping:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
                delivered = True
        if not delivered:  # else pass again: a node may have a second message waiting
            wake.wait(FALLBACK_S)


def install() -> bool:
    """Use :func:`add_messages_to_queue` in this process's engine; True when it is in use.

    Does nothing (False) with ``ADC_ENGINE_DISPATCH=tick``, nor where the engine is not
    loaded, with another flwr version, or a loop of another signature.
    """
    if os.environ.get(DISPATCH_ENV, "event") != "event":
        return False
    engine = sys.modules.get(ENGINE_MODULE)
    if engine is None or _flwr_version() != FLWR_VERSION:
        return False
    current = getattr(engine, "add_messages_to_queue", None)
    if current is add_messages_to_queue:
        return True
    if current is None or tuple(inspect.signature(current).parameters) != _PARAMETERS:
        return False
    engine.add_messages_to_queue = add_messages_to_queue
    from flwr.common import log

    log(INFO, "adc-flwr: messages are dispatched when stored (clients/engine_dispatch.py)")
    return True
