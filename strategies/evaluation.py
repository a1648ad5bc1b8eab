"""Evaluation and records of the split-learning loop: central evaluation each round (and
mid-round probes, ``eval-every``), federated evaluation on the clients' held-out data
(``federated-eval-every``), and the rows of ``metrics.csv`` and ``clients.csv``.

A mixin of :class:`strategies.split_strategy.SplitLearningStrategy`: it reads the
strategy's config, server, ledger, clock and run directory.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from adc_flwr.run.summary import STRAGGLER
from adc_flwr.training.evaluation import evaluate
from adc_flwr.training.modules import load_modules_state
from adc_flwr.wire.codec import record_to_state
from strategies.outcomes import RoundOutcome, round_line

if TYPE_CHECKING:
    from strategies.split_strategy import SplitLearningStrategy

    _Base = SplitLearningStrategy
else:
    _Base = object


class Evaluation(_Base):
    """Central and federated evaluation, and what each round writes."""

    def federated_evaluate(
        self, server_round: int, arrays: ArrayRecord | None, outcome: RoundOutcome
    ) -> None:
        """Every ``federated-eval-every`` rounds: each of the round's clients that can still
        answer (finished, or cut as a straggler) runs the new global front on the held-out
        part of its partition; the server runs the back. Accuracy per client into
        ``outcome.fed_eval``. Not on the simulated clock and not counted as traffic."""
        every = self.cfg.federated_eval_every
        if not every or server_round % every or arrays is None:
            return
        reachable = self.idle(
            [
                p
                for p in outcome.sampled
                if p in outcome.finished
                or (p in outcome.failures and outcome.failures[p].reason == STRAGGLER)
            ]
        )
        config = ConfigRecord({"round": server_round})
        messages = {
            p: self.message(p, "evaluate.held_out", server_round, front=arrays, config=config)
            for p in reachable
        }
        replies = sorted(self.exchange(messages, None).items())
        self.server.back.eval()
        device = self.server.device
        with torch.no_grad():
            for partition, reply in replies:
                record = reply.content["held-out"]
                labels = torch.from_numpy(record["labels"].numpy()).to(device)
                if len(labels) == 0:
                    continue
                h = torch.from_numpy(record["h"].numpy()).to(device)
                logits = self.server.logits(self.server.compressor.eval_server(h))
                accuracy = float((logits.argmax(dim=1) == labels).float().mean())
                outcome.fed_eval[partition] = (accuracy, len(labels))
        self.server.back.train()

    def evaluation_due(self, global_step: int) -> bool:
        return bool(self.cfg.eval_every) and global_step % self.cfg.eval_every == 0

    def _evaluate_probe(
        self, server_round: int, stepped: dict[int, Message], outcome: RoundOutcome
    ) -> None:
        """Mid-round evaluation of the model that exists now: the current back with the
        average, weighted by examples trained this round, of the clients' current fronts
        (SplitFed: those of this step and of the clients that already finished the round;
        vanilla: the client whose turn it is, or whose turn just ended)."""
        current = dict(stepped)
        if self.cfg.sl_mode == "splitfed":
            current = outcome.finished | current
        fronts = [
            RecordDict({"front": r.content["front"], "metrics": r.content["metrics"]})
            for _, r in sorted(current.items())
        ]
        if not fronts:
            return
        if self._probe_modules is None:
            self._probe_modules = copy.deepcopy(self.client_modules)
        average = aggregate_arrayrecords(fronts, "num-examples")
        load_modules_state(self._probe_modules, record_to_state(average))
        self._evaluate(server_round, self._probe_modules)

    def _evaluate(
        self,
        server_round: int,
        modules: dict[str, torch.nn.Module],
        extra: dict[str, float] | None = None,
    ) -> tuple[float, float]:
        """Central, uncompressed evaluation of ``modules`` + the back; one eval row (with
        ``extra`` columns: the federated evaluation's)."""
        acc, loss = evaluate(
            modules,
            self.server.back,
            self.test_split,
            self.spec,
            self.cfg.eval_batch_size,
            compressor=self.server.compressor,
            precision=self.cfg.precision,
        )
        if self.run_dir is not None:
            self.run_dir.append_metrics(
                {
                    "kind": "eval",
                    "round": server_round,
                    "step": self.global_step,
                    "test_accuracy": acc,
                    "test_loss": loss,
                    **self.ledger.total().as_dict(),
                    "wall_time_s": self.elapsed(),
                    "sim_time_s": self.clients.clock.now,
                    **(extra or {}),
                }
            )
        return acc, loss

    def evaluate_round(self, server_round: int, outcome: RoundOutcome) -> dict[str, float]:
        """Central evaluation of the global front + back, then one progress line."""
        acc, loss = self._evaluate(server_round, self.client_modules, outcome.fed_eval_summary())
        row = outcome.row(server_round, acc, loss, self.ledger.total())
        row |= {
            "steps": self.global_step,
            "wall_time_s": self.elapsed(),
            "sim_time_s": self.clients.clock.now,
        }
        self.history.append(row)
        if self.run_dir is not None:
            self.run_dir.append_clients(self.client_rows(server_round, outcome))
            self.run_dir.flush()
        rounds_here = server_round - self.start_round + 1  # rounds run by this process
        per_round = (self.elapsed() - self.wall_offset) / rounds_here
        eta = per_round * (self.cfg.num_server_rounds - server_round)
        self.progress(round_line(row, self.cfg.num_server_rounds, eta))
        return row

    def client_rows(self, server_round: int, outcome: RoundOutcome) -> list[dict[str, object]]:
        """This round's ``clients.csv`` rows: every sampled client, what it cost, how it ended."""
        outcomes = {p: f.reason for p, f in outcome.failures.items()}
        outcomes |= dict.fromkeys(outcome.not_started, "not-started")

        def traffic(partition: int) -> tuple[int, int, int]:
            spent = self.ledger.client_round(server_round, partition)
            return spent.up, spent.down, spent.bytes_model_sync

        return self.clients.client_rows(
            server_round, outcome.sampled, outcomes, traffic, outcome.fed_eval
        )

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

    def _record_step(self, server_round: int, loss: float) -> None:
        if self.run_dir is None:
            return
        self.run_dir.append_metrics(
            {
                "kind": "step",
                "round": server_round,
                "step": self.global_step,
                "train_loss": loss,
                **self.ledger.total().as_dict(),
                "wall_time_s": self.elapsed(),
                "sim_time_s": self.clients.clock.now,
            }
        )
