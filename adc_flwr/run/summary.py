"""A run's ``summary.json``, built in one place: from a running strategy, from the last
checkpoint of a run stopped from outside, or for a run that failed before it trained.

Keys, always present: ``status`` (``completed``, ``failed`` or ``interrupted``),
``stop_reason`` (why a completed run stopped: ``"num-server-rounds"`` or ``"budget-mb"``;
null otherwise), ``error`` (what failed or interrupted it; null when completed), ``rounds``,
``test_accuracy``, ``test_loss``, ``bytes_up_act``, ``bytes_up_targets``, ``bytes_down_grad``,
``bytes_model_sync``, ``compression_ratio``, ``wall_time_s`` (null when unknown),
``sim_time_s``, ``history`` (one row per round that ran) and ``drops`` (dropped clients per
reason over those rounds), plus any extra the caller adds: a run's ``clients_missed`` names
each client that failed for real (raised, timed out, its node gone) with the rounds it
missed and its last reason.

The drop reasons are the vocabulary of a round's outcomes (``strategies.outcomes``):
``error`` (the client raised), ``timeout`` (no reply in time), ``unavailable`` (drawn, but its
node was gone or still owed a reply), ``dropped-out`` and ``straggler`` (the simulated
population's drop-outs and slow clients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from adc_flwr.run.run_dir import TRAFFIC_COLUMNS

if TYPE_CHECKING:
    from adc_flwr.run.run_dir import RunDir
    from adc_flwr.wire.accounting import Traffic

ERROR = "error"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
DROPPED_OUT = "dropped-out"  # the simulated client vanished mid-round
STRAGGLER = "straggler"  # too slow for deadline-s, or not among the first (over-select)
DROP_REASONS = (ERROR, TIMEOUT, UNAVAILABLE, DROPPED_OUT, STRAGGLER)


def drop_key(reason: str) -> str:
    """The ``history`` column counting ``reason``: ``dropped_error``, ``dropped_dropped_out``."""
    return f"dropped_{reason.replace('-', '_')}"


SUMMARY_METRICS = (
    "rounds",
    "test_accuracy",
    "test_loss",
    *TRAFFIC_COLUMNS,
    "wall_time_s",
    "sim_time_s",
)
SUMMARY_STATUSES = ("completed", "failed", "interrupted")


def make_summary(
    status: str,
    stop_reason: str | None = None,
    error: str | None = None,
    **metrics: Any,
) -> dict[str, Any]:
    """A summary with every documented key; metrics not given are None.

    A completed run must say why it stopped; a failed one must say what failed.
    """
    if status not in SUMMARY_STATUSES:
        raise ValueError(f"summary status {status!r} is not one of {SUMMARY_STATUSES}")
    if status == "completed" and not stop_reason:
        raise ValueError("a completed run's summary needs a stop_reason")
    if status != "completed" and not error:
        raise ValueError(f"a {status} run's summary needs an error saying why")
    summary: dict[str, Any] = {"status": status, "stop_reason": stop_reason, "error": error}
    summary.update({key: metrics.pop(key, None) for key in SUMMARY_METRICS})
    summary.update(metrics)
    return summary


def run_summary(
    status: str,
    history: list[dict[str, Any]],
    total: Traffic,
    wall_time_s: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """The summary of a run whose rounds are ``history`` (a failed round included) and whose
    traffic is ``total``: accuracy and loss of the last round, ``drops`` per reason."""
    last = history[-1] if history else {}
    extra.setdefault("sim_time_s", last.get("sim_time_s"))
    return make_summary(
        status,
        test_accuracy=last.get("test_accuracy"),
        test_loss=last.get("test_loss"),
        rounds=len(history),
        wall_time_s=wall_time_s,
        history=history,
        drops={
            reason: sum(int(row.get(drop_key(reason), 0)) for row in history)
            for reason in DROP_REASONS
        },
        **total.as_dict(),
        **extra,
    )


def energy_summary(clients: pd.DataFrame) -> dict[str, Any]:
    """Energy keys from ``clients.csv``: joules of all clients (compute, radio) and the
    most-loaded client (the partition with the most joules over the run, and its joules)."""
    if clients.empty:
        return {
            "energy_j": 0.0,
            "energy_compute_j": 0.0,
            "energy_radio_j": 0.0,
            "energy_max_client": None,
            "energy_max_client_j": None,
        }
    joules = clients["energy_compute_j"] + clients["energy_radio_j"]
    per_client = joules.groupby(clients["partition"]).sum()
    worst = int(per_client.idxmax())
    return {
        "energy_j": float(per_client.sum()),
        "energy_compute_j": float(clients["energy_compute_j"].sum()),
        "energy_radio_j": float(clients["energy_radio_j"].sum()),
        "energy_max_client": worst,
        "energy_max_client_j": float(per_client[worst]),
    }


def run_energy(run_dir: RunDir) -> dict[str, Any]:
    """:func:`energy_summary` of the run's ``clients.csv``; a file that cannot be read leaves
    the keys out and says why in ``energy_error`` (the rest of the summary is kept)."""
    try:
        return energy_summary(run_dir.read_clients())
    except (ValueError, KeyError, OSError) as exc:
        return {"energy_error": f"{run_dir.clients.path} cannot be read: {exc}"}


def summary_from_checkpoint(run_dir: RunDir, status: str, error: str) -> dict[str, Any]:
    """A summary for a run stopped from outside (its process is gone): what the last
    checkpoint knew. The launchers write it when they are interrupted."""
    from adc_flwr.wire.accounting import Traffic, TrafficLedger

    checkpoint = run_dir.load_checkpoint()
    if checkpoint is None:
        return run_summary(status, [], Traffic(), None, error=error)
    ledger = TrafficLedger()
    ledger.load_state_dict(checkpoint["ledger"])
    return run_summary(
        status,
        list(checkpoint["history"]),
        ledger.total(),
        float(checkpoint["wall_time_s"]),
        error=error,
        clients_missed=list(checkpoint.get("missed", [])),
        **run_energy(run_dir),
    )
