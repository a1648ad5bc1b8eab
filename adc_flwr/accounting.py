"""Bytes per direction and simulated time, read from codec sizes only (DESIGN.md section 4).

Nothing here estimates a size: :class:`Traffic` is built from serialised records through
:mod:`adc_flwr.codec`, so the numbers are exactly what Flower carried.

Units: bytes are integers; ``mb_sent`` is in MB = 1e6 bytes; bandwidth is in Mbit/s
(1e6 bits per second); times are in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from adc_flwr.codec import ArrayRecord, act_and_target_nbytes, record_nbytes
from adc_flwr.config import SL_MODES


@dataclass
class Traffic:
    """Bytes one client (or a sum of clients) exchanged.

    ``up`` is the split-learning uplink (activations, side information, targets), ``down``
    the gradients; ``bytes_model_sync`` (front weights down and up) is kept apart because
    it is per round, not per step, and counts in ``total`` only.
    """

    bytes_up_act: int = 0
    bytes_up_targets: int = 0
    bytes_down_grad: int = 0
    bytes_model_sync: int = 0
    bytes_up_act_uncompressed: int = 0

    @classmethod
    def of_packet(cls, record: ArrayRecord, uncompressed_act_nbytes: int) -> Traffic:
        """Uplink of one packet record; ``uncompressed_act_nbytes`` from the codec too."""
        act, targets = act_and_target_nbytes(record)
        return cls(
            bytes_up_act=act,
            bytes_up_targets=targets,
            bytes_up_act_uncompressed=uncompressed_act_nbytes,
        )

    @classmethod
    def of_grads(cls, record: ArrayRecord) -> Traffic:
        """Downlink of one gradient record."""
        return cls(bytes_down_grad=record_nbytes(record))

    @classmethod
    def of_model_sync(cls, *records: ArrayRecord) -> Traffic:
        """Weights sent down and/or up for a round."""
        return cls(bytes_model_sync=sum(record_nbytes(r) for r in records))

    def __add__(self, other: Traffic) -> Traffic:
        if not isinstance(other, Traffic):
            return NotImplemented
        return Traffic(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def __iadd__(self, other: Traffic) -> Traffic:
        if not isinstance(other, Traffic):
            return NotImplemented
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def up(self) -> int:
        """Split-learning uplink bytes: activations, side information and targets."""
        return self.bytes_up_act + self.bytes_up_targets

    @property
    def down(self) -> int:
        """Split-learning downlink bytes: gradients."""
        return self.bytes_down_grad

    @property
    def total(self) -> int:
        """Everything on the wire, model sync included."""
        return self.up + self.down + self.bytes_model_sync

    @property
    def compression_ratio(self) -> float:
        """``bytes_up_act / bytes_up_act_uncompressed``; NaN when no activation was sent.

        NaN rather than 1.0 so that "nothing measured" cannot pass for "no compression";
        results.py writes it as a blank cell / JSON null.
        """
        if self.bytes_up_act_uncompressed == 0:
            return math.nan
        return self.bytes_up_act / self.bytes_up_act_uncompressed

    def as_dict(self) -> dict[str, int | float]:
        """The metric/summary view: the four byte counts and ``compression_ratio``."""
        return {
            "bytes_up_act": self.bytes_up_act,
            "bytes_up_targets": self.bytes_up_targets,
            "bytes_down_grad": self.bytes_down_grad,
            "bytes_model_sync": self.bytes_model_sync,
            "compression_ratio": self.compression_ratio,
        }


class TrafficLedger:
    """Traffic per (round, client) and per (round, step), with totals for the budget check.

    Step entries sum over the clients that took part in that step; a model-sync entry is
    recorded with ``step=None`` so it counts per client and round but not per step.
    """

    def __init__(self) -> None:
        self._by_client: dict[tuple[int, int], Traffic] = {}
        self._by_step: dict[tuple[int, int], Traffic] = {}

    def add(
        self, server_round: int, client: int, traffic: Traffic, step: int | None = None
    ) -> None:
        """Record ``traffic`` for ``client`` in ``server_round`` (and in ``step`` if given)."""
        key = (server_round, client)
        self._by_client[key] = self._by_client.get(key, Traffic()) + traffic
        if step is not None:
            key = (server_round, step)
            self._by_step[key] = self._by_step.get(key, Traffic()) + traffic

    def client_round(self, server_round: int, client: int) -> Traffic:
        """One client's traffic in one round."""
        return replace(self._by_client.get((server_round, client), Traffic()))

    def step_total(self, server_round: int, step: int) -> Traffic:
        """All clients' traffic for one step of one round."""
        return replace(self._by_step.get((server_round, step), Traffic()))

    def round_total(self, server_round: int) -> Traffic:
        """All clients' traffic in one round."""
        return sum((t for (r, _), t in self._by_client.items() if r == server_round), Traffic())

    def client_total(self, client: int) -> Traffic:
        """One client's traffic over all rounds."""
        return sum((t for (_, c), t in self._by_client.items() if c == client), Traffic())

    def total(self) -> Traffic:
        """Traffic over all rounds and clients."""
        return sum(self._by_client.values(), Traffic())

    def rounds(self) -> list[int]:
        """Rounds with recorded traffic, ascending."""
        return sorted({r for r, _ in self._by_client})

    def clients(self, server_round: int | None = None) -> list[int]:
        """Clients with recorded traffic (in ``server_round`` if given), ascending."""
        return sorted({c for r, c in self._by_client if server_round in (None, r)})

    @property
    def mb_sent(self) -> float:
        """Up + down, model sync included, in MB (1e6 bytes): what ``budget-mb`` limits."""
        return self.total().total / 1e6

    def state(self) -> dict[str, list[dict[str, Any]]]:
        """Plain lists of ints, for a checkpoint that ``torch.load(weights_only=True)`` reads."""
        return {
            "clients": [
                {"round": r, "client": c, **asdict(t)} for (r, c), t in self._by_client.items()
            ],
            "steps": [{"round": r, "step": s, **asdict(t)} for (r, s), t in self._by_step.items()],
        }

    @classmethod
    def from_state(cls, state: dict[str, list[dict[str, Any]]]) -> TrafficLedger:
        """Rebuild a ledger saved with :meth:`state` (resume after a restart)."""
        ledger = cls()
        tables = (("clients", "client", ledger._by_client), ("steps", "step", ledger._by_step))
        for name, column, table in tables:
            for row in state[name]:
                counts = dict(row)
                key = (counts.pop("round"), counts.pop(column))
                table[key] = Traffic(**counts)
        return ledger


def sim_time_s(
    compute_s: float,
    bytes_up: int,
    bytes_down: int,
    *,
    compute_factor: float = 1.0,
    bandwidth_up_mbps: float,
    bandwidth_down_mbps: float,
    latency_s: float,
    messages: int = 1,
) -> float:
    """Simulated seconds for one client: compute × factor + bytes / bandwidth + latency.

    Each direction is timed at its own bandwidth (Mbit/s, so bytes × 8 / (mbps × 1e6));
    ``latency_s`` is paid once per message exchanged. Infinite bandwidth costs no time.
    """
    if compute_s < 0 or compute_factor < 0 or latency_s < 0 or messages < 0:
        raise ValueError("compute time, compute factor, latency and messages must be >= 0")
    if bytes_up < 0 or bytes_down < 0:
        raise ValueError("byte counts must be >= 0")
    if not (bandwidth_up_mbps > 0 and bandwidth_down_mbps > 0):
        raise ValueError("bandwidths must be > 0 Mbit/s")
    transfer = bytes_up * 8 / (bandwidth_up_mbps * 1e6) + bytes_down * 8 / (
        bandwidth_down_mbps * 1e6
    )
    return compute_s * compute_factor + transfer + latency_s * messages


def round_sim_time(per_client_times: Iterable[float], mode: str) -> float:
    """A round's simulated time: the slowest client in SplitFed (clients run in parallel),
    the sum in vanilla SL (clients take turns)."""
    times = list(per_client_times)
    if mode == "splitfed":
        return max(times, default=0.0)
    if mode == "vanilla":
        return math.fsum(times)
    raise ValueError(f"sl-mode {mode!r} is not one of {', '.join(SL_MODES)}")
