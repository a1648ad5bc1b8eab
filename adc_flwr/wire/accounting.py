"""Bytes per direction, read from codec sizes only (docs/design.md section 4).

Nothing here estimates a size: :class:`Traffic` is built from serialised records through
:mod:`adc_flwr.wire.codec`, so the numbers are exactly what Flower carried.

Units: bytes are integers; ``mb_sent`` is in MB = 1e6 bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from adc_flwr.wire.codec import ArrayRecord, act_and_target_nbytes, record_nbytes


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
        the run directory writes it as a blank cell / JSON null.
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
    """The run's running total (what ``budget-mb`` limits) and each client's traffic in the
    current round: constant work per entry and memory that does not grow with the rounds."""

    def __init__(self) -> None:
        self._total = Traffic()
        self._round: int | None = None
        self._clients: dict[int, Traffic] = {}

    def add(self, server_round: int, client: int, traffic: Traffic) -> None:
        """Record ``traffic`` for ``client`` in ``server_round`` (a new round starts afresh)."""
        if server_round != self._round:
            self._round, self._clients = server_round, {}
        self._clients[client] = self._clients.get(client, Traffic()) + traffic
        self._total += traffic

    def client_round(self, server_round: int, client: int) -> Traffic:
        """One client's traffic in ``server_round``, which must be the current round (or a
        later one, in which nothing has been booked yet)."""
        if self._round is not None and server_round < self._round:
            raise KeyError(f"round {server_round} is not the current round ({self._round})")
        if server_round != self._round:  # nothing booked yet in this round
            return Traffic()
        return replace(self._clients.get(client, Traffic()))

    def total(self) -> Traffic:
        """Traffic over all rounds and clients (a copy)."""
        return replace(self._total)

    @property
    def mb_sent(self) -> float:
        """Up + down, model sync included, in MB (1e6 bytes): what ``budget-mb`` limits."""
        return self._total.total / 1e6

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, for a checkpoint that ``torch.load(weights_only=True)`` reads."""
        return {
            "total": asdict(self._total),
            "round": self._round,
            "clients": [{"client": c, **asdict(t)} for c, t in self._clients.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (resume after a restart), in place."""
        self._total = Traffic(**state["total"])
        self._round = state["round"]
        self._clients = {}
        for row in state["clients"]:
            counts = dict(row)
            client = counts.pop("client")
            self._clients[client] = Traffic(**counts)
