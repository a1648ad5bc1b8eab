"""SplitLearningStrategy: a Flower Strategy that hosts the ViT's back and drives split learning.

Flower's ``Strategy.start`` makes one train exchange per round; split learning needs one per
step, so ``start`` runs the loop of docs/protocol.md, which reads top to bottom below. The
Flower hooks keep their Flower meaning: :meth:`configure_train` samples the round's clients
and builds each one's ``train.start``; :meth:`aggregate_train` averages the fronts they
return (FedAvg by examples); :meth:`configure_evaluate` and :meth:`aggregate_evaluate` run
federated evaluation on the clients' held-out data. Between them, :class:`StepEngine` runs
the steps, :class:`Evaluator` evaluates centrally, :class:`RunRecorder` writes the rows.

Clients are sampled by data partition, never by node id: under Ray node ids are random, so
the seeded sampler draws partition ids and :func:`discover_partitions` maps them to nodes (or,
with ``num-partitions``, the sampler hands each round's picks to free nodes).
Each client is sent its own data cursor (batches it consumed in earlier rounds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from adc_flwr.config import RunConfig
from adc_flwr.data import ImageSplit
from adc_flwr.model.flops import step_flops
from adc_flwr.model.inputs import InputSpec
from adc_flwr.privacy.audit import PrivacyAudit
from adc_flwr.run.run_dir import RunDir
from adc_flwr.run.summary import STRAGGLER, UNAVAILABLE
from adc_flwr.training.modules import load_modules_state, modules_state
from adc_flwr.training.workers import ServerWorker
from adc_flwr.wire.accounting import TrafficLedger
from adc_flwr.wire.codec import record_to_state, state_to_record
from adc_flwr.wire.sizes import uncompressed_act_nbytes
from strategies.evaluation import Evaluator
from strategies.messaging import Post, fronts, relayed
from strategies.outcomes import Failure, RoundOutcome, describe_failures
from strategies.records import RunRecorder
from strategies.sampling import Draw, PartitionSampler
from strategies.simulated_clients import SimulatedClients
from strategies.step_engine import StepEngine

log = logging.getLogger("adc_flwr")


class SplitLearningStrategy(Strategy):
    """Owns the server back, its optimizer and loss; runs SplitFed or vanilla split learning.

    Args:
        cfg: the validated run config.
        server: the back, its optimizer and the compressor's server side.
        client_modules: the global client-side modules (front, learned encoder) whose
            weights are synchronised with the clients and evaluated.
        test_split, spec: central test data and how to feed it to the model.
        run_dir: where metrics go (None: nowhere).
        progress: called with one line of text per round (and per group of drops).
        checkpoint: called with :meth:`state_dict` after each round that met ``min-clients``
            (the run directory's ``save_checkpoint``; None: no checkpoints).
        privacy: the server's reconstruction attack (``privacy-eval``; None: off).
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
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        privacy: PrivacyAudit | None = None,
    ) -> None:
        self.cfg = cfg
        self.server = server
        self.client_modules = client_modules
        self.progress = progress
        self.checkpoint = checkpoint
        self.privacy = privacy
        front = client_modules["front"]
        front_shape = (front.num_tokens, front.hidden_size)  # (n, d) of the front output
        self.ledger = TrafficLedger()
        self.sampler = PartitionSampler(cfg, progress)
        self.post = Post(self.sampler.nodes, progress)
        self.clients = SimulatedClients(
            cfg,
            lambda: step_flops(front, server.back, server.compressor, spec.pixel_shape),
            uncompressed_act_nbytes(cfg.batch_size, *front_shape),
            run_dir,
        )
        self.recorder = RunRecorder(cfg, run_dir, self.ledger, self.clients, progress)
        self.evaluator = Evaluator(cfg, server, client_modules, test_split, spec)
        self.engine = StepEngine(
            cfg,
            server,
            self.clients,
            self.ledger,
            self.post,
            self.recorder,
            front_shape,
            self.probe,
        )
        self.stop_reason = "num-server-rounds"
        self.start_round = 1
        self.last_round = 0  # the last round that ended (what a checkpoint continues after)
        self.draw: Draw | None = None  # this round's sample, taken by configure_train
        self.outcome: RoundOutcome | None = None  # the round in progress

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per round that ran."""
        return self.recorder.history

    @property
    def global_step(self) -> int:
        return self.engine.global_step

    # ---- Flower Strategy interface ------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample this round's clients and build ``train.start`` for each one that can train
        now: the global front, the round config (``config`` entries are added), that client's
        own data cursor and ξ. The draw is kept in :attr:`draw` for the round's outcome."""
        self.draw = self.sample(grid, server_round)
        return [
            self.start_message(server_round, arrays, partition, config)
            for partition in self.draw.picks
            if partition not in self.draw.unavailable
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the returned fronts, weighted by the examples each client trained on."""
        contents = fronts(replies)
        if not contents:
            return None, None
        arrays = aggregate_arrayrecords(contents, "num-examples")
        examples = sum(int(c["metrics"]["num-examples"]) for c in contents)
        return arrays, MetricRecord({"num-examples": examples, "clients": len(contents)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every ``federated-eval-every`` rounds, ``evaluate.held_out`` with the new global
        front for each of the round's clients that can still answer (finished, or cut as a
        straggler, and owing no reply); none otherwise. Central evaluation needs no client."""
        every, outcome = self.cfg.federated_eval_every, self.outcome
        if not every or server_round % every or outcome is None:
            return []
        answering = [
            p
            for p in outcome.sampled
            if p in outcome.finished
            or (p in outcome.failures and outcome.failures[p].reason == STRAGGLER)
        ]
        return [
            self.post.message(
                p,
                "evaluate.held_out",
                server_round,
                front=arrays,
                config=ConfigRecord({**config, "server-round": server_round, "partition-id": p}),
            )
            for p in self.post.idle(answering)
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The back on each client's held-out activations: accuracy per client (kept in the
        round's outcome for ``clients.csv``), and their mean, 10th percentile and worst."""
        partition_of = {node: p for p, node in self.sampler.nodes.items()}
        by_partition = sorted(
            ((partition_of[r.metadata.src_node_id], r) for r in replies), key=lambda pr: pr[0]
        )
        if not by_partition or self.outcome is None:
            return None
        self.outcome.fed_eval = self.evaluator.held_out(by_partition)
        return MetricRecord(self.outcome.fed_eval_summary())

    def summary(self) -> None:
        log.info(
            "SplitLearningStrategy: %s, method=%s, compression=%g, %d round(s) of %s step(s)",
            self.cfg.sl_mode,
            self.cfg.method,
            self.cfg.compression,
            self.cfg.num_server_rounds,
            self.cfg.local_steps or "one epoch of",
        )

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
        ``train_config`` goes to every client in ``train.start``, ``evaluate_config`` to
        every client in ``evaluate.held_out`` (federated evaluation), and
        ``evaluate_fn(round, arrays)`` runs after each round (and before the first) beside
        the built-in central evaluation.
        """
        self.engine.timeout = timeout
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        self.summary()
        if evaluate_fn is not None and self.start_round == 1:
            self._record_evaluate_fn(result, evaluate_fn, 0, arrays)
        for server_round in range(self.start_round, num_rounds + 1):
            if self.engine.budget_spent():  # the last round's front uploads crossed it
                self.stop_reason = "budget-mb"
                break
            outcome, new_arrays = self.run_round(
                grid, server_round, arrays, train_config or ConfigRecord(), evaluate_config
            )
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
            if outcome.fed_eval:  # federated evaluation: Flower's client-side metrics
                federated = MetricRecord(outcome.fed_eval_summary())
                result.evaluate_metrics_clientapp[server_round] = federated
            metrics = self.evaluate_round(server_round, outcome)
            result.evaluate_metrics_serverapp[server_round] = MetricRecord(metrics)
            if evaluate_fn is not None:
                self._record_evaluate_fn(result, evaluate_fn, server_round, arrays)
            outcome.check(server_round, self.cfg.min_clients)
            if outcome.budget_hit:
                self.stop_reason = "budget-mb"
            self.last_round = server_round
            # the last round: the rounds are done, or the budget is (in a step, or by the
            # fronts this round's clients returned): audited before its checkpoint
            last = server_round == num_rounds or outcome.budget_hit or self.engine.budget_spent()
            self.audit(server_round, final=last)
            if self.checkpoint is not None:
                self.checkpoint(self.state_dict())
            if outcome.budget_hit:
                break
        return result

    def run_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord | None = None,
    ) -> tuple[RoundOutcome, ArrayRecord | None]:
        """One round: SplitFed trains the sampled clients in parallel and averages their
        fronts; vanilla SL trains them one after another, each ``train.start`` carrying the
        front the previous client returned. Then federated evaluation, when due."""
        starts = self.post.by_partition(
            self.configure_train(server_round, arrays, train_config, grid)
        )
        assert self.draw is not None
        outcome = self.outcome = RoundOutcome(sampled=self.draw.picks, offline=self.draw.offline)
        unavailable = self.draw.unavailable
        outcome.failures |= {p: Failure(UNAVAILABLE, why) for p, why in unavailable.items()}
        if unavailable:
            self.progress(f"  unavailable: {describe_failures(outcome.failures)}")
        if self.cfg.sl_mode == "splitfed":
            self.engine.train(server_round, starts, outcome, keep=self.draw.keep)
            self.engine.stop_cut_clients(server_round)
            # sum in partition order, not arrival order: float sums then repeat bit for bit
            finished = [outcome.finished[p] for p in sorted(outcome.finished)]
            new_arrays, _ = self.aggregate_train(server_round, finished)
        else:
            current = arrays
            ready = list(starts)
            for i, partition in enumerate(ready):
                if outcome.budget_hit:
                    outcome.not_started = ready[i:]
                    break
                start = relayed(starts[partition], current)
                last_turn = i == len(ready) - 1
                self.engine.train(server_round, {partition: start}, outcome, last_turn)
                if partition in outcome.finished:
                    current = outcome.finished[partition].content["front"]
            self.engine.stop_cut_clients(server_round)
            new_arrays = current if outcome.finished else None
        if new_arrays is not None:
            config = evaluate_config or ConfigRecord()
            evaluations = self.configure_evaluate(server_round, new_arrays, config, grid)
            replies = self.post.exchange(self.post.by_partition(evaluations), self.engine.timeout)
            self.aggregate_evaluate(server_round, replies.values())
        return outcome, new_arrays

    def sample(self, grid: Grid, server_round: int) -> Draw:
        """This round's partitions, drawn from those reachable at its start, and those that
        cannot train (see :meth:`PartitionSampler.sample`); each call draws once from the
        seeded generator and chooses each pick's ξ."""
        draw = self.sampler.sample(self.post.on(grid), self.clients.reachable(server_round))
        self.clients.begin_round(draw.picks)
        return draw

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
                "server-round": server_round,
                "partition-id": partition,  # the client checks it holds this partition
                "batches-done": self.engine.batches_done.get(partition, 0),
                "compression": self.clients.xi.get(partition, self.cfg.compression),
            }
        )
        records = {"front": arrays, "config": config}
        # its own moments (client-optimizer keep): a pooled client's are held only here; a
        # node's own client has a copy, unless its node never trained in this process (resumed)
        held = self.clients.moments.get(partition)
        if held is not None and (
            self.cfg.pooled or self.post.nodes[partition] not in self.engine.warm
        ):
            records["optim"] = held
        return self.post.message(partition, "train.start", server_round, **records)

    # ---- evaluation ---------------------------------------------------------------------

    def probe(self, server_round: int, stepped: dict[int, Message], outcome: RoundOutcome) -> None:
        """Mid-round evaluation of the model that exists now: the current back with the
        average, weighted by examples trained this round, of the clients' current fronts
        (SplitFed: those of this step and of the clients that already finished the round;
        vanilla: the client whose turn it is, or whose turn just ended)."""
        current = dict(stepped)
        if self.cfg.sl_mode == "splitfed":
            current = outcome.finished | current
        if not current:
            return
        modules = self.evaluator.averaged([r for _, r in sorted(current.items())])
        accuracy, loss = self.evaluator.central(modules)
        self.recorder.evaluation(server_round, self.global_step, accuracy, loss)

    def evaluate_round(self, server_round: int, outcome: RoundOutcome) -> dict[str, float]:
        """Central evaluation of the global front + back: an eval row, the round's history
        row and clients' rows, one progress line."""
        accuracy, loss = self.evaluator.central(self.client_modules)
        step = self.global_step
        self.recorder.evaluation(server_round, step, accuracy, loss, outcome.fed_eval_summary())
        return self.recorder.round(server_round, step, outcome, accuracy, loss)

    def audit(self, server_round: int, *, final: bool) -> None:
        """The privacy audit after ``server_round`` when ``privacy-eval`` asks for one; its
        rows go to ``privacy.csv``. Called before the round's checkpoint, so a resumed run
        redoes it with its round or not at all."""
        if self.privacy is None or not self.privacy.due(server_round, final=final):
            return
        assert self.clients.population is not None  # set by the round's draw
        result = self.privacy.run(self.client_modules, server_round, len(self.clients.population))
        self.recorder.privacy(server_round, result.rows, result.images)

    def _record_evaluate_fn(
        self,
        result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
        server_round: int,
        arrays: ArrayRecord,
    ) -> None:
        metrics = evaluate_fn(server_round, arrays)
        if metrics is not None:
            merged = dict(result.evaluate_metrics_serverapp.get(server_round, {})) | dict(metrics)
            result.evaluate_metrics_serverapp[server_round] = MetricRecord(merged)

    # ---- checkpoints --------------------------------------------------------------------

    def elapsed(self) -> float:
        """Wall seconds of this run, earlier runs of a resumed run included."""
        return self.recorder.elapsed()

    def state_dict(self) -> dict[str, Any]:
        """Everything the server needs to continue after :attr:`last_round` as if never
        stopped, the clients' optimiser moments (``client-optimizer = keep``) included.
        Tensors and plain containers only: ``torch.load(weights_only=True)``."""
        decoder = self.server.compressor.server_module()
        channel = self.server.channel
        return {
            "round": self.last_round,
            "global_step": self.engine.global_step,
            "back": self.server.back.state_dict(),
            "decoder": decoder.state_dict() if decoder is not None else {},
            "server_optimizer": self.server.optimizer.state_dict(),
            "client_modules": modules_state(self.client_modules),
            "ledger": self.ledger.state_dict(),
            "batches_done": dict(self.engine.batches_done),
            "history": list(self.history),
            "missed": list(self.recorder.missed.values()),
            "sampler_state": list(self.sampler.state_dict()),
            "torch_rng": torch.get_rng_state(),
            "channel_rng": None if channel is None else channel.state_dict(),  # noise position
            "wall_time_s": self.elapsed(),
            "sim_time_s": self.clients.clock.now,
            "stop_reason": self.stop_reason,
            "client_moments": {p: record_to_state(m) for p, m in self.clients.moments.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next round is the one after its round."""
        self.server.back.load_state_dict(state["back"])
        if (decoder := self.server.compressor.server_module()) is not None:
            decoder.load_state_dict(state["decoder"])
        self.server.optimizer.load_state_dict(state["server_optimizer"])
        load_modules_state(self.client_modules, state["client_modules"])
        self.ledger.load_state_dict(state["ledger"])
        self.engine.batches_done = {int(k): int(v) for k, v in state["batches_done"].items()}
        self.recorder.history[:] = list(state["history"])
        # clients that failed for real in earlier rounds (absent from older checkpoints)
        self.recorder.missed = {int(m["partition"]): dict(m) for m in state.get("missed", [])}
        self.sampler.load_state_dict(state["sampler_state"])
        torch.set_rng_state(state["torch_rng"])
        if self.server.channel is not None and state.get("channel_rng") is not None:
            self.server.channel.load_state_dict(state["channel_rng"])
        self.last_round = int(state["round"])
        self.start_round = self.recorder.first_round = self.last_round + 1
        self.engine.global_step = int(state["global_step"])
        self.recorder.wall_offset = float(state["wall_time_s"])
        self.clients.clock.now = float(state["sim_time_s"])
        self.stop_reason = str(state["stop_reason"])
        # absent from older checkpoints: the moments then restart, as they did
        moments = state.get("client_moments", {})
        self.clients.moments = {int(p): state_to_record(m) for p, m in moments.items()}
