"""One validation for every entry point: each bad value is one ConfigError naming the key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from adc_flwr.config import ConfigError
from adc_flwr.model import vit as model
from adc_flwr.run.validation import validate_run
from simulations.preflight import check

DIGITS = {"dataset": "digits", "batch-size": 16}


@pytest.mark.parametrize(
    ("changes", "partitions", "message"),
    [
        ({"compresion": 0.2}, None, "unknown run-config key 'compresion' (did you mean"),
        ({"lr": "fast"}, None, "'lr': expected float, got str 'fast'"),
        ({"method": "adcx"}, None, "'method' = 'adcx': allowed values are adc, bottlenet"),
        ({"split-index": 6}, None, "split-index must be in [1, 5] for a model with 6 blocks"),
        ({"model": "vit-huge"}, None, "model must be one of 'vit-cpu'"),
        ({"dataset": "parquet:/nonexistent"}, None, "/nonexistent does not exist"),
        ({"dataset": "fashion-mnist", "data-dir": "/nonexistent"}, None, "data-dir='/nonexis"),
        ({"method": "c3sl", "c3sl-r": 3}, None, "'batch-size' = 16 must be a multiple of"),
        (
            {"partitioner": "dirichlet", "alpha": 0.01, "min-partition-size": 60},
            20,
            "could not give each of 20 partitions at least min-partition-size=60",
        ),
        ({"partitioner": "iid"}, 5000, "must be in [1, 1437] for 1437 training samples"),
        ({"fraction-train": 0.1, "min-clients": 2}, 10, "'min-clients' = 2: fraction-train=0.1"),
        ({"min-nodes": 5}, 4, "'min-nodes' = 5: only 4 SuperNode(s) will run"),
    ],
)
def test_each_bad_value_is_one_error_naming_its_key(
    changes: dict, partitions: int | None, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_run(DIGITS | changes, num_supernodes=partitions)
    assert message in str(raised.value)


def test_a_valid_config_passes_and_is_returned() -> None:
    cfg = validate_run(DIGITS | {"method": "c3sl", "c3sl-r": 4}, num_supernodes=10)
    assert cfg.method == "c3sl" and cfg.c3sl_r == 4


def test_offline_hub_model_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a network the hub client retries for ~45 s; the probe answers at once."""
    monkeypatch.setattr(model, "hub_unreachable", lambda: "huggingface.co:443: no route")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"hub is unreachable \(huggingface.co:443: no route"):
        validate_run(DIGITS | {"model": "hf:nobody/not-cached-anywhere"})
    assert time.monotonic() - started < 15


def test_preflight_parses_strings_as_flwr_run_does(tmp_path: Path) -> None:
    """The launcher's check reads --run-config / --federation-config like `flwr run`."""
    run_config = "dataset='digits' batch-size=16 method='none'"
    assert check(run_config, "num-supernodes=3", str(tmp_path), "r") == "new"
    with pytest.raises(ConfigError, match="'num-supernodes' = 0"):
        check(run_config, "num-supernodes=0", str(tmp_path), "r")
    with pytest.raises(ConfigError, match="'min-nodes' = 4: only 3"):
        check(f"{run_config} min-nodes=4", "num-supernodes=3", str(tmp_path), "r")
    with pytest.raises(ConfigError, match="'lr' given more than once"):
        check(f"{run_config} lr=0.1 lr=0.2", "num-supernodes=3", str(tmp_path), "r")
