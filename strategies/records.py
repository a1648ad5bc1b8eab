"""What each step, evaluation and round writes: rows of ``metrics.csv`` and ``clients.csv``,
the round's line of ``history`` and the progress line people read.

Every row carries the traffic so far (the ledger's totals), the wall time of the run (earlier
processes of a resumed run included) and the simulated clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from adc_flwr.run.summary import ERROR, TIMEOUT, UNAVAILABLE
from adc_flwr.wire.accounting import TrafficLedger
from strategies.outcomes import RoundOutcome, round_line
from strategies.simulated_clients import SimulatedClients

REAL_FAILURES = (ERROR, TIMEOUT, UNAVAILABLE)  # not the simulated population's drops


@dataclass(eq=False)
class RunRecorder:
    """The run's rows and history; a run without a directory keeps only the history."""

    cfg: RunConfig
    run_dir: RunDir | None
    ledger: TrafficLedger
    clients: SimulatedClients
    progress: Callable[[str], None]
    history: list[dict[str, Any]] = field(default_factory=list)
    # clients that failed for real (raised, timed out, node gone): partition -> what it missed
    missed: dict[int, dict[str, Any]] = field(default_factory=dict)
    wall_offset: float = 0.0  # wall seconds of earlier processes (resume)
    first_round: int = 1  # the first round this process runs (for the ETA)
    _wall_start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Wall seconds of this run, earlier runs of a resumed run included."""
        return self.wall_offset + time.perf_counter() - self._wall_start

    def _row(self, kind: str, server_round: int, step: int, **values: Any) -> None:
        if self.run_dir is None:
            return
        self.run_dir.append_metrics(
            {
                "kind": kind,
                "round": server_round,
                "step": step,
                **values,
                **self.ledger.total().as_dict(),
                "wall_time_s": self.elapsed(),
                "sim_time_s": self.clients.clock.now,
            }
        )

    def step(self, server_round: int, step: int, loss: float) -> None:
        """One ``step`` row: the server's loss of global step ``step``."""
        self._row("step", server_round, step, train_loss=loss)

    def evaluation(
        self,
        server_round: int,
        step: int,
        accuracy: float,
        loss: float,
        extra: dict[str, float] | None = None,
    ) -> None:
        """One ``eval`` row (``extra``: the federated evaluation's columns)."""
        self._row(
            "eval", server_round, step, test_accuracy=accuracy, test_loss=loss, **(extra or {})
        )

    def round(
        self, server_round: int, step: int, outcome: RoundOutcome, accuracy: float, loss: float
    ) -> dict[str, float]:
        """The round's ``history`` row and ``clients.csv`` rows (fsynced), then its line."""
        for partition, failure in sorted(outcome.failures.items()):
            if failure.reason in REAL_FAILURES:
                entry = self.missed.setdefault(partition, {"partition": partition, "rounds": []})
                entry["rounds"].append(server_round)
                first_line = (failure.detail.strip().splitlines() or [""])[0]
                entry["reason"] = f"{failure.reason}: {first_line}"
        clients = self.client_rows(server_round, outcome)
        row = outcome.row(server_round, accuracy, loss, self.ledger.total())
        row |= {"steps": step, "wall_time_s": self.elapsed(), "sim_time_s": self.clients.clock.now}
        row["energy_j"] = sum(c["energy_compute_j"] + c["energy_radio_j"] for c in clients)
        self.history.append(row)
        if self.run_dir is not None:
            self.run_dir.append_clients(clients)
            self.run_dir.flush()
        rounds_here = server_round - self.first_round + 1  # rounds run by this process
        per_round = (self.elapsed() - self.wall_offset) / rounds_here
        eta = per_round * (self.cfg.num_server_rounds - server_round)
        self.progress(round_line(row, self.cfg.num_server_rounds, eta))
        return row

    def privacy(
        self, server_round: int, rows: list[dict[str, Any]], images: dict[str, np.ndarray]
    ) -> None:
        """The privacy audit's rows (``privacy.csv``, fsynced), its example images
        (``privacy_images.npz``) and one line on them."""
        if self.run_dir is not None:
            self.run_dir.write_privacy_images(images)
            self.run_dir.append_privacy(server_round, rows)
        merged, best = rows  # REFERENCES order
        self.progress(
            f"  privacy after round {server_round}: reconstruction SSIM {merged['ssim']:.3f} "
            f"(the mean image: {merged['ssim_mean_image']:.3f}; best member "
            f"{best['ssim']:.3f}), PSNR {merged['psnr']:.1f} dB, dCor {merged['dcor']:.3f} (bias-"
            f"corrected dCor² {merged['dcor_unbiased']:.3f}), "
            f"{merged['wall_time_s']:.0f} s"
        )

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
