"""SplitLearningStrategy: a Flower Strategy that hosts the ViT's back and drives split learning.

Flower's ``Strategy.start`` makes one train exchange per round; split learning needs one per
step, so ``start`` is overridden with the loop of DESIGN.md section 3. The five abstract
methods keep their Flower meaning: ``configure_train`` builds the round's ``train.start``
messages, ``aggregate_train`` is FedAvg of the client fronts (SplitFed).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from adc_flwr.accounting import Traffic, TrafficLedger
from adc_flwr.codec import (
    grads_to_record,
    record_to_packet,
    record_to_state,
    uncompressed_act_nbytes,
)
from adc_flwr.config import RunConfig
from adc_flwr.data import ImageSplit
from adc_flwr.results import RunDir
from adc_flwr.training import InputSpec, ServerWorker, evaluate, load_modules_state

log = logging.getLogger("adc_flwr")

POLL_INTERVAL_S = (
    0.005  # how often to pull replies (cheap, in memory); the engine ticks every 0.1 s
)


class TrainingDiverged(RuntimeError):
    """The server loss became NaN or infinite."""


@dataclass
class ClientRound:
    """One sampled client's progress within a round."""

    node_id: int
    partition_id: int
    steps: int
    step: int = 0
    packet: ArrayRecord | None = None
    final: RecordDict | None = None


@dataclass
class RoundOutcome:
    """What a round produced: finished clients' replies and whether the budget ran out."""

    finished: list[Message] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    budget_hit: bool = False


class SplitLearningStrategy(Strategy):
    """Owns the server back, its optimizer and loss; runs SplitFed or vanilla split learning.

    Args:
        cfg: the validated run config.
        server: the back, its optimizer and the compressor's server side.
        client_modules: the global client-side modules (front, learned encoder) whose
            weights are synchronised with the clients and evaluated.
        test_split, spec: central test data and how to feed it to the model.
        run_dir: where metrics go (None: nowhere).
        num_nodes: SuperNodes to wait for before the first round.
        progress: called with one line of text per round.
    """

    def __init__(
        self,
        cfg: RunConfig,
        server: ServerWorker,
        client_modules: dict[str, torch.nn.Module],
        test_split: ImageSplit,
        spec: InputSpec,
        *,
        run_dir: RunDir | None = None,
        num_nodes: int | None = None,
        progress: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.server = server
        self.client_modules = client_modules
        front = client_modules["front"]
        self.front_shape = (front.num_tokens, front.hidden_size)  # (n, d) of the front output
        self.test_split = test_split
        self.spec = spec
        self.run_dir = run_dir
        self.num_nodes = num_nodes
        self.progress = progress
        self.ledger = TrafficLedger()
        self.batches_done: dict[int, int] = {}  # partition id -> batches consumed so far
        self.dropped: dict[int, str] = {}  # node id -> reason (this round)
        self.in_flight: dict[int, str] = {}  # node id -> id of a message still unanswered
        self.history: list[dict[str, float]] = []
        self.settle_s = 1.0
        self.stop_reason = "num-server-rounds"
        self.start_round = 1
        self.global_step = 0
        self.wall_offset = 0.0
        self._wall_start = time.perf_counter()
        self._rng = random.Random(cfg.seed)

    # ---- Flower Strategy interface ------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """``train.start`` for each sampled node: the global front and the round config
        (``config`` entries are added to what the ClientApp needs)."""
        return self._start_messages(server_round, arrays, self.sample_nodes(grid), config)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the returned fronts, weighted by the examples each client trained on."""
        contents = [r.content for r in replies if not r.has_error()]
        if not contents:
            return None, None
        arrays = aggregate_arrayrecords(contents, "num-examples")
        examples = sum(int(c["metrics"]["num-examples"]) for c in contents)
        return arrays, MetricRecord({"num-examples": examples, "clients": len(contents)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation is central on the server (no compression), so no client messages."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "SplitLearningStrategy: %s, method=%s, compression=%g, %d round(s) of %s step(s)",
            self.cfg.sl_mode,
            self.cfg.method,
            self.cfg.compression,
            self.cfg.num_server_rounds,
            self.cfg.local_steps or "one epoch of",
        )

    # ---- sampling and messaging ---------------------------------------------------------

    def wait_for_nodes(self, grid: Grid, timeout: float = 120.0) -> list[int]:
        """Registered node ids, once at least ``num_nodes`` are there and the count has
        stopped changing for ``settle_s`` (SuperNodes may still be registering at t=0)."""
        deadline = time.monotonic() + timeout
        nodes: list[int] = []
        stable_since = time.monotonic()
        while True:
            current = sorted(grid.get_node_ids())
            if current != nodes:
                nodes, stable_since = current, time.monotonic()
            enough = len(nodes) >= (self.num_nodes or 1)
            if enough and time.monotonic() - stable_since >= self.settle_s:
                self.settle_s = 0.0  # settle once per run
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of min-nodes={self.num_nodes} SuperNodes registered "
                    f"within {timeout:.0f} s"
                )
            time.sleep(0.1)

    def sample_nodes(self, grid: Grid) -> list[int]:
        """``fraction-train`` of the registered nodes (at least one), seeded."""
        nodes = self.wait_for_nodes(grid)
        count = max(1, round(self.cfg.fraction_train * len(nodes)))
        free = self._free_nodes(grid, nodes)
        return sorted(self._rng.sample(free, min(count, len(free))))

    def exchange(self, grid: Grid, messages: list[Message]) -> dict[int, Message]:
        """Send, wait up to ``step-timeout``; failed or silent nodes are dropped and logged.

        A silent node's message stays in flight, and the node is not sampled again until its
        late reply has been pulled: a node never gets a second message before it answered.
        """
        if not messages:
            return {}
        ids = list(grid.push_messages(messages))
        node_of = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
        pending = set(ids)
        deadline = time.monotonic() + self.cfg.step_timeout
        by_node: dict[int, Message] = {}
        while pending:
            for reply in grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                node = node_of[reply.metadata.reply_to_message_id]
                if reply.has_error():
                    self._drop(node, f"client error: {reply.error.reason}")
                else:
                    by_node[node] = reply
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        for message_id in pending:
            node = node_of[message_id]
            self.in_flight[node] = message_id
            self._drop(node, f"no reply within step-timeout={self.cfg.step_timeout:g} s")
        return by_node

    def _free_nodes(self, grid: Grid, nodes: list[int]) -> list[int]:
        """Nodes without a message in flight (late replies are pulled and discarded)."""
        if self.in_flight:
            for reply in grid.pull_messages(list(self.in_flight.values())):
                late = [
                    n for n, i in self.in_flight.items() if i == reply.metadata.reply_to_message_id
                ]
                for node in late:
                    del self.in_flight[node]
        return [n for n in nodes if n not in self.in_flight]

    def _drop(self, node_id: int, reason: str) -> None:
        self.dropped[node_id] = reason
        self.progress(f"  dropped node {node_id}: {reason}")

    # ---- the split-learning loop --------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds of split learning; ``initial_arrays`` is the global client-side state."""
        result = Result()
        arrays = initial_arrays
        self.summary()
        for server_round in range(self.start_round, num_rounds + 1):
            self.dropped = {}
            if self.cfg.sl_mode == "splitfed":
                outcome, arrays_new = self.run_splitfed_round(grid, server_round, arrays)
            else:
                outcome, arrays_new = self.run_vanilla_round(grid, server_round, arrays)
            if arrays_new is not None:
                arrays = arrays_new
                load_modules_state(self.client_modules, record_to_state(arrays))
            result.arrays = arrays
            metrics = self.evaluate_round(server_round, outcome)
            result.evaluate_metrics_serverapp[server_round] = MetricRecord(metrics)
            self.after_round(server_round, arrays)
            if outcome.budget_hit:
                self.stop_reason = "budget-mb"
                break
            if not outcome.finished:
                self.stop_reason = "no-clients-left"
                break
        return result

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Called after each round's evaluation; the experiment runner checkpoints here."""

    def _start_messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        nodes: list[int],
        extra: ConfigRecord | None = None,
    ) -> list[Message]:
        config = ConfigRecord(
            {
                **(extra or {}),
                "round": server_round,
                # batches consumed per partition id so far, so the data stream is resumable
                "batches-done": [
                    self.batches_done.get(i, 0) for i in range(self._num_partitions(nodes))
                ],
            }
        )
        return [
            Message(
                RecordDict({"front": arrays, "config": config}),
                dst_node_id=node_id,
                message_type="train.start",
                group_id=str(server_round),
            )
            for node_id in nodes
        ]

    def _num_partitions(self, nodes: list[int]) -> int:
        return max(self.num_nodes or 0, len(nodes), max(self.batches_done, default=-1) + 1)

    def run_splitfed_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord
    ) -> tuple[RoundOutcome, ArrayRecord | None]:
        """All sampled clients in parallel, one server batch per step; FedAvg at the end."""
        nodes = self.sample_nodes(grid)
        outcome = self.run_clients(grid, server_round, arrays, nodes)
        # sum in partition order, not arrival order: float sums then repeat bit for bit
        outcome.finished.sort(key=lambda reply: int(reply.content["metrics"]["partition-id"]))
        new_arrays, _ = self.aggregate_train(server_round, outcome.finished)
        return outcome, new_arrays

    def run_vanilla_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord
    ) -> tuple[RoundOutcome, ArrayRecord | None]:
        """Sampled clients one after another; the front is relayed through the server."""
        total = RoundOutcome()
        current: ArrayRecord | None = None
        for node in self.sample_nodes(grid):
            outcome = self.run_clients(grid, server_round, current or arrays, [node])
            total.losses += outcome.losses
            if outcome.finished:
                total.finished += outcome.finished
                current = outcome.finished[-1].content["front"]
            if outcome.budget_hit:
                total.budget_hit = True
                break
        return total, current

    def run_clients(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, nodes: list[int]
    ) -> RoundOutcome:
        """Steps of split learning with ``nodes`` until each has done its steps."""
        outcome = RoundOutcome()
        sync = Traffic.of_model_sync(arrays)
        replies = self.exchange(grid, self._start_messages(server_round, arrays, nodes))
        active: dict[int, ClientRound] = {}
        for node, reply in replies.items():
            metrics = reply.content["metrics"]
            steps = self.cfg.local_steps or int(metrics["steps-per-epoch"])
            pid = int(metrics["partition-id"])
            active[node] = ClientRound(node, pid, steps, packet=reply.content["packet"])
            self.ledger.add(server_round, pid, sync)
        step = 0
        while active:
            loss, grads = self._server_step(server_round, step, active)
            outcome.losses.append(loss)
            messages, last_nodes = [], set()
            budget_hit = False
            for node, grad in grads.items():
                client = active[node]
                record = grads_to_record(grad, self.cfg.wire_dtype)
                self.ledger.add(server_round, client.partition_id, Traffic.of_grads(record), step)
                if self.cfg.budget_mb > 0 and self.ledger.mb_sent >= self.cfg.budget_mb:
                    budget_hit = True
                messages.append((node, record))
            for node, _ in messages:
                if budget_hit or active[node].step + 1 >= active[node].steps:
                    last_nodes.add(node)
            outcome.budget_hit |= budget_hit
            sent = [
                Message(
                    RecordDict(
                        {
                            "grads": record,
                            "config": ConfigRecord(
                                {"step": active[node].step + 1, "last": node in last_nodes}
                            ),
                        }
                    ),
                    dst_node_id=node,
                    message_type="train.step",
                    group_id=str(server_round),
                )
                for node, record in messages
            ]
            replies = self.exchange(grid, sent)
            self._record_step(server_round, step, loss)
            for node in list(active):
                client = active.pop(node)
                reply = replies.get(node)
                if reply is None:
                    continue
                self.batches_done[client.partition_id] = (
                    self.batches_done.get(client.partition_id, 0) + 1
                )
                if node in last_nodes:
                    self.ledger.add(
                        server_round,
                        client.partition_id,
                        Traffic.of_model_sync(reply.content["front"]),
                    )
                    outcome.finished.append(reply)
                else:
                    client.step += 1
                    client.packet = reply.content["packet"]
                    active[node] = client
            step += 1
            self.global_step += 1
            if self.cfg.eval_every and self.global_step % self.cfg.eval_every == 0:
                self._evaluate_now(server_round, step)
        return outcome

    def _server_step(
        self, server_round: int, step: int, active: dict[int, ClientRound]
    ) -> tuple[float, dict[int, dict[str, torch.Tensor]]]:
        """Decode every active client's packet, one server batch, gradients per client."""
        # fixed order (by partition), whatever order the replies arrived in: the server batch,
        # and with it every seeded draw after it (channel noise), is reproducible
        nodes = sorted(active, key=lambda node: active[node].partition_id)
        packets = []
        for node in nodes:
            client = active[node]
            received = record_to_packet(client.packet)
            packets.append(received)
            # the reference is what method `none` would send for the same batch: B samples
            # (soft-label counts add up to B), all tokens, float32
            batch = int(received.targets.sum()) if received.soft_targets else len(received.targets)
            reference = uncompressed_act_nbytes(batch, *self.front_shape)
            self.ledger.add(
                server_round, client.partition_id, Traffic.of_packet(client.packet, reference), step
            )
        loss, grads = self.server.step(packets)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"server loss is {loss} at round {server_round}, step {step}: training diverged "
                f"(try a lower lr than {self.cfg.lr:g})"
            )
        return loss, dict(zip(nodes, grads, strict=True))

    # ---- evaluation and metrics ---------------------------------------------------------

    def sampler_state(self) -> tuple:
        """State of the client sampler's RNG (for checkpoints)."""
        return self._rng.getstate()

    def set_sampler_state(self, state: list | tuple) -> None:
        version, internal, gauss = state
        self._rng.setstate((version, tuple(internal), gauss))

    def elapsed(self) -> float:
        """Wall seconds of this run, earlier runs of a resumed run included."""
        return self.wall_offset + time.perf_counter() - self._wall_start

    def _record_step(self, server_round: int, step: int, loss: float) -> None:
        if self.run_dir is None:
            return
        total = self.ledger.total()
        self.run_dir.append_metrics(
            {
                "kind": "step",
                "round": server_round,
                "step": step,
                "train_loss": loss,
                **total.as_dict(),
                "wall_time_s": self.elapsed(),
            }
        )

    def _evaluate_now(self, server_round: int, step: int | None) -> tuple[float, float]:
        acc, loss = evaluate(
            self.client_modules["front"],
            self.server.back,
            self.test_split,
            self.spec,
            self.cfg.eval_batch_size,
            encoder=self.client_modules.get("encoder"),
            decoder=self.server.compressor.server_module(),
        )
        if self.run_dir is not None:
            self.run_dir.append_metrics(
                {
                    "kind": "eval",
                    "round": server_round,
                    "step": step,
                    "test_accuracy": acc,
                    "test_loss": loss,
                    **self.ledger.total().as_dict(),
                    "wall_time_s": self.elapsed(),
                }
            )
        return acc, loss

    def evaluate_round(self, server_round: int, outcome: RoundOutcome) -> dict[str, float]:
        """Central evaluation of the global front + back, then one progress line."""
        acc, loss = self._evaluate_now(server_round, None)
        total = self.ledger.total()
        train_loss = float(np.mean(outcome.losses)) if outcome.losses else math.nan
        row = {
            "round": server_round,
            "test_accuracy": acc,
            "test_loss": loss,
            "train_loss": train_loss,
            "mb_up": total.up / 1e6,
            "mb_down": total.down / 1e6,
            "mb_model_sync": total.bytes_model_sync / 1e6,
            "compression_ratio": total.compression_ratio,
            "clients": len(outcome.finished),
            "wall_time_s": self.elapsed(),
        }
        self.history.append(row)
        if self.run_dir is not None:
            self.run_dir.flush()
        self.progress(
            f"round {server_round:>3}/{self.cfg.num_server_rounds} | acc {acc:.4f} | "
            f"test loss {loss:.4f} | train loss {train_loss:.4f} | "
            f"up {row['mb_up']:.1f} MB | down {row['mb_down']:.1f} MB | "
            f"sync {row['mb_model_sync']:.1f} MB | compression {row['compression_ratio']:.4f} | "
            f"clients {row['clients']} | {row['wall_time_s']:.1f} s"
        )
        return row
