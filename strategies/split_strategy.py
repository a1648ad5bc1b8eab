"""SplitLearningStrategy: a Flower Strategy that hosts the ViT's back and drives split learning.

Flower's ``Strategy.start`` makes one train exchange per round; split learning needs one per
step, so ``start`` is overridden with the loop of DESIGN.md section 3, which reads top to
bottom below: sample partitions, start them, step until each has done its steps, average
(SplitFed) or relay (vanilla) the fronts, evaluate. Messaging lives in
:mod:`strategies.messaging`, round outcomes in :mod:`strategies.outcomes`.

Clients are sampled by data partition, never by node id: under Ray node ids are random, so
the seeded sampler draws partition ids and :func:`discover_partitions` maps them to nodes.
Each client is sent its own data cursor (batches it consumed in earlier rounds).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from adc_flwr.compression import Compressor, build_compressor
from adc_flwr.config import RunConfig
from adc_flwr.data import ImageSplit
from adc_flwr.model.flops import step_flops
from adc_flwr.model.inputs import InputSpec
from adc_flwr.run.run_dir import RunDir
from adc_flwr.run.summary import STRAGGLER, UNAVAILABLE
from adc_flwr.training.modules import load_modules_state
from adc_flwr.training.workers import ServerWorker
from adc_flwr.wire.accounting import Traffic, TrafficLedger
from adc_flwr.wire.codec import (
    grads_to_record,
    record_to_packet,
    record_to_state,
    uncompressed_act_nbytes,
)
from strategies.evaluation import Evaluation
from strategies.messaging import Failure, Messenger
from strategies.outcomes import RoundOutcome, describe_failures
from strategies.sampling import Draw, PartitionSampler
from strategies.simulated_clients import DROP_DETAIL, ClientCost, SimulatedClients

log = logging.getLogger("adc_flwr")


class TrainingDiverged(RuntimeError):
    """The server loss became NaN or infinite."""


@dataclass
class ClientRound:
    """One started client's progress within a round."""

    node_id: int
    partition_id: int
    steps: int  # steps it does this round
    packet: ArrayRecord  # the packet in flight
    batch: int  # samples of the batch behind that packet
    step: int = 0  # steps done

    @property
    def on_last_step(self) -> bool:
        return self.step + 1 >= self.steps


class SplitLearningStrategy(Evaluation, Strategy):
    """Owns the server back, its optimizer and loss; runs SplitFed or vanilla split learning.

    Args:
        cfg: the validated run config.
        server: the back, its optimizer and the compressor's server side.
        client_modules: the global client-side modules (front, learned encoder) whose
            weights are synchronised with the clients and evaluated.
        test_split, spec: central test data and how to feed it to the model.
        run_dir: where metrics go (None: nowhere).
        progress: called with one line of text per round (and per group of drops).
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
        self.progress = progress
        self.ledger = TrafficLedger()
        self.batches_done: dict[int, int] = {}  # partition id -> batches consumed so far
        self.sampler = PartitionSampler(cfg, progress)
        self.history: list[dict[str, float]] = []
        self.stop_reason = "num-server-rounds"
        self.start_round = 1
        self.global_step = 0
        self.wall_offset = 0.0
        self.timeout = cfg.step_timeout
        self.started: set[int] = set()  # partitions started in this process (warm)
        self.messenger: Messenger | None = None
        self._wall_start = time.perf_counter()
        self._probe_modules: dict[str, torch.nn.Module] | None = None
        self.clients = SimulatedClients(
            cfg,
            lambda: step_flops(front, server.back, server.compressor, spec.pixel_shape),
            uncompressed_act_nbytes(cfg.batch_size, *self.front_shape),
            run_dir,
        )
        self._compressors: dict[float, Compressor] = {cfg.compression: server.compressor}

    # ---- Flower Strategy interface ------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """``train.start`` for each sampled partition's node: the global front, the round
        config (``config`` entries are added) and that client's own data cursor."""
        draw = self.sample(grid, server_round)
        return [
            self.start_message(server_round, arrays, partition, config)
            for partition in draw.picks
            if partition not in draw.unavailable
        ]

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

    # ---- sampling ---------------------------------------------------------------------

    def sample(self, grid: Grid, server_round: int) -> Draw:
        """This round's partitions, drawn from those reachable at its start, and those that
        cannot train (see :meth:`PartitionSampler.sample`); each call draws once from the
        seeded generator and chooses each pick's ξ."""
        if self.messenger is None or self.messenger.grid is not grid:
            self.messenger = Messenger(grid)
        draw = self.sampler.sample(self.messenger, self.clients.reachable(server_round))
        self.clients.begin_round(draw.picks)
        return draw

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
        """Run rounds ``start_round..num_rounds`` of split learning.

        Flower's arguments keep their meaning: ``initial_arrays`` is the global client-side
        state, ``timeout`` the seconds to wait for the replies of one exchange (one step),
        ``train_config`` goes to every client in ``train.start``, and ``evaluate_fn(round,
        arrays)`` runs after each round (and before the first) beside the built-in central
        evaluation. ``evaluate_config`` is refused: no client evaluates here.
        """
        if evaluate_config:
            raise ValueError(
                "SplitLearningStrategy evaluates centrally; evaluate_config has no use here"
            )
        self.timeout = timeout
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        self.summary()
        if evaluate_fn is not None and self.start_round == 1:
            self._record_evaluate_fn(result, evaluate_fn, 0, arrays)
        for server_round in range(self.start_round, num_rounds + 1):
            if self.budget_spent():  # the last round's front uploads crossed it
                self.stop_reason = "budget-mb"
                break
            outcome, new_arrays = self.run_round(grid, server_round, arrays, train_config)
            if new_arrays is not None:
                arrays = new_arrays
                load_modules_state(self.client_modules, record_to_state(arrays))
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = MetricRecord(
                {
                    "num-examples": sum(
                        int(r.content["metrics"]["num-examples"]) for r in outcome.finished.values()
                    ),
                    "clients": len(outcome.finished),
                }
            )
            metrics = self.evaluate_round(server_round, outcome)
            result.evaluate_metrics_serverapp[server_round] = MetricRecord(metrics)
            if evaluate_fn is not None:
                self._record_evaluate_fn(result, evaluate_fn, server_round, arrays)
            outcome.check(server_round, self.cfg.min_clients)
            if outcome.budget_hit:
                self.stop_reason = "budget-mb"
            self.after_round(server_round, arrays)
            if outcome.budget_hit:
                break
        return result

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Called after each round that met ``min-clients``; the runner checkpoints here."""

    def run_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord | None = None,
    ) -> tuple[RoundOutcome, ArrayRecord | None]:
        """One round: SplitFed trains the sampled clients in parallel and averages their
        fronts; vanilla SL trains them one after another, relaying the front."""
        draw = self.sample(grid, server_round)
        outcome = RoundOutcome(sampled=draw.picks, offline=draw.offline)
        outcome.failures |= {p: Failure(UNAVAILABLE, why) for p, why in draw.unavailable.items()}
        if draw.unavailable:
            self.progress(f"  unavailable: {describe_failures(outcome.failures)}")
        ready = [p for p in draw.picks if p not in draw.unavailable]
        if self.cfg.sl_mode == "splitfed":
            self.train_clients(server_round, arrays, ready, outcome, train_config, keep=draw.keep)
            self.stop_cut_clients(server_round)
            # sum in partition order, not arrival order: float sums then repeat bit for bit
            finished = [outcome.finished[p] for p in sorted(outcome.finished)]
            new_arrays, _ = self.aggregate_train(server_round, finished)
            self.federated_evaluate(server_round, new_arrays, outcome)
            return outcome, new_arrays
        current = arrays
        for i, partition in enumerate(ready):
            if outcome.budget_hit:
                outcome.not_started = ready[i:]
                break
            last_turn = i == len(ready) - 1
            self.train_clients(server_round, current, [partition], outcome, train_config, last_turn)
            if partition in outcome.finished:
                current = outcome.finished[partition].content["front"]
        self.stop_cut_clients(server_round)
        new_arrays = current if outcome.finished else None
        self.federated_evaluate(server_round, new_arrays, outcome)
        return outcome, new_arrays

    def train_clients(
        self,
        server_round: int,
        arrays: ArrayRecord,
        partitions: list[int],
        outcome: RoundOutcome,
        train_config: ConfigRecord | None = None,
        last_turn: bool = True,
        keep: int | None = None,
    ) -> None:
        """Split-learning steps with ``partitions`` until each has done its steps.

        ``last_turn``: no other client trains after these this round (vanilla: the last
        client's turn), so their last step ends the round. ``keep``: over-selection, only
        the first ``keep`` clients to send their first packet go on.
        """
        sync = Traffic.of_model_sync(arrays)
        starts = {p: self.start_message(server_round, arrays, p, train_config) for p in partitions}
        for partition in partitions:  # the front went on the wire, answered or not
            self.ledger.add(server_round, partition, sync)
        # a client's first message in this process loads its data and builds the model
        cold = not self.started.issuperset(partitions)
        timeout = max(self.timeout, self.cfg.start_timeout) if cold else self.timeout
        self.started.update(partitions)
        active: dict[int, ClientRound] = {}
        replies = self.exchange(starts, outcome, timeout)
        for partition, reply in replies.items():
            metrics = reply.content["metrics"]
            steps = self.cfg.local_steps or int(metrics["steps-per-epoch"])
            node = self.sampler.nodes[partition]
            packet, batch = reply.content["packet"], int(metrics["batch"])
            active[partition] = ClientRound(node, partition, steps, packet, batch)
        costs = [
            ClientCost(p, sync.bytes_model_sync, c.packet, c.batch, 0) for p, c in active.items()
        ]
        self._settle(server_round, 0, costs, active, outcome, keep)
        while active:
            loss, grads = self.server_step(server_round, active)
            outcome.losses.append(loss)
            grad_traffic = {p: Traffic.of_grads(record) for p, record in grads.items()}
            for partition, traffic in grad_traffic.items():
                self.ledger.add(server_round, partition, traffic)
            outcome.budget_hit |= self.budget_spent()
            ends_round = last_turn and all(c.on_last_step for c in active.values())
            probe = (
                self.evaluation_due(self.global_step + 1)
                and not ends_round
                and not outcome.budget_hit
            )
            messages = {
                p: self.step_message(server_round, active[p], grads[p], outcome.budget_hit, probe)
                for p in active
            }
            replies = self.exchange(messages, outcome)
            self.global_step += 1
            self._record_step(server_round, loss)
            costs = []
            for partition, client in list(active.items()):
                reply = replies.get(partition)
                if reply is None:
                    del active[partition]
                    continue
                up = reply.content["packet" if "packet" in reply.content else "front"]
                batch = int(reply.content["metrics"].get("batch", 0))
                down = grad_traffic[partition].bytes_down_grad
                costs.append(ClientCost(partition, down, up, batch, client.batch))
            exchange = 1 + min((c.step for c in active.values()), default=0)
            kept = self._settle(server_round, exchange, costs, active, outcome)
            stepped: dict[int, Message] = {}  # replies of the clients that took this step
            for partition in kept:
                client, reply = active[partition], replies[partition]
                self.batches_done[partition] = self.batches_done.get(partition, 0) + 1
                client.step += 1
                self.clients.steps[partition] = client.step
                stepped[partition] = reply
                if "packet" in reply.content:
                    client.packet = reply.content["packet"]
                    client.batch = int(reply.content["metrics"]["batch"])
                else:  # its last step: the reply carries its trained front
                    del active[partition]
                    self.ledger.add(
                        server_round, partition, Traffic.of_model_sync(reply.content["front"])
                    )
                    outcome.finished[partition] = reply
            if probe:
                self._evaluate_probe(server_round, stepped, outcome)

    def _settle(
        self,
        server_round: int,
        exchange: int,
        costs: list[ClientCost],
        active: dict[int, ClientRound],
        outcome: RoundOutcome,
        keep: int | None = None,
    ) -> list[int]:
        """Run the simulated clock over one exchange's replies; drop from ``active`` the
        clients that vanished or were too slow (what they sent still counts as sent: a late
        packet crossed the link); the partitions that go on, ascending."""
        steps = {p: c.steps for p, c in active.items()}
        dropped = self.clients.settle(server_round, exchange, costs, steps, keep)
        for cost in costs:  # a straggler's reply came, too late: it crossed the link
            if dropped.get(cost.partition) == STRAGGLER:
                late = (
                    self.packet_traffic(cost.reply, cost.forward_batch)
                    if cost.forward_batch
                    else Traffic.of_model_sync(cost.reply)
                )
                self.ledger.add(server_round, cost.partition, late)
        for partition, reason in sorted(dropped.items()):
            del active[partition]
            outcome.failures[partition] = Failure(reason, DROP_DETAIL[reason])
        if dropped:
            failed = {p: outcome.failures[p] for p in dropped}
            self.progress(f"  dropped: {describe_failures(failed)}")
        return sorted(active)  # clients without a reply left ``active`` before

    def stop_cut_clients(self, server_round: int) -> None:
        """``train.stop`` to the clients cut this round: their nodes forget the round's state
        (nothing of a client should outlive its round; see ``client-optimizer``)."""
        if not self.clients.to_stop:
            return
        config = ConfigRecord({"round": server_round})
        messages = {
            p: self.message(p, "train.stop", server_round, config=config)
            for p in self.idle(sorted(self.clients.to_stop))
        }
        self.exchange(messages, None)

    def server_step(
        self, server_round: int, active: dict[int, ClientRound]
    ) -> tuple[float, dict[int, ArrayRecord]]:
        """Decode every active client's packet, one server batch; gradient records per client."""
        # fixed order (by partition), whatever order the replies arrived in: the server batch,
        # and with it every seeded draw after it (channel noise), is reproducible
        partitions = sorted(active)
        packets = []
        for partition in partitions:
            record = active[partition].packet
            received = record_to_packet(record, device=self.server.device)
            received.compressor = self.compressor_for(self.clients.xi[partition])
            packets.append(received)
            # soft-label counts add up to the batch
            batch = int(received.targets.sum()) if received.soft_targets else len(received.targets)
            self.ledger.add(server_round, partition, self.packet_traffic(record, batch))
        loss, grads, rows = self.server.step(packets)
        self.clients.server_step(rows)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"server loss is {loss} at round {server_round}, step {self.global_step}: "
                f"training diverged (try a lower lr than {self.cfg.lr:g})"
            )
        return loss, {
            p: grads_to_record(g, self.cfg.wire_dtype)
            for p, g in zip(partitions, grads, strict=True)
        }

    def packet_traffic(self, record: ArrayRecord, batch: int) -> Traffic:
        """Uplink of one packet of ``batch`` samples; its reference is what method `none`
        would send for the same batch: B samples, all tokens, float32."""
        return Traffic.of_packet(record, uncompressed_act_nbytes(batch, *self.front_shape))

    def compressor_for(self, xi: float) -> Compressor:
        """The server side of ξ's compressor (one per ξ used: adaptive-compression)."""
        if xi not in self._compressors:
            hidden = self.front_shape[1]
            num_classes = self.server.compressor.num_classes
            self._compressors[xi] = build_compressor(
                self.cfg.replace(compression=xi), num_classes, hidden_size=hidden
            ).to(self.server.device)
        return self._compressors[xi]

    def budget_spent(self) -> bool:
        return self.cfg.budget_mb > 0 and self.ledger.mb_sent >= self.cfg.budget_mb

    # ---- messages -----------------------------------------------------------------------

    def message(self, partition: int, kind: str, server_round: int, **records: Any) -> Message:
        """A message of type ``kind`` (``train.start``...) to ``partition``'s node."""
        return Message(
            RecordDict(records),
            dst_node_id=self.sampler.nodes[partition],
            message_type=kind,
            group_id=str(server_round),
        )

    def start_message(
        self,
        server_round: int,
        arrays: ArrayRecord,
        partition: int,
        extra: ConfigRecord | None = None,
    ) -> Message:
        """``train.start`` for ``partition``: the front, that client's own data cursor and ξ."""
        config = ConfigRecord(
            {
                **(extra or {}),
                "round": server_round,
                "partition-id": partition,  # the client checks it holds this partition
                "batches-done": self.batches_done.get(partition, 0),
                "compression": self.clients.xi.get(partition, self.cfg.compression),
            }
        )
        return self.message(partition, "train.start", server_round, front=arrays, config=config)

    def step_message(
        self, server_round: int, client: ClientRound, grads: ArrayRecord, last: bool, probe: bool
    ) -> Message:
        """``train.step``: gradients of the packet in flight; ``last`` asks for the front
        instead of a next packet, ``probe`` for the front beside it (evaluation only)."""
        config = ConfigRecord({"last": last or client.on_last_step, "probe": probe})
        return self.message(
            client.partition_id, "train.step", server_round, grads=grads, config=config
        )

    def exchange(
        self,
        messages: dict[int, Message],
        outcome: RoundOutcome | None,
        timeout: float | None = None,
    ) -> dict[int, Message]:
        """Send one message per partition; replies by partition, failures into ``outcome``
        (None: a message outside training, whose failure drops nobody)."""
        if not messages:
            return {}
        partition_of = {m.metadata.dst_node_id: p for p, m in messages.items()}
        assert self.messenger is not None  # set by sample()
        result = self.messenger.exchange(list(messages.values()), timeout or self.timeout)
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
        return [p for p in partitions if self.sampler.nodes[p] not in busy]

    # ---- checkpoint support -------------------------------------------------------------

    def elapsed(self) -> float:
        """Wall seconds of this run, earlier runs of a resumed run included."""
        return self.wall_offset + time.perf_counter() - self._wall_start
