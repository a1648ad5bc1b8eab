"""Messages of the split-learning loop: push, pull within a timeout, in-flight nodes.

Flower's ``Grid.send_and_receive`` waits for every reply or gives up on all of them; split
learning needs more: replies as they come, a per-exchange limit, and the rule that a node
never gets a second message while its first is unanswered (two messages on one node race on
its ``context.state``). :class:`Messenger` keeps that rule across exchanges and rounds;
:func:`discover_partitions` learns which node holds which data partition, since node ids
(random 64-bit integers under Ray) say nothing about it; :class:`Post` addresses messages by
partition, the only name the strategy uses for a client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from adc_flwr.run.summary import ERROR, TIMEOUT
from strategies.outcomes import Failure, RoundOutcome, describe_failures, readable_reason

POLL_INTERVAL_S = 0.005  # how often to pull replies (cheap, in memory); the engine ticks 0.1 s

# Flower's simulation engine scans every queued message for every node on each 0.1 s tick
# (InMemoryLinkState.get_message_ins), so thousands of messages in flight at once cost
# quadratic time; asking nodes in batches keeps the queue short.
DISCOVERY_BATCH = 64


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
                    result.failures[node] = Failure(ERROR, readable_reason(reply.error.reason))
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


class Post:
    """Messages addressed by data partition: built for the node that holds the partition,
    exchanged through the grid's :class:`Messenger`, failures reported; replies by partition.
    """

    def __init__(self, nodes: Mapping[int, int], progress: Callable[[str], None]) -> None:
        self.nodes = nodes  # partition id -> node id: the sampler's map, filled as nodes answer
        self.progress = progress
        self.messenger: Messenger | None = None

    def on(self, grid: Grid) -> Messenger:
        """The messenger of ``grid`` (a new one when the run moves to another grid)."""
        if self.messenger is None or self.messenger.grid is not grid:
            self.messenger = Messenger(grid)
        return self.messenger

    def message(self, partition: int, kind: str, server_round: int, **records: Any) -> Message:
        """A message of type ``kind`` (``train.start``...) to ``partition``'s node."""
        return Message(
            RecordDict(records),
            dst_node_id=self.nodes[partition],
            message_type=kind,
            group_id=str(server_round),
        )

    def by_partition(self, messages: Iterable[Message]) -> dict[int, Message]:
        """``messages`` keyed by the partition their node holds, in their order."""
        partition_of = {node: p for p, node in self.nodes.items()}
        return {partition_of[m.metadata.dst_node_id]: m for m in messages}

    def exchange(
        self, messages: dict[int, Message], timeout: float, outcome: RoundOutcome | None = None
    ) -> dict[int, Message]:
        """Send one message per partition; replies by partition, failures into ``outcome``
        (None: a message outside training, whose failure drops nobody)."""
        if not messages:
            return {}
        partition_of = {m.metadata.dst_node_id: p for p, m in messages.items()}
        assert self.messenger is not None  # set by on(grid) when the round sampled
        result = self.messenger.exchange(list(messages.values()), timeout)
        failed = {partition_of[node]: f for node, f in result.failures.items()}
        if failed and outcome is not None:
            outcome.failures.update(failed)
            self.progress(f"  dropped: {describe_failures(failed)}")
        elif failed:
            kinds = ", ".join(sorted({m.metadata.message_type for m in messages.values()}))
            self.progress(f"  {kinds} not answered: {describe_failures(failed)}")
        return {partition_of[node]: reply for node, reply in result.replies.items()}

    def idle(self, partitions: list[int]) -> list[int]:
        """Those of ``partitions`` whose node owes no reply (may be sent a message now)."""
        assert self.messenger is not None
        busy = self.messenger.busy_nodes()
        return [p for p in partitions if self.nodes[p] not in busy]


def relayed(start: Message, front: ArrayRecord) -> Message:
    """Vanilla SL: ``start`` as its client's turn comes, carrying the front the previous
    client returned (a new message: its time to live starts when it is sent)."""
    return Message(
        RecordDict({**start.content, "front": front}),
        dst_node_id=start.metadata.dst_node_id,
        message_type=start.metadata.message_type,
        group_id=start.metadata.group_id,
    )


def fronts(replies: Iterable[Message]) -> list[RecordDict]:
    """The fronts and example counts of ``replies``, for FedAvg: nothing else a reply
    carries (a packet beside a probed front, a pooled client's moments) is averaged."""
    return [
        RecordDict({"front": r.content["front"], "metrics": r.content["metrics"]})
        for r in replies
        if not r.has_error()
    ]
