"""A resume notices changed inputs (issue 27, item 1): inputs.json and what reads it.

A run on a recorded link is killed in round 2; editing its link trace or its profile-trace
then makes the rerun refuse, in the ServerApp (a plain ``flwr run`` resumes too) and in the
launcher's preflight (what ``scripts/flwr_run.sh`` runs), naming the file. An unchanged
rerun, and a run directory from before inputs.json, resume exactly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from adc_flwr.config import RunConfig
from adc_flwr.run.files import RunDirError
from adc_flwr.run.run_dir import RunDir
from simulations import preflight
from strategies.step_engine import StepEngine
from tests.run.test_resume import Kill, kill_on_call, tables
from tests.simulations import test_probe
from tests.strategies.test_trace_runs import profiles_csv
from tests.support.helpers import run_server_app, tiny_config

refuse = test_probe.refuse  # the launcher's main, checks in process, Flower forbidden
INPUTS = "inputs.json"
ROW = "p,,,0.02,5,1,0,every-ms.trace,every-ms.trace,lte,0.3"  # 12 Mbit/s both ways


def traced(root: Path, run_name: str = "probe", **overrides: object) -> RunConfig:
    """A 2-round run on a recorded link, written under ``root/out`` (the probe's out-dir)."""
    root.mkdir(parents=True, exist_ok=True)
    base = {"method": "adc", "compression": 0.25, "num_server_rounds": 2, "run_name": run_name}
    trace = profiles_csv(root, "links", ROW)
    return tiny_config(root / "out", profile_trace=trace, **(base | overrides))


def killed_in_round_2(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        kill_on_call(patch, StepEngine, "server_step", 5)  # round 2: round 1 is checkpointed
        with pytest.raises(Kill):
            run_server_app(cfg, nodes=2)


def launcher_pairs(cfg: RunConfig) -> str:
    """The run config as ``scripts/flwr_run.sh`` gets it (out-dir and run-name from OUT_DIR
    and RUN_NAME)."""
    pairs = cfg.to_run_config()
    return preflight.format_pairs(
        {k: v for k, v in pairs.items() if k not in ("out-dir", "run-name")}
    )


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables of the same run, uninterrupted."""
    cfg = traced(tmp_path_factory.mktemp("whole"))
    assert run_server_app(cfg, nodes=2)[0]["status"] == "completed"
    return tables(cfg)


def link_trace(cfg: RunConfig) -> Path:
    return Path(cfg.profile_trace).parent / "every-ms.trace"


def files(run_dir: RunDir) -> dict[str, bytes]:
    """The run directory's files but the lock (each start rewrites its holder)."""
    return {p.name: p.read_bytes() for p in run_dir.path.iterdir() if p.name != ".lock"}


def test_an_edited_input_refuses_the_resume_naming_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refuse,
    capsys: pytest.CaptureFixture[str],
    whole,
) -> None:
    """The issue's case (round 1 on 12 Mbit/s, the rest on 24, ``completed``): the ServerApp
    and the launcher's preflight both refuse an edited link trace, then an edited
    profile-trace, naming the file, and change nothing; with both restored it resumes to
    the metrics of an uninterrupted run."""
    cfg = traced(tmp_path)
    killed_in_round_2(cfg, monkeypatch)
    run_dir = RunDir(cfg.run_dir)
    before = files(run_dir)
    trace, profiles = link_trace(cfg), Path(cfg.profile_trace)
    originals = {path: path.read_text() for path in (trace, profiles)}
    edits = {
        trace: ("1\n1\n", rf"link trace {re.escape(str(trace))}"),  # 24 Mbit/s
        profiles: (
            originals[profiles].replace(",0.02,", ",0.05,"),  # another latency
            rf"profile-trace {re.escape(str(profiles))}",
        ),
    }
    for path, (text, named) in edits.items():
        path.write_text(text)
        message = rf"{re.escape(str(cfg.run_dir))}: input changed since the run started: "
        message += rf"{named} \(sha256 [0-9a-f]{{12}}\.\. -> [0-9a-f]{{12}}\.\.\); start a new run"
        with pytest.raises(RunDirError, match=message):
            run_server_app(cfg, nodes=2)
        capsys.readouterr()  # the killed run's traceback
        status, err = refuse(launcher_pairs(cfg))
        assert status == 2 and re.fullmatch(f"error: {message}.*", test_probe.one_error_line(err))
        assert files(run_dir) == before and run_dir.read_summary()["status"] != "completed"
        path.write_text(originals[path])  # restored: the same content, a new mtime
    assert preflight.check(launcher_pairs(cfg), "", str(cfg.run_dir.parent), "probe") == "resume"
    assert run_server_app(cfg, nodes=2)[0]["status"] == "completed"
    for got, expected in zip(tables(cfg), whole, strict=True):
        pd.testing.assert_frame_equal(got, expected)


def test_a_run_from_before_inputs_json_resumes_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, whole
) -> None:
    cfg = traced(tmp_path)
    killed_in_round_2(cfg, monkeypatch)
    (cfg.run_dir / INPUTS).unlink(missing_ok=True)  # as a run directory from before it
    unchecked = "has no inputs.json (it was started before runs recorded their inputs): its "
    unchecked += "inputs could not be checked"
    with caplog.at_level(logging.WARNING, logger="adc_flwr"):
        assert (
            preflight.check(launcher_pairs(cfg), "", str(cfg.run_dir.parent), "probe") == "resume"
        )
        assert unchecked in caplog.text
        caplog.clear()
        assert run_server_app(cfg, nodes=2)[0]["status"] == "completed"
        assert unchecked in caplog.text
    for got, expected in zip(tables(cfg), whole, strict=True):
        pd.testing.assert_frame_equal(got, expected)
    assert not (cfg.run_dir / INPUTS).exists()  # what it read at the start is unknown


def test_a_finished_run_stays_finished_and_says_an_input_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = traced(tmp_path, num_server_rounds=1)
    summary = run_server_app(cfg, nodes=2)[0]
    recorded = json.loads((cfg.run_dir / INPUTS).read_text())
    assert [e["role"] for e in recorded["inputs"]] == ["profile-trace", "link trace", "dataset"]
    link_trace(cfg).write_text("1\n1\n")
    with caplog.at_level(logging.WARNING, logger="adc_flwr"):
        assert (
            preflight.check(launcher_pairs(cfg), "", str(cfg.run_dir.parent), "probe") == "finished"
        )
        assert run_server_app(cfg, nodes=2)[0] == summary
    changed = re.findall(
        r"input changed since the run ran: link trace \S+every-ms.trace", caplog.text
    )
    assert len(changed) == 2


def test_dataset_files_by_size_and_mtime_a_local_model_by_content(tmp_path: Path) -> None:
    from adc_flwr.run.inputs import input_change, run_inputs

    images, model = tmp_path / "images", tmp_path / "model"
    for name in ("a/1.png", "a/2.png", "b/1.png"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(b"png")
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = RunConfig.from_run_config({"dataset": f"imagefolder:{images}", "model": str(model)})
    record = {"inputs": run_inputs(cfg)}
    assert input_change(record, cfg) is None
    stat = os.stat(model / "config.json")
    (model / "config.json").write_text("[]")  # same size, same mtime: only the hash tells
    os.utime(model / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert input_change(record, cfg) == (
        f"model {model}/config.json (sha256 44136fa355b3.. -> 4f53cda18c2b..)"
    )
    record = {"inputs": run_inputs(cfg)}
    os.utime(images / "a/2.png", ns=(0, 10**18))
    assert input_change(record, cfg).startswith(f"dataset {images}/a/2.png (modified: mtime ")
    (images / "a/2.png").write_bytes(b"jpeg")
    (images / "c.png").write_bytes(b"png")
    assert input_change(record, cfg) == (
        f"dataset {images}/a/2.png (size 3 -> 4 bytes); 1 more file(s) of it differ too"
    )


def test_a_listing_past_its_limit_says_so_and_checks_what_it_holds(tmp_path: Path) -> None:
    from adc_flwr.run.inputs import input_change, run_inputs

    for name in ("1.png", "2.png", "3.png"):
        (tmp_path / name).write_bytes(b"png")
    cfg = RunConfig.from_run_config({"dataset": f"imagefolder:{tmp_path}"})
    (entry,) = run_inputs(cfg, limit=2)
    assert entry["capped"] and list(entry["files"]) == ["1.png", "2.png"]
    record = {"limit": 2, "inputs": [entry]}
    (tmp_path / "3.png").write_bytes(b"jpeg")  # past the limit: not seen
    assert input_change(record, cfg) is None
    (tmp_path / "0.png").write_bytes(b"png")  # sorts first: 2.png falls out of the listing
    assert input_change(record, cfg) == (
        f"dataset {tmp_path}/0.png (added since); 1 more file(s) of it differ too"
    )


def test_hub_inputs_are_recorded_by_name_and_not_checked() -> None:
    from adc_flwr.run.inputs import input_change, run_inputs

    cfg = RunConfig.from_run_config({"dataset": "hf:someone/set", "model": "hf:someone/vit"})
    entries = run_inputs(cfg)
    assert entries == [
        {"role": "model", "hub": "hf:someone/vit", "revision": None, "checked": False},
        {"role": "dataset", "hub": "hf:someone/set", "revision": None, "checked": False},
    ]
    assert input_change({"inputs": entries}, cfg) is None


def test_local_datasets_are_recorded_where_the_loader_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hf:<local folder>`` is read from disk, so it is listed and checked, not recorded as
    an unchecked hub name; ``parquet:~/x`` with ``data-dir`` set is the home folder's file,
    as the loader reads it, never ``data-dir/~/x``."""
    from adc_flwr.run.inputs import input_change, run_inputs

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    local = tmp_path / "local-set"
    (local / "train").mkdir(parents=True)
    (local / "train" / "0.parquet").write_bytes(b"rows")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "x.parquet").write_bytes(b"rows")
    data_dir = str(tmp_path / "data")
    for dataset, where in [
        (f"hf:{local}", local / "train" / "0.parquet"),
        ("parquet:~/x.parquet", tmp_path / "home" / "x.parquet"),
    ]:
        cfg = RunConfig.from_run_config({"dataset": dataset, "data-dir": data_dir})
        (entry,) = run_inputs(cfg)
        assert "hub" not in entry and Path(entry["path"]) in (local, where), entry
        record = {"inputs": [entry]}
        where.write_bytes(b"other rows")
        assert input_change(record, cfg).startswith(f"dataset {where} (size 4 -> 10 bytes)")


def test_bundled_digits_is_the_same_input_wherever_it_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuilt or moved ``.venv`` holds the same digits file: by content, not by path."""
    import shutil

    import sklearn

    from adc_flwr.run.inputs import input_change, run_inputs

    cfg = RunConfig.from_run_config({"dataset": "digits"})
    record = {"inputs": run_inputs(cfg)}
    data = Path(sklearn.__file__).parent / "datasets" / "data"
    moved = tmp_path / "venv2" / "sklearn"
    (moved / "datasets" / "data").mkdir(parents=True)
    shutil.copy(data / "digits.csv.gz", moved / "datasets" / "data" / "digits.csv.gz")
    monkeypatch.setattr(sklearn, "__file__", str(moved / "__init__.py"))
    assert input_change(record, cfg) is None
    (moved / "datasets" / "data" / "digits.csv.gz").write_bytes(b"other")
    assert "dataset scikit-learn:datasets/data/digits.csv.gz (sha256 " in str(
        input_change(record, cfg)
    )


def test_a_remembered_link_trace_outside_adc_in_root_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the profile-trace cannot be read now, the link traces inputs.json remembers are
    identified instead: only inside ADC_IN_ROOT (validation names the refusal)."""
    from adc_flwr.run.inputs import run_inputs

    outside = tmp_path / "elsewhere" / "secret"
    outside.parent.mkdir()
    outside.write_text("root:x:0:0\n")
    monkeypatch.setenv("ADC_IN_ROOT", str(tmp_path / "in"))
    cfg = RunConfig.from_run_config({"profile-trace": str(tmp_path / "in" / "gone.csv")})
    entries = run_inputs(cfg, known_traces=[str(outside)])
    assert {"role": "link trace", "path": str(outside), "sha256": None} in entries
