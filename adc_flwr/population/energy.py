"""A client's energy: its device's joules per GFLOP and its radio's power while it transfers.

The radio follows Huang et al.'s LTE / WiFi / 3G model (MobiSys 2012, "A Close Examination of
Performance and Power Characteristics of 4G LTE Networks"): while data moves at throughputs
t_u, t_d (Mbit/s) the radio draws P = α_u·t_u + α_d·t_d + β, so a transfer of b Mbit that
takes s seconds costs α·b + β·s joules; after a transfer the radio stays in its high-power
tail for up to T_tail (power P_tail) before it goes idle, and waking it again costs a
promotion (P_pro for T_pro). Between two transfers of one client the tail costs
P_tail·min(gap, T_tail), and a gap past T_tail costs a promotion; each round is booked on its
own: its first transfer pays a promotion and its last a whole tail, even where the client's
next round starts within T_tail (an upper bound of about one tail and one promotion per
round boundary). The promotion's delay is not put on the clock (the latency figures
cover it). Compute is joules per GFLOP of the device class (profiles.py cites each).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RadioPower:
    """One radio technology's power model (Huang et al.'s parameters)."""

    name: str
    up_w_per_mbps: float  # α_u: watts per Mbit/s of uplink throughput (= J per Mbit)
    down_w_per_mbps: float  # α_d
    active_w: float  # β: the base power while data moves
    tail_w: float
    tail_s: float
    promotion_w: float
    promotion_s: float

    def transfer_j(self, mbit: float, seconds: float, up: bool) -> float:
        """Joules of one transfer of ``mbit`` that keeps the radio busy ``seconds``."""
        alpha = self.up_w_per_mbps if up else self.down_w_per_mbps
        return alpha * mbit + self.active_w * seconds

    @property
    def promotion_j(self) -> float:
        return self.promotion_w * self.promotion_s

    @property
    def tail_j(self) -> float:
        return self.tail_w * self.tail_s


# [HUANG12] Huang, Qian, Gerber, Mao, Sen, Spatscheck, MobiSys 2012: the LTE model (under 6 %
#           error, abstract); its parameter tables could not be opened here.
# [ARO] AT&T's Video Optimizer (ARO; AT&T co-authored HUANG12), the LTE defaults in
#       ARO.Core .../configuration/impl/ProfileFactoryImpl.java: α_u 438.39 and α_d 51.97 mW per
#       Mbit/s, β 1.2 W, promotion 1.21 W for 0.26 s, tail 1.06 W (its fallback defaults, beside
#       an lte.conf that was not read). Checked there; the paper's β is recalled as 1.288 W.
# The LTE tail time (11.576 s) and every WiFi and 3G figure are HUANG12's Tables 3-4 as
# recalled, NOT checked against the paper here: treat them as assumptions until checked.
LTE_RADIO = RadioPower("lte", 0.43839, 0.05197, 1.2, 1.06, 11.576, 1.21, 0.26)
WIFI_RADIO = RadioPower("wifi", 0.28317, 0.13701, 0.13286, 0.1193, 0.2381, 0.1244, 0.0791)
THREE_G_RADIO = RadioPower("3g", 0.86898, 0.12212, 0.81788, 0.8039, 8.0882, 0.6594, 0.5821)
# round numbers, a reference point like the `uniform` mix: not a measurement
REFERENCE_RADIO = RadioPower("reference", 0.5, 0.1, 1.0, 1.0, 1.0, 1.0, 0.1)
RADIOS: dict[str, RadioPower] = {
    r.name: r for r in (LTE_RADIO, WIFI_RADIO, THREE_G_RADIO, REFERENCE_RADIO)
}
# joules per GFLOP of the round-number reference device (10 GFLOP per joule): not a measurement
REFERENCE_J_PER_GFLOP = 0.1


@dataclass
class ClientEnergy:
    """One client's joules in one round, and where its radio's timeline stands."""

    compute_j: float = 0.0
    radio_j: float = 0.0
    idle_from: float | None = None  # end of its last transfer this round (None: none yet)

    def compute(self, gflop: float, j_per_gflop: float) -> None:
        self.compute_j += gflop * j_per_gflop

    def transfer(self, radio: RadioPower, start: float, end: float, nbytes: int, up: bool) -> None:
        """Book a transfer that keeps the radio busy from ``start`` to ``end`` (seconds)."""
        if self.idle_from is None:
            self.radio_j += radio.promotion_j
        else:
            gap = max(0.0, start - self.idle_from)
            self.radio_j += radio.tail_w * min(gap, radio.tail_s)
            if gap > radio.tail_s:
                self.radio_j += radio.promotion_j
        self.radio_j += radio.transfer_j(nbytes * 8 / 1e6, end - start, up)
        self.idle_from = end

    def radio_total_j(self, radio: RadioPower) -> float:
        """The round's radio joules with the tail after its last transfer."""
        return self.radio_j + (radio.tail_j if self.idle_from is not None else 0.0)
