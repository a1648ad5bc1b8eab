"""Issue 27's probe of what a run reads, through the launcher's own ``main`` (checks in
process, Flower forbidden: ``tests/simulations/test_probe.py``'s ``refuse``), the ServerApp
on an in-process grid, and the local deployment's ``ADC_IN_ROOT``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adc_flwr.config import ConfigError
from adc_flwr.run.validation import validate_run
from simulations.deploy import input_root
from tests.population.test_links import write_trace
from tests.simulations.test_probe import TINY, one_error_line
from tests.simulations.test_probe import refuse as refuse  # a fixture, used by name
from tests.support.helpers import run_server_app, tiny_config

HEADER = "name,uplink_mbps,downlink_mbps,latency_s,gflops,availability,dropout,uplink_trace"
SECRET = "root:x:0:0:root:/root:/bin/bash"


def traced_csv(folder: Path, trace: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "profiles.csv"
    path.write_text(f"{HEADER}\na,,10,0.01,10,1,0,{trace}\n")
    return path


def test_inputs_outside_adc_in_root_are_one_error_line_before_flower(
    refuse, tmp_path: Path
) -> None:
    """The deployment's input root holds for every path a submitter names: the
    profile-trace, a link trace it names (never read: its content is not echoed), data-dir,
    a local dataset and a local model."""
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "passwd").write_text(SECRET + "\n")
    write_trace(elsewhere / "x.up", [1, 2])
    inside = traced_csv(root, "../elsewhere/passwd")
    cases = {
        f"profile-trace='{traced_csv(elsewhere, 'x.up')}'": "run-config key 'profile-trace'",
        f"profile-trace='{inside}'": f"profile-trace {inside} line 2, column 'uplink_trace'",
        f"data-dir='{elsewhere}'": "run-config key 'data-dir'",
        f"dataset='parquet:{elsewhere}/d.parquet'": "run-config key 'dataset'",
        f"model='{elsewhere}'": "run-config key 'model'",
    }
    for pairs, named in cases.items():
        tiny = TINY.replace("dataset='digits' ", "") if pairs.startswith("dataset") else TINY
        status, err = refuse(f"{tiny} {pairs}", ADC_IN_ROOT=str(root))
        line = one_error_line(err)
        assert status == 2 and named in line and f"outside ADC_IN_ROOT={root}" in line, line
        assert "root:x" not in line


def test_a_30_mb_single_line_trace_is_one_error_line(refuse, tmp_path: Path) -> None:
    """Python's int-digit limit once ended the preflight in a traceback naming no file."""
    trace = tmp_path / "huge.up"
    trace.write_bytes(b"7" * 30_000_000)
    status, err = refuse(f"{TINY} profile-trace='{traced_csv(tmp_path, 'huge.up')}'")
    line = one_error_line(err)
    assert status == 2 and f"link trace {trace} line 1: longer than 64 characters" in line


def test_the_server_app_refuses_a_trace_outside_adc_in_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain ``flwr run`` on the deployment has no preflight: the ServerApp checks the
    root before it makes or reads anything."""
    outside = traced_csv(tmp_path / "elsewhere", "x.up")
    write_trace(tmp_path / "elsewhere" / "x.up", [1, 2])  # a valid trace: only the root refuses
    monkeypatch.setenv("ADC_IN_ROOT", str(tmp_path / "in"))
    cfg = tiny_config(tmp_path / "out", profile_trace=str(outside))
    with pytest.raises(ConfigError, match=r"run-config key 'profile-trace' = .* lies outside"):
        run_server_app(cfg, 2)
    assert not (tmp_path / "out").exists()


def test_without_adc_in_root_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local user sets no root: a trace anywhere is read as before."""
    monkeypatch.delenv("ADC_IN_ROOT", raising=False)
    write_trace(tmp_path / "x.up", [1, 2])
    config = tiny_config(tmp_path / "out", profile_trace=str(traced_csv(tmp_path, "x.up")))
    assert validate_run(config.to_run_config()).profile_trace


def test_the_local_deployment_pins_the_inputs_its_run_config_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/deploy_local.sh sets ADC_IN_ROOT (as ADC_OUT_ROOT) to what its own run
    reads: the profile-trace and its link traces, wherever they lie, the data and model;
    its out-dir when it names none."""
    monkeypatch.delenv("ADC_IN_ROOT", raising=False)
    (tmp_path / "far").mkdir()
    far = write_trace(tmp_path / "far" / "x.up", [1, 2])
    trace = traced_csv(tmp_path / "traces", str(far))
    out = str(tmp_path / "out")
    roots = input_root(f"profile-trace='{trace}' data-dir='{tmp_path}' out-dir='{out}'", out)
    assert roots.split(os.pathsep) == [str(trace), str(tmp_path), str(far)]
    assert input_root(f"dataset='digits' out-dir='{out}'", out) == out


def test_the_local_deployment_names_no_path_for_a_preset_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model='vit-cpu'`` is a preset, not a folder, even when one of that name lies in the
    working directory; ``hf:<folder>`` is a folder the loader reads."""
    monkeypatch.delenv("ADC_IN_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vit-cpu").mkdir()
    out = str(tmp_path / "out")
    assert input_root(f"dataset='digits' model='vit-cpu' out-dir='{out}'", out) == out
    roots = input_root(f"dataset='digits' model='hf:{tmp_path / 'vit-cpu'}' out-dir='{out}'", out)
    assert roots == str(tmp_path / "vit-cpu")
