"""Recorded links and energy through the real ServerApp (hostile in-process grid)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from adc_flwr.population.profile_csv import TRACE_COLUMNS, read_trace, write_profiles
from adc_flwr.run.run_dir import RunDir
from adc_flwr.run.summary import summary_from_checkpoint
from tests.support.helpers import run_server_app, tiny_config

HEADER = ",".join((*TRACE_COLUMNS, "uplink_trace", "downlink_trace", "radio", "j_per_gflop"))


def profiles_csv(tmp_path: Path, name: str, row: str) -> str:
    (tmp_path / "every-ms.trace").write_text("1\n", encoding="ascii")  # 12 Mbit/s
    path = tmp_path / f"{name}.csv"
    path.write_text(f"{HEADER}\n{row}\n", encoding="utf-8")
    return str(path)


def test_a_constant_trace_run_keeps_the_clock_of_its_rate_and_books_energy(
    tmp_path: Path,
) -> None:
    """Every transfer (fronts down and up, packets, gradients) goes through the trace: with
    one opportunity per ms the run's clock is the 12 Mbit/s run's within 1 ms per transfer
    on the critical path; the bytes, and so the model, are the same."""
    rows = {
        "traced": "p,,,0.02,5,1,0,every-ms.trace,every-ms.trace,lte,0.3",
        "constant": "p,12,12,0.02,5,1,0,,,lte,0.3",
    }
    summaries, clients = {}, {}
    for name, row in rows.items():
        cfg = tiny_config(
            tmp_path / name,
            method="adc",
            compression=0.25,
            num_server_rounds=2,
            profile_trace=profiles_csv(tmp_path, name, row),
        )
        summaries[name], _ = run_server_app(cfg, nodes=3)
        clients[name] = RunDir(cfg.run_dir).read_clients()
    traced, constant = summaries["traced"], summaries["constant"]
    assert traced["status"] == constant["status"] == "completed"
    assert traced["test_accuracy"] == constant["test_accuracy"]
    exchanges = 2 * (3 + 1)  # rounds x (train.start + 3 steps)
    assert abs(traced["sim_time_s"] - constant["sim_time_s"]) <= 2 * exchanges * 1e-3
    assert traced["sim_time_s"] != constant["sim_time_s"]
    byte_columns = ["bytes_up", "bytes_down", "bytes_model_sync"]
    assert clients["traced"][byte_columns].equals(clients["constant"][byte_columns])
    table = clients["traced"]
    assert (table["energy_compute_j"] > 0).all() and (table["energy_radio_j"] > 0).all()
    per_client = (table["energy_compute_j"] + table["energy_radio_j"]).groupby(table["partition"])
    assert traced["energy_j"] == pytest.approx(per_client.sum().sum())
    assert traced["energy_max_client"] == int(per_client.sum().idxmax())
    assert traced["energy_max_client_j"] == pytest.approx(per_client.sum().max())
    assert traced["energy_j"] == pytest.approx(
        traced["energy_compute_j"] + traced["energy_radio_j"]
    )
    assert sum(row["energy_j"] for row in traced["history"]) == pytest.approx(traced["energy_j"])


def test_a_killed_run_on_recorded_links_resumes_to_the_same_times_and_joules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock's time is in the checkpoint and the offsets follow from the seed, so a rerun
    after a kill in round 2 writes the clients.csv (times, joules) of an uninterrupted run."""
    from simulations.edge_traces import TRACES
    from strategies.step_engine import StepEngine
    from tests.run.test_resume import Kill, kill_on_call, tables

    rows = [p for p in read_trace(TRACES / "edge_traced.csv") if p.name in ("lte", "iot")]
    trace = tmp_path / "traced.csv"
    write_profiles(trace, rows)

    def config(name: str):
        return tiny_config(
            tmp_path / name,
            method="adc",
            compression=0.25,
            num_server_rounds=2,
            profile_trace=str(trace),
            seed=3,
        )

    whole = config("whole")
    assert run_server_app(whole, nodes=3)[0]["status"] == "completed"
    killed = config("killed")
    with monkeypatch.context() as patch:
        kill_on_call(patch, StepEngine, "server_step", 5)  # round 2
        with pytest.raises(Kill):
            run_server_app(killed, nodes=3)
    # what the launcher writes for a run stopped from outside has the energy so far too
    stopped = summary_from_checkpoint(RunDir(killed.run_dir), "interrupted", "killed")
    round_1 = RunDir(killed.run_dir).read_clients()
    assert set(round_1["round"]) == {1}
    joules = (round_1["energy_compute_j"] + round_1["energy_radio_j"]).sum()
    assert stopped["energy_j"] == pytest.approx(joules) and stopped["energy_max_client"] in (
        0,
        1,
        2,
    )
    assert run_server_app(killed, nodes=3)[0]["status"] == "completed"
    for got, expected in zip(tables(killed), tables(whole), strict=True):
        pd.testing.assert_frame_equal(got, expected)
    offsets = pd.read_csv(killed.run_dir / "profiles.csv")["trace_offset_s"]
    assert offsets.nunique() == 3  # each partition its own start into the traces
