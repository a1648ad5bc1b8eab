"""The simulated client population as the split-learning loop sees it (docs/design.md section 6).

The loop still exchanges real Flower messages with every client it trains; this module
decides, from each client's profile and the seeded draws, what those exchanges would have
cost in time on real links and devices, who was unreachable at the round's start, who
vanished mid-round (its reply is discarded as if it never came) and who was too slow (cut by
the deadline, or not among the first to answer when over-selected). Clients cut mid-round
are sent ``train.stop`` at the round's end so that their nodes forget the round.

It also chooses each client's ξ when ``adaptive-compression`` is on, builds the rows of
``clients.csv``, and holds what each client keeps between rounds (its optimiser moments with
``client-optimizer = keep``): for pooled clients (``num-partitions``), since the node that
runs a client this round may run another the next, and for every client in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from adc_flwr.config import RunConfig, nominal_level
from adc_flwr.data import run_partitions, write_partition_counts
from adc_flwr.model.flops import StepFlops
from adc_flwr.population.clock import SimClock, Turn
from adc_flwr.population.profile_csv import run_profiles, write_profiles
from adc_flwr.population.profiles import Population
from adc_flwr.run.run_dir import PARTITIONS_FILE, PROFILES_FILE, RunDir
from adc_flwr.run.summary import DROPPED_OUT, STRAGGLER
from adc_flwr.run.validation import partitions_below_batch
from adc_flwr.wire.codec import record_nbytes

FINISHED = "finished"


DROP_DETAIL = {
    DROPPED_OUT: "vanished mid-round (profile drop-out probability)",
    STRAGGLER: "too slow: past deadline-s, or not among the first to answer (over-select)",
}


@dataclass
class ClientCost:
    """What one client's reply in one exchange says about its cost."""

    partition: int
    down_bytes: int  # what the server sent it (front or gradients)
    reply: ArrayRecord  # what it sent back: a packet, or its front on its last step
    forward_batch: int  # samples of the batch it encoded for this reply (0: none, last step)
    backward_batch: int  # samples of the batch whose gradients it applied (0: none, start)

    @property
    def up_bytes(self) -> int:
        return record_nbytes(self.reply)


class SimulatedClients:
    """Profiles, the clock and the per-round choices for one run."""

    def __init__(
        self,
        cfg: RunConfig,
        step_flops: Callable[[], StepFlops],
        reference_packet_bytes: int,
        run_dir: RunDir | None = None,
    ) -> None:
        """``step_flops`` builds the FLOP counts on first use; ``reference_packet_bytes``:
        what ξ = 1 sends for one full batch (the uncompressed activation)."""
        self.cfg = cfg
        self._step_flops = step_flops
        self._flops: StepFlops | None = None
        self.reference_packet_bytes = reference_packet_bytes
        self.run_dir = run_dir
        self.population: Population | None = None
        # profiles come with the number of partitions (setup); time runs from the start
        self.clock = SimClock(None, cfg.server_gflops, cfg.deadline_s, cfg.straggler_policy)
        self.xi: dict[int, float] = {}  # this round's ξ per sampled client
        self.steps: dict[int, int] = {}  # steps each client took this round
        self.to_stop: set[int] = set()  # cut this round; their nodes still hold round state
        self.batch_clamped: dict[str, int] = {}  # partitions smaller than a batch (setup)
        self.moments: dict[int, ArrayRecord] = {}  # clients' optimiser moments (keep)

    # ---- population ---------------------------------------------------------------------

    def setup(self, num_partitions: int) -> None:
        """Assign profiles once the number of partitions is known; write ``profiles.csv`` and
        ``partitions.csv`` (samples per class per partition)."""
        if self.population is not None and len(self.population) == num_partitions:
            return
        profiles = run_profiles(
            self.cfg.profile_mix, num_partitions, self.cfg.seed, self.cfg.profile_trace
        )
        self.population = Population(profiles, self.cfg.seed)
        self.clock.population = self.population
        sizes = [len(p) for p in run_partitions(self.cfg, num_partitions)]
        self.batch_clamped = partitions_below_batch(self.cfg.batch_size, sizes)
        if self.run_dir is not None:
            write_profiles(self.run_dir.path / PROFILES_FILE, profiles)
            write_partition_counts(self.run_dir.path / PARTITIONS_FILE, self.cfg, num_partitions)

    def reachable(self, server_round: int) -> Callable[[int], np.ndarray]:
        """For the sampler: who can be drawn at this round's start, once N is known."""

        def online(num_partitions: int) -> np.ndarray:
            self.setup(num_partitions)
            assert self.population is not None
            return self.population.reachable(server_round)

        return online

    def remember(self, partition: int, reply: Message) -> None:
        """Keep the moments a client handed back (its last step, or ``train.stop``): they
        stand for its device's memory, go back with a pooled client's next ``train.start``
        (a node's own client keeps a copy) and into the checkpoint."""
        if "optim" in reply.content:
            self.moments[partition] = reply.content["optim"]

    @property
    def flops(self) -> StepFlops:
        if self._flops is None:
            self._flops = self._step_flops()
        return self._flops

    # ---- a round ------------------------------------------------------------------------

    def begin_round(self, picks: list[int]) -> None:
        """Reset the round's bookkeeping and choose each client's ξ."""
        self.clock.begin_round()
        self.steps = {}
        self.to_stop = set()
        self.xi = {p: self.choose_xi(p) for p in picks}

    def choose_xi(self, partition: int) -> float:
        """``compression``, or with ``adaptive-compression`` the ξ whose packet fits the
        client's upload target at its own uplink, within [``compression-min``,
        ``compression``] (rounded to 4 digits so clients with one link share a compressor)."""
        cfg = self.cfg
        if not cfg.adaptive_compression:
            return cfg.compression
        assert self.population is not None
        profile = self.population[partition]
        reference_bits = self.reference_packet_bytes * 8
        if cfg.target_upload_s > 0:
            xi = cfg.target_upload_s * profile.uplink_mbps * 1e6 / reference_bits
        elif cfg.deadline_s > 0:  # the exchange's transfers fit what compute leaves
            compute = profile.compute_s(cfg.batch_size * self.exchange_flops_per_sample())
            left = cfg.deadline_s - compute - 2 * profile.latency_s
            per_xi = reference_bits * (
                1 / (profile.uplink_mbps * 1e6) + 1 / (profile.downlink_mbps * 1e6)
            )
            xi = left / per_xi
        else:  # the median uplink's time for one packet at `compression`
            xi = cfg.compression * profile.uplink_mbps / self.population.median_uplink_mbps
        lowest = math.ceil(cfg.compression_min * 1e4) / 1e4  # rounding never goes below it
        return min(cfg.compression, max(lowest, round(xi, 4)))

    def recorded_xi(self, partition: int) -> float:
        """ξ for ``clients.csv``: the client's own with adaptive compression, else the run's
        level (bits/32 for quant with `quant-bits`, 1/R for C3-SL); blank for `none`."""
        if self.cfg.method == "none":
            return math.nan
        if self.cfg.adaptive_compression:
            return self.xi.get(partition, math.nan)
        return nominal_level(self.cfg.to_run_config())

    def exchange_flops_per_sample(self) -> float:
        """Client FLOPs per sample of a middle step: recompute, backward, next forward."""
        return 2 * self.flops.client_forward + self.flops.client_backward

    def turn(self, cost: ClientCost) -> Turn:
        flops = cost.forward_batch * self.flops.client_forward + cost.backward_batch * (
            self.flops.client_forward + self.flops.client_backward
        )
        return Turn(cost.partition, cost.down_bytes, cost.up_bytes, flops)

    def settle(
        self,
        server_round: int,
        exchange: int,
        costs: list[ClientCost],
        steps_of: dict[int, int],
        keep: int | None = None,
    ) -> dict[int, str]:
        """Advance the clock by one exchange of these replies; who is dropped and why.

        ``exchange``: 0 for ``train.start``, s + 1 for the s-th ``train.step``;
        ``steps_of``: each client's steps this round (its exchanges are steps + 1).
        """
        assert self.population is not None
        dropped: dict[int, str] = {}
        turns = []
        vanished_after = 0.0  # the server learns of a drop-out once its download is through
        for cost in costs:
            p = cost.partition
            if self.population.dropout_exchange(server_round, p, steps_of[p] + 1) == exchange:
                vanished_after = max(vanished_after, self.clock.vanished(p, cost.down_bytes))
                dropped[p] = DROPPED_OUT
            else:
                turns.append(self.turn(cost))
        cut = self.clock.exchange(turns, keep, at_least=vanished_after)
        dropped |= dict.fromkeys(cut, STRAGGLER)
        self.to_stop |= dropped.keys()
        return dropped

    def server_step(self, rows: list[tuple[int, int]]) -> None:
        self.clock.server_step(self.flops.server_step(rows))

    def client_rows(
        self,
        server_round: int,
        sampled: list[int],
        outcomes: dict[int, str],
        traffic: Callable[[int], tuple[int, int, int]],
        fed_eval: dict[int, tuple[float, int]] | None = None,
    ) -> list[dict[str, object]]:
        """One ``clients.csv`` row per sampled client; ``traffic(p)`` -> (up, down, sync)."""
        assert self.population is not None
        rows = []
        for p in sampled:
            up, down, sync = traffic(p)
            spent = self.clock.clients.get(p)
            compute_j, radio_j = self.clock.energy_j(p)
            accuracy, examples = (fed_eval or {}).get(p, (math.nan, None))
            rows.append(
                {
                    "round": server_round,
                    "partition": p,
                    "profile": self.population[p].name,
                    "xi": self.recorded_xi(p),
                    "bytes_up": up,
                    "bytes_down": down,
                    "bytes_model_sync": sync,
                    "compute_s": spent.compute_s if spent else 0.0,
                    "transfer_s": spent.transfer_s if spent else 0.0,
                    "steps": self.steps.get(p, 0),
                    "late_exchanges": spent.late if spent else 0,
                    "energy_compute_j": compute_j,
                    "energy_radio_j": radio_j,
                    "outcome": outcomes.get(p, FINISHED),
                    "fed_accuracy": accuracy,
                    "fed_examples": examples,
                }
            )
        return rows
