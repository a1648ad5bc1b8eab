"""Devices and precision on a machine without CUDA: choosing the device and what refuses one.

- ``device`` resolution: ``torch.cuda`` is monkeypatched to simulate a machine with GPUs, and
  a Ray worker is simulated by a stand-in ``ray`` module.
- A GPU asked for where there is none, or bf16 on a GPU without bfloat16: one error naming
  the key, from ``validate_run`` (before the data is loaded) and from
  ``scripts/flwr_run.sh`` (exit 2, before Flower starts; slow tier).
- ``benchmarks/bench_gpu.py``: its answer without CUDA, its refusals, and its code path at
  tiny shapes on the CPU with Flower hidden.

Tensors on devices and bf16 numerics: ``tests/training/test_device_tensors.py``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import adc_flwr.data
from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.run.validation import validate_run
from adc_flwr.training.device import check_precision, client_device, resolve_device
from tests.support.helpers import flwr_run_env

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


# ---- resolving `device` -----------------------------------------------------------------------


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_picks_cuda_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"'device' = 'cuda:2': this machine has 2 CUDA dev"):
        resolve_device("cuda:2")


def test_auto_is_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as err:
            resolve_device(spec)
        assert f"run-config key 'device' = {spec!r}: no CUDA device" in str(err.value)
        assert "allowed values are auto, cpu, cuda, cuda:N" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"), [("device", "gpu"), ("device", "cuda:"), ("precision", "fp16")]
)
def test_spelling_is_checked_by_the_config(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"run-config key '{key}' = '{value}': allowed values"):
        RunConfig.from_run_config({key: value})


@NO_CUDA
def test_validate_run_refuses_a_gpu_that_is_not_there() -> None:
    # RunConfig accepts the spelling (ClientApps rebuild it where Ray may hide GPUs) ...
    assert RunConfig.from_run_config({"device": "cuda"}).device == "cuda"
    # ... validate_run, which the launcher and the sweep runner call first, refuses it
    with pytest.raises(ConfigError, match="run-config key 'device' = 'cuda': no CUDA device"):
        validate_run({"dataset": "digits", "device": "cuda"})


def test_bf16_on_a_gpu_without_bfloat16_is_refused_first(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_a, **_k: False)

    def never(*_a: Any, **_k: Any) -> None:
        raise AssertionError("validate_run loaded the data before checking the precision")

    monkeypatch.setattr(adc_flwr.data, "load_data", never)
    for device in ("auto", "cuda", "cuda:0"):
        with pytest.raises(ConfigError) as err:
            validate_run({"dataset": "digits", "device": device, "precision": "bf16"})
        assert str(err.value).startswith("run-config key 'precision' = 'bf16': the CUDA device")
        assert "does not support bfloat16; allowed values are fp32, bf16" in str(err.value)
    # fp32 on that GPU, bf16 on the CPU, and bf16 on a GPU with bfloat16 pass
    check_precision(torch.device("cuda", 0), "fp32")
    check_precision(torch.device("cpu"), "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_a, **_k: True)
    check_precision(torch.device("cuda", 0), "bf16")


@NO_CUDA
@pytest.mark.slow  # the script's refusal path, as in test_launcher's default-suite case
def test_flwr_run_refuses_cuda_before_flower_starts(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [
            "bash",
            "scripts/flwr_run.sh",
            "dataset='digits' method='none' device='cuda:1'",
            "num-supernodes=2 client-resources-num-cpus=1",
        ],
        cwd=ROOT,
        env=flwr_run_env(tmp_path, "gpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "run-config key 'device' = 'cuda:1': no CUDA device" in out
    assert out.count("error:") == 1 and "Traceback" not in out and "SuperLink" not in out
    assert time.monotonic() - started < 60


def _fake_ray(monkeypatch: pytest.MonkeyPatch, mode: str, gpus: list[int]) -> None:
    ray = types.ModuleType("ray")
    ray.WORKER_MODE, ray.SCRIPT_MODE = "worker", "script"
    context = types.SimpleNamespace(
        worker=types.SimpleNamespace(mode=mode), get_accelerator_ids=lambda: {"GPU": gpus}
    )
    ray.is_initialized = lambda: True
    ray.get_runtime_context = lambda: context
    monkeypatch.setitem(sys.modules, "ray", ray)


def test_a_ray_client_follows_the_gpus_ray_gave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 1)
    _fake_ray(monkeypatch, "worker", [0])  # client-resources-num-gpus > 0
    assert client_device("auto") == torch.device("cuda")
    assert client_device("cuda:3") == torch.device("cuda")  # Ray renumbers what it gives
    assert client_device("cpu") == torch.device("cpu")
    _fake_ray(monkeypatch, "worker", [])  # no GPU for this actor, though torch sees one
    assert client_device("auto") == torch.device("cpu")
    _fake_ray(monkeypatch, "script", [])  # the driver (ServerApp): the server's rule
    assert client_device("auto") == torch.device("cuda")


# ---- benchmarks/bench_gpu.py ---------------------------------------------------------------

BENCH = ROOT / "benchmarks" / "bench_gpu.py"
# what the GPU machine lacks: the in-process benchmark must run without them
WITHOUT = (
    "import runpy, sys\n"
    "for m in ('flwr', 'ray', 'flwr_datasets', 'datasets'):\n"
    "    sys.modules[m] = None\n"
)


@NO_CUDA
def test_bench_gpu_without_cuda_says_so_and_exits_0() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout


def test_bench_gpu_cpu_smoke_runs_without_flower(tmp_path: Path) -> None:
    """adc, pq (its byte sizes come from a module without Flower) and BottleNet++ (its encoder
    and decoder must be in the optimizers: the benchmark checks every trainable parameter)."""
    out = tmp_path / "bench.json"
    methods = "adc,pq,bottlenet"
    args = ["--cpu-smoke", "--methods", methods, "--steps", "1", "--warmup", "0", "--out", str(out)]
    script = (
        WITHOUT
        + f"sys.argv = {[str(BENCH), *args]!r}\nrunpy.run_path({str(BENCH)!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    expected = [(m, p) for m in methods.split(",") for p in ("fp32", "bf16")]
    assert [(r["method"], r["precision"]) for r in rows] == expected
    assert all(r["wire"] == "cpu round trip (no flwr)" and r["steps_per_s"] > 0 for r in rows)
    assert "| in-process | adc ξ=0.1 | bf16 |" in proc.stdout


def _bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)
    return bench


def test_bench_gpu_refuses_what_its_shapes_cannot_take(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench(monkeypatch)
    methods = ["none", "adc", "c3sl", "pq", "bottlenet", "topk", "adcx"]
    problems = bench.unfit(bench.FULL, methods, ["fp32", "bf16", "fp16"])
    assert [p.split(":")[0] for p in problems] == [
        "precision 'fp16'",
        "method 'c3sl' at xi=0.1, batch 128",
        "method 'adcx'",
    ]
    assert "must be a multiple of the group size" in problems[1]
    # refused before the first configuration runs (`none` would run first)
    assert bench.main(["--cpu-smoke", "--methods", "none,c3sl"]) == 2
    out, err = capsys.readouterr()
    assert "error: not measurable at vit-cpu, batch 16, xi=0.1" in err and "'c3sl'" in err
    assert "device:" not in out and "in-process" not in out


def test_bench_gpu_flwr_mode_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert bench.main(["--flwr", "--cpu-smoke"]) == 2
    assert "--flwr needs ray" in capsys.readouterr().err
