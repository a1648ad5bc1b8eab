"""The simulated clock (docs/design.md section 6): bytes and FLOPs become seconds; nothing sleeps.

One exchange is the server's message to each client and the client's reply. A client's time
in it is its download (latency + bytes at its downlink), its compute (FLOPs at its device
speed) and its upload (latency + bytes at its uplink); a recorded link (links.py) delivers
the bytes as its trace does from the moment they are sent, and energy.py prices each
transfer and FLOP in joules. SplitFed clients exchange in parallel,
so an exchange lasts as long as its slowest kept client; vanilla SL has one client per
exchange, so turns add up. Each server step adds its FLOPs at ``server-gflops``.

Stragglers: with a deadline (``deadline-s``, simulated seconds per exchange) a client that
needs longer is cut for the rest of the round (policy ``drop``: the exchange lasts the
deadline) or waited for (``wait``: counted as late). Over-selection keeps only the first
``keep`` clients to answer; the exchange lasts until the last of them. A client that drops
out never answers: it costs its download and does not hold up the exchange (the server sees
the connection close).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adc_flwr.population.energy import ClientEnergy
from adc_flwr.population.profiles import ClientProfile, Population

STRAGGLER_POLICIES = ("drop", "wait")


@dataclass
class ClientTime:
    """Simulated seconds one client spent in the current round."""

    compute_s: float = 0.0
    transfer_s: float = 0.0  # both directions, latency included
    late: int = 0  # exchanges past the deadline the server waited for (policy wait)
    energy: ClientEnergy = field(default_factory=ClientEnergy)


@dataclass(frozen=True)
class Turn:
    """One client's part of one exchange: bytes each way and FLOPs in between."""

    partition: int
    down_bytes: int
    up_bytes: int
    flops: float


class SimClock:
    """The run's simulated time and each client's share of the current round."""

    def __init__(
        self,
        population: Population | None,
        server_gflops: float,
        deadline_s: float = 0.0,
        policy: str = "drop",
        now: float = 0.0,
    ) -> None:
        if policy not in STRAGGLER_POLICIES:
            raise ValueError(f"straggler-policy {policy!r} is not one of {STRAGGLER_POLICIES}")
        self.population = population
        self.server_gflops = server_gflops
        self.deadline_s = deadline_s
        self.policy = policy
        self.now = now
        self.clients: dict[int, ClientTime] = {}

    def begin_round(self) -> None:
        self.clients = {}

    def _client(self, partition: int) -> ClientTime:
        return self.clients.setdefault(partition, ClientTime())

    def _profile(self, partition: int) -> ClientProfile:
        if self.population is None:
            raise RuntimeError("the clock has no population yet")
        return self.population[partition]

    def turn_s(self, turn: Turn) -> float:
        """Seconds ``turn`` takes its client (download, compute, upload) from now, and book
        them with their energy. A recorded link's rate is the trace's at each transfer's
        start; a constant link gives the same seconds at any start."""
        profile = self._profile(turn.partition)
        start = self.now
        download = profile.download_s(turn.down_bytes, start)
        compute = profile.compute_s(turn.flops)
        sent = start + download + compute  # the client starts its upload
        upload = profile.upload_s(turn.up_bytes, sent)
        transfer = download + upload
        booked = self._client(turn.partition)
        booked.transfer_s += transfer
        booked.compute_s += compute
        radio, latency = profile.radio_power, profile.latency_s
        # the radio is busy while bytes move: after the latency down, before it up
        booked.energy.transfer(radio, start + latency, start + download, turn.down_bytes, False)
        booked.energy.compute(turn.flops / 1e9, profile.j_per_gflop)
        booked.energy.transfer(radio, sent, sent + upload - latency, turn.up_bytes, True)
        return transfer + compute

    def vanished(self, partition: int, down_bytes: int) -> float:
        """A client that dropped out during an exchange: it received, then never answered.
        Returns the seconds of that download."""
        profile = self._profile(partition)
        seconds = profile.download_s(down_bytes, self.now)
        booked = self._client(partition)
        booked.transfer_s += seconds
        booked.energy.transfer(
            profile.radio_power, self.now + profile.latency_s, self.now + seconds, down_bytes, False
        )
        return seconds

    def energy_j(self, partition: int) -> tuple[float, float]:
        """(compute, radio) joules of ``partition`` this round, its last radio tail included."""
        booked = self.clients.get(partition)
        if booked is None:
            return 0.0, 0.0
        radio = self._profile(partition).radio_power
        return booked.energy.compute_j, booked.energy.radio_total_j(radio)

    def exchange(
        self, turns: list[Turn], keep: int | None = None, at_least: float = 0.0
    ) -> set[int]:
        """Advance by one exchange of ``turns``; the partitions cut as stragglers.

        ``keep``: only the first ``keep`` clients to answer go on (over-selection);
        ``at_least``: the exchange lasts no less (the downloads of clients that vanished).
        """
        if not turns:
            self.now += at_least
            return set()
        times = {t.partition: self.turn_s(t) for t in turns}
        order = sorted(times, key=lambda p: (times[p], p))
        kept = order[:keep] if keep is not None else order
        cut = set(order) - set(kept)
        late = {p for p in kept if self.deadline_s and times[p] > self.deadline_s}
        if late and self.policy == "drop":
            cut |= late
            duration = self.deadline_s
        else:
            for p in late:
                self.clients[p].late += 1
            duration = max(times[p] for p in kept)  # over-selection: its last kept client
        self.now += max(duration, at_least)
        return cut

    def server_step(self, flops: float) -> float:
        """Advance by one server step of ``flops``; its seconds."""
        seconds = flops / (self.server_gflops * 1e9)
        self.now += seconds
        return seconds
