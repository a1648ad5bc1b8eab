"""RunConfig: pyproject defaults, type checks and range errors that name the key."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from adc_flwr.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_run_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_keys_and_defaults_match_dataclass() -> None:
    declared = pyproject_run_config()
    assert RunConfig().to_run_config() == declared
    assert RunConfig.from_run_config(declared) == RunConfig()


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'compresion'.*known keys"):
        RunConfig.from_run_config({"compresion": 0.1})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("compression", 0.0, r"'compression'.*\(0, 1\]"),
        ("compression", 1.5, r"'compression'.*\(0, 1\]"),
        ("method", "", "'method'.*empty"),
        ("pooling", "max", "'pooling'.*attention, cls, mean"),
        ("wire-dtype", "int8", "'wire-dtype'.*float32, float16, bfloat16"),
        ("sl-mode", "async", "'sl-mode'.*splitfed, vanilla"),
        ("batch-size", 1, r"'batch-size'.*\[2, inf\)"),
        ("split-index", 0, "'split-index'"),
        ("dataset", "mnist", "'dataset'.*hf:<hub id>"),
        ("snr-db", "10,-10", "'snr-db'"),
        ("snr-db", "loud", "'snr-db'"),
        ("fraction-train", 0.0, "'fraction-train'"),
        ("lr", float("nan"), "'lr'"),
    ],
)
def test_out_of_range_values_name_key_and_range(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config({key: value})


def test_types_are_checked_and_ints_widen_to_floats() -> None:
    with pytest.raises(ConfigError, match=r"'batch-size'.*expected int"):
        RunConfig.from_run_config({"batch-size": "64"})
    with pytest.raises(ConfigError, match=r"'lr'.*expected float"):
        RunConfig.from_run_config({"lr": True})
    cfg = RunConfig.from_run_config({"lr": 1, "batch-size": 32.0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 32 and isinstance(cfg.batch_size, int)


def test_compression_split_defaults_to_square_roots() -> None:
    xb, xt = RunConfig(compression=0.09).compression_split
    assert math.isclose(xb, 0.3) and math.isclose(xt, 0.3)
    cfg = RunConfig.from_run_config({"batch-compression": 0.5, "token-compression": 0.2})
    assert cfg.compression_split == (0.5, 0.2)


def test_batch_and_token_compression_come_together() -> None:
    with pytest.raises(ConfigError, match="batch-compression and token-compression"):
        RunConfig.from_run_config({"batch-compression": 0.5})


def test_snr_range_parsing() -> None:
    assert RunConfig(snr_db="7").snr_range_db == (7.0, 7.0)
    assert RunConfig(snr_db="-10,10").snr_range_db == (-10.0, 10.0)


def test_run_dir_is_absolute_and_named_by_parameters(tmp_path: Path) -> None:
    cfg = RunConfig(out_dir=str(tmp_path), method="none", compression=1.0)
    assert cfg.run_dir == tmp_path / "none-c1-iid-s42"
    assert cfg.replace(run_name="mine").run_dir == tmp_path / "mine"
    with pytest.raises(ConfigError, match="'batch-size'"):
        cfg.replace(batch_size=0)
