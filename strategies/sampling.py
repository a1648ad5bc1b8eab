"""Who trains this round: data partitions, sampled with a seeded generator, mapped to nodes.

Under Ray node ids are random 64-bit integers that say nothing about the data a node holds,
so the sampler asks each new node which partition it holds (``query.info``, see
:func:`strategies.messaging.discover_partitions`) and draws partition ids: the same seed
samples the same partitions whatever the node ids are.

With ``num-partitions`` (pooled clients) nobody is asked: the population is that many
partitions, and each round's picks are handed to free nodes, which run whichever client
they are sent. A client's result never depends on the node that runs it, so start-up costs
the same for 10 or 100 000 partitions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.serverapp import Grid

from adc_flwr.config import RunConfig
from strategies.messaging import Messenger, discover_partitions


@dataclass
class Draw:
    """One round's sample.

    Attributes:
        picks: the partitions drawn, ascending.
        unavailable: those of them whose node cannot take a message now, with why.
        offline: partitions not reachable at the round's start (simulated availability).
        keep: with over-selection, how many of the picks go on after the first exchange.
    """

    picks: list[int]
    unavailable: dict[int, str]
    offline: int = 0
    keep: int | None = None


class PartitionSampler:
    """The partition -> node map of a run and the seeded draw of each round's clients."""

    def __init__(self, cfg: RunConfig, progress: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.progress = progress
        self.nodes: dict[int, int] = {}  # partition id -> node id holding it
        self.num_partitions = 0  # as the nodes report it
        self.settle_s = 1.0
        self.announced = False  # the pooled population was described (once per process)
        self._rng = random.Random(cfg.seed)

    def wait_for_nodes(self, grid: Grid, timeout: float = 120.0) -> list[int]:
        """Registered node ids, once at least ``min-nodes`` are there and the count has
        stopped changing for ``settle_s`` (SuperNodes may still be registering at t=0)."""
        deadline = time.monotonic() + timeout
        nodes: list[int] = []
        stable_since = time.monotonic()
        while True:
            current = sorted(grid.get_node_ids())
            if current != nodes:
                nodes, stable_since = current, time.monotonic()
            enough = len(nodes) >= self.cfg.min_nodes
            if enough and time.monotonic() - stable_since >= self.settle_s:
                self.settle_s = 0.0  # settle once per run
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of min-nodes={self.cfg.min_nodes} SuperNodes registered "
                    f"within {timeout:.0f} s"
                )
            time.sleep(0.1)

    def available(self, messenger: Messenger) -> dict[int, str]:
        """Every partition of the run -> why it cannot train now ("" when it can): its node
        is not registered (or never said which partition it holds), or owes a reply.

        New nodes are asked which partition they hold first.
        """
        registered = self.wait_for_nodes(messenger.grid)
        known = set(self.nodes.values())
        busy = messenger.busy_nodes()
        unknown = [n for n in registered if n not in known and n not in busy]
        if unknown:
            started = time.perf_counter()
            found, num_partitions, silent = discover_partitions(
                messenger, unknown, self.cfg.start_timeout
            )
            for partition, node in found.items():
                if self.nodes.get(partition, node) != node and self.nodes[partition] in registered:
                    raise RuntimeError(
                        f"nodes {self.nodes[partition]} and {node} both hold partition {partition}"
                    )
            self.nodes.update(found)
            self.num_partitions = max(self.num_partitions, num_partitions)
            self.progress(
                f"{len(found)} node(s) hold partitions {describe_ids(sorted(found))} "
                f"(asked in {time.perf_counter() - started:.1f} s)"
                + (f"; {len(silent)} did not answer" if silent else "")
            )
        alive, busy = set(registered), messenger.busy_nodes()
        reasons = {}
        for partition in range(max(self.num_partitions, max(self.nodes, default=-1) + 1)):
            node = self.nodes.get(partition)
            if node is None or node not in alive:
                reasons[partition] = "no registered node holds it"
            elif node in busy:
                reasons[partition] = "its node still owes a reply to an earlier message"
            else:
                reasons[partition] = ""
        return reasons

    def sample(
        self,
        messenger: Messenger,
        reachable: Callable[[int], np.ndarray],
    ) -> Draw:
        """This round's draw, in ascending order, with the seeded generator: of the
        partitions reachable at the round's start (``reachable(N)``, the simulated
        availability), ``clients_per_round`` times ``over-select``. Also those
        picks that cannot train now, with why. The draw never depends on which nodes are
        registered or busy (a resumed run draws the same), so such a pick is not replaced:
        it counts against ``min-clients``.
        """
        if self.cfg.pooled:
            registered = self.wait_for_nodes(messenger.grid)
            self.num_partitions = self.cfg.num_partitions
            draw = self._draw(self.num_partitions, reachable)
            draw.unavailable = self.assign(draw.picks, registered, messenger.busy_nodes())
            if not self.announced:
                self.announced = True
                self.progress(
                    f"{self.num_partitions} partitions (num-partitions), drawn clients run on "
                    f"{len(registered)} SuperNode(s)"
                )
            return draw
        reasons = self.available(messenger)
        if not reasons:
            raise RuntimeError("no SuperNode answered which data partition it holds")
        draw = self._draw(len(reasons), reachable)
        draw.unavailable = {p: reasons[p] for p in draw.picks if reasons[p]}
        return draw

    def _draw(self, total: int, reachable: Callable[[int], np.ndarray]) -> Draw:
        count = self.cfg.clients_per_round(total)
        wanted = self.cfg.draws_per_round(total)
        online = np.flatnonzero(reachable(total)).tolist()
        picks = sorted(self._rng.sample(online, min(wanted, len(online))))
        keep = count if wanted > count else None
        return Draw(picks=picks, unavailable={}, offline=total - len(online), keep=keep)

    def assign(self, picks: list[int], registered: list[int], busy: set[int]) -> dict[int, str]:
        """Pooled clients: hand ``picks`` to free nodes for this round (the partition ->
        node map is this round's from now on); the picks left without a node, with why."""
        free = sorted(set(registered) - busy)
        self.nodes.clear()
        self.nodes.update(zip(picks, free, strict=False))
        why = (
            f"no free SuperNode to run it ({len(free)} free for {len(picks)} drawn: raise "
            "num-supernodes, or nodes still owe replies)"
        )
        return {p: why for p in picks[len(free) :]}

    def state_dict(self) -> tuple:
        """The generator's state (for checkpoints)."""
        return self._rng.getstate()

    def load_state_dict(self, state: list | tuple) -> None:
        version, internal, gauss = state
        self._rng.setstate((version, tuple(internal), gauss))


def describe_ids(values: list[int]) -> str:
    """``0-3, 7, 9-10`` for sorted ints: a short description of many partition ids."""
    parts: list[str] = []
    for value in values:
        if parts and value == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{value}"
        else:
            parts.append(str(value))
    return ", ".join(parts) or "none"
