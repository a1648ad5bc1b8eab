"""`scripts/flwr_run.sh` as users run it: early refusals, verdicts that belong to this
invocation, interrupts that stop everything, runs side by side, the sweep's time limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from simulations.sweep import main as sweep_main
from strategies.lifecycle import run_training
from tests.support.helpers import flwr_run_env, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TINY = "dataset='digits' method='none' batch-size=16 eval-samples=64 local-steps=3 lr=0.001"
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1"


def private_dirs() -> set[Path]:
    """The per-run Flower homes the launcher makes (and must remove)."""
    return set(Path(os.environ.get("TMPDIR", "/tmp")).glob("adcf.*"))


def launch(out: Path, name: str, run_config: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "scripts/flwr_run.sh", run_config, FEDERATION],
        cwd=ROOT,
        env=flwr_run_env(out, name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ("compresion=0.2", "unknown run-config key 'compresion' (did you mean 'compression'?)"),
        # the same path with other refusals (validate_run's, tests/run/test_validation.py)
        pytest.param(
            "split-index=9",
            "split-index must be in [1, 5] for a model with 6 blocks, got 9",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "partitioner='dirichlet' min-partition-size=31000",
            "min-partition-size=31000 × 2 partitions exceeds the 60000 training samples",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_config_is_refused_before_flower_starts(
    tmp_path: Path, run_config: str, message: str
) -> None:
    started = time.monotonic()
    code, out = finish(launch(tmp_path, "bad", run_config))
    assert code == 2, out
    assert message in out and out.count("error:") == 1 and "Traceback" not in out
    assert "SuperLink" not in out  # nothing of Flower started
    assert time.monotonic() - started < 60


def test_verdicts_belong_to_this_invocation(tmp_path: Path) -> None:
    """A finished run: the same command says so without running; a changed or invalid
    config is refused (never "completed" from the old summary)."""
    cfg = tiny_config(tmp_path, run_name="done")
    grid = InProcessGrid(client_module.app, 2, cfg.to_run_config())
    assert run_training(grid, cfg, progress=lambda _: None)["status"] == "completed"
    summary = (tmp_path / "done" / "summary.json").read_bytes()

    code, out = finish(launch(tmp_path, "done", f"{TINY} num-server-rounds=1"))
    assert code == 0 and "run done already completed" in out and "SuperLink" not in out

    code, out = finish(launch(tmp_path, "done", f"{TINY} num-server-rounds=2"))
    assert code == 2 and "holds a run with another config (num-server-rounds: 1 -> 2)" in out
    assert "completed" not in out

    code, out = finish(launch(tmp_path, "done", f"{TINY} num-server-rounds=-1"))
    assert code == 2 and "'num-server-rounds' = -1" in out and "completed" not in out
    assert (tmp_path / "done" / "summary.json").read_bytes() == summary  # untouched


@pytest.mark.slow  # two runs on Ray, a minute and more: in .ci/run, out of the default suite
def test_interrupt_stops_everything_and_a_run_beside_it_completes(tmp_path: Path) -> None:
    """Two runs a second apart: each has its own SuperLink. Ctrl-C on one ends all of its
    processes within seconds and leaves an `interrupted` summary; the other completes."""
    before = private_dirs()
    long = launch(tmp_path, "long", f"{TINY} num-server-rounds=50", start_new_session=True)
    time.sleep(1)
    short = launch(tmp_path, "short", f"{TINY} num-server-rounds=2")
    assert long.stdout is not None
    for line in long.stdout:  # wait until it trains
        if line.startswith("round"):
            break
    tree = psutil.Process(long.pid).children(recursive=True)
    assert any("flwr-simulation" in " ".join(p.cmdline()) for p in tree)
    os.killpg(long.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    stopped = time.monotonic()
    code, out = finish(long, timeout=60)
    assert code == 130 and "interrupted by SIGINT" in out
    assert time.monotonic() - stopped < 20
    _, alive = psutil.wait_procs(tree, timeout=1)
    assert not alive, [p.cmdline() for p in alive]
    summary = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds"] >= 1

    code, out = finish(short)
    assert code == 0, out
    assert json.loads((tmp_path / "short" / "summary.json").read_text())["status"] == "completed"
    assert private_dirs() == before


@pytest.mark.slow  # a minute on Ray: in .ci/run, out of the default suite
def test_sweep_point_timeout_stops_the_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = tmp_path / "slow.toml"
    experiment.write_text(
        '[sweep]\ndescription = "one slow point"\nnodes = 2\n'
        '[base]\ndataset = "digits"\nbatch-size = 16\nlocal-steps = 3\n'
        '[[grid]]\nmethod = ["none"]\nnum-server-rounds = [500]\n'
    )
    before = private_dirs()
    argv = [str(experiment), "--results-root", str(tmp_path / "r"), "--runner", "flwr"]
    assert sweep_main([*argv, "--point-timeout", "40"]) == 1
    out = capsys.readouterr().out
    assert "TimeoutError: point exceeded --point-timeout=40 s" in out
    assert private_dirs() == before
    assert not [p for p in psutil.process_iter(["cmdline"]) if "flwr-simulation" in str(p.info)]
