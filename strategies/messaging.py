"""Messages of the split-learning loop: push, pull within a timeout, in-flight nodes.

Flower's ``Grid.send_and_receive`` waits for every reply or gives up on all of them; split
learning needs more: replies as they come, a per-exchange limit, and the rule that a node
never gets a second message while its first is unanswered (two messages on one node race on
its ``context.state``). :class:`Messenger` keeps that rule across exchanges and rounds;
:func:`discover_partitions` learns which node holds which data partition, since node ids
(random 64-bit integers under Ray) say nothing about it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from adc_flwr.run.summary import ERROR, TIMEOUT

POLL_INTERVAL_S = 0.005  # how often to pull replies (cheap, in memory); the engine ticks 0.1 s

# Flower's simulation engine scans every queued message for every node on each 0.1 s tick
# (InMemoryLinkState.get_message_ins), so thousands of messages in flight at once cost
# quadratic time; asking nodes in batches keeps the queue short.
DISCOVERY_BATCH = 64



@dataclass
class Failure:
    """Why a node gave no usable reply: ``reason`` is ``error`` or ``timeout``."""

    reason: str
    detail: str


@dataclass
class ExchangeResult:
    """Replies by node id, and the nodes that failed with why."""

    replies: dict[int, Message] = field(default_factory=dict)
    failures: dict[int, Failure] = field(default_factory=dict)


class Messenger:
    """Exchanges on one grid; remembers messages still unanswered after their timeout."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.in_flight: dict[str, int] = {}  # message id -> node id, unanswered past timeout

    def busy_nodes(self) -> set[int]:
        """Nodes with a message still unanswered; late replies are pulled and discarded."""
        if self.in_flight:
            for reply in self.grid.pull_messages(list(self.in_flight)):
                self.in_flight.pop(reply.metadata.reply_to_message_id, None)
        return set(self.in_flight.values())

    def exchange(self, messages: list[Message], timeout: float) -> ExchangeResult:
        """Send ``messages`` (at most one per node, none to a busy node) and wait up to
        ``timeout`` seconds; error replies and silent nodes become failures."""
        result = ExchangeResult()
        if not messages:
            return result
        targets = [m.metadata.dst_node_id for m in messages]
        if len(set(targets)) != len(targets):
            raise ValueError("two messages for one node in one exchange would race on its state")
        if busy := self.busy_nodes() & set(targets):
            raise ValueError(f"node(s) {sorted(busy)} still owe a reply; message them later")
        ids = list(self.grid.push_messages(messages))
        node_of = {}
        for message_id, node in zip(ids, targets, strict=False):
            if message_id:
                node_of[message_id] = node
            else:  # the grid refused it: the node is gone
                result.failures[node] = Failure(ERROR, "the grid could not deliver the message")
        pending = set(node_of)
        deadline = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                message_id = reply.metadata.reply_to_message_id
                pending.discard(message_id)
                node = node_of[message_id]
                if reply.has_error():
                    result.failures[node] = Failure(ERROR, reply.error.reason)
                else:
                    result.replies[node] = reply
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        for message_id in pending:
            self.in_flight[message_id] = node_of[message_id]
            result.failures[node_of[message_id]] = Failure(
                TIMEOUT, f"no reply within {timeout:g} s"
            )
        return result


def discover_partitions(
    messenger: Messenger, node_ids: Iterable[int], timeout: float, batch: int = DISCOVERY_BATCH
) -> tuple[dict[int, int], int, dict[int, Failure]]:
    """Ask each node which partition it holds (``query.info``), ``batch`` nodes at a time.

    Returns ``{partition id: node id}``, the number of partitions the nodes report (0 when
    none answered) and the nodes that did not answer. Two nodes that claim one partition
    are an error: their data would be trained twice.
    """
    holders: dict[int, int] = {}
    failures: dict[int, Failure] = {}
    num_partitions = 0
    nodes = list(node_ids)
    for start in range(0, len(nodes), batch):
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type="query.info")
            for node in nodes[start : start + batch]
        ]
        result = messenger.exchange(messages, timeout)
        failures.update(result.failures)
        for node, reply in result.replies.items():
            info = reply.content["info"]
            partition = int(info["partition-id"])
            num_partitions = max(num_partitions, int(info["num-partitions"]))
            if partition in holders:
                raise RuntimeError(
                    f"nodes {holders[partition]} and {node} both hold partition {partition}"
                )
            holders[partition] = node
    return holders, num_partitions, failures
