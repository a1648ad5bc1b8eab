"""privacy-eval through the ServerApp: privacy.csv, the summary, resume, bad config."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.privacy.audit import PrivacyAudit
from adc_flwr.privacy.columns import PRIVACY_COLUMNS
from adc_flwr.run.files import read_arrays
from adc_flwr.run.run_dir import RunDir
from adc_flwr.run.validation import validate_run
from simulations.collect import collect
from strategies.evaluation import Evaluator
from tests.run.test_resume import kill_then_rerun, run
from tests.support.helpers import run_server_app, tiny_config


def config(path: Path, **overrides: object) -> RunConfig:
    base = {
        "method": "adc",
        "compression": 0.25,
        "num_server_rounds": 3,
        "privacy_eval": "every-round",
        "privacy_aux_samples": 100,
        "privacy_epochs": 2,
        "privacy_clients": 2,
    }
    return tiny_config(path, **(base | overrides))


def privacy(cfg: RunConfig) -> pd.DataFrame:
    return RunDir(cfg.run_dir).read_privacy().drop(columns="wall_time_s")


def test_final_audit_through_the_server_app(tmp_path: Path, monkeypatch) -> None:
    cfg = config(tmp_path, privacy_eval="final", num_server_rounds=2)
    evaluated = []
    real = Evaluator.central

    def central(self, *args, **kwargs):
        evaluated.append(len(self.test_split))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "central", central)
    summary, _ = run_server_app(cfg, 3)
    assert summary["status"] == "completed"
    table = RunDir(cfg.run_dir).read_privacy()
    assert list(table.columns) == list(PRIVACY_COLUMNS)
    assert table["round"].tolist() == [2, 2] and table["reference"].tolist() == [
        "merged",
        "best-member",
    ]
    merged = table.iloc[0]
    assert summary["privacy_round"] == 2 and summary["privacy_ssim"] == merged["ssim"]
    assert summary["privacy_dcor_unbiased"] == merged["dcor_unbiased"]
    # ADC: fewer rows than samples (cluster means), and the best member differs from the mean
    assert merged["rows"] < merged["samples"] == 2 * 16
    # eval-samples come from the test images the attacker does not hold
    assert set(evaluated) == {64}
    # collect: the tidy privacy table and the summary's scores in table.csv
    table_csv = collect(tmp_path)
    assert table_csv.loc[0, "privacy_ssim"] == pytest.approx(merged["ssim"])
    tidy = pd.read_parquet(tmp_path / "privacy.parquet")
    assert tidy[["run", "method", "round", "reference"]].values.tolist() == [
        ["t", "adc", 2, "merged"],
        ["t", "adc", 2, "best-member"],
    ]
    assert tidy["ssim"].tolist() == pytest.approx(table["ssim"].tolist())
    images = read_arrays(tmp_path / "privacy_images.npz")
    assert sorted(images) == ["t/best_member", "t/merged", "t/reconstruction"]
    assert images["t/reconstruction"].shape == (6, 1, 8, 8)


def test_off_writes_no_privacy_file(tmp_path: Path) -> None:
    cfg = config(tmp_path, privacy_eval="off", num_server_rounds=1)
    summary, _ = run_server_app(cfg, 2)
    assert summary["status"] == "completed" and "privacy_ssim" not in summary
    assert not (RunDir(cfg.run_dir).path / "privacy.csv").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    cfg = config(tmp_path_factory.mktemp("reference"))
    assert run(cfg)["status"] == "completed"
    return privacy(cfg), RunDir(cfg.run_dir).read_metrics().drop(columns="wall_time_s")


@pytest.mark.parametrize(
    ("cls", "where", "call"),
    [
        (PrivacyAudit, "run", 2),  # round 2's audit, before its checkpoint
        (RunDir, "write_summary", 1),  # after the last audit and checkpoint
    ],
)
def test_killed_audit_resumes_to_the_same_rows(
    tmp_path: Path, monkeypatch, reference, cls: type, where: str, call: int
) -> None:
    cfg = config(tmp_path)
    assert kill_then_rerun(monkeypatch, cfg, cls, where, call)["status"] == "completed"
    pd.testing.assert_frame_equal(privacy(cfg), reference[0])
    metrics = RunDir(cfg.run_dir).read_metrics().drop(columns="wall_time_s")
    pd.testing.assert_frame_equal(metrics, reference[1])


def test_budget_spent_between_rounds_audits_before_the_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    """A budget that round 1's returned fronts cross (not any step): round 1 is the last one,
    audited before its checkpoint; killed after it, the rerun completes with the same rows."""
    reference = config(tmp_path / "reference", privacy_eval="off", num_server_rounds=2)
    run(reference)
    metrics = RunDir(reference.run_dir).read_metrics()
    mb = metrics[["bytes_up_act", "bytes_up_targets", "bytes_down_grad", "bytes_model_sync"]]
    mb = mb.sum(axis=1) / 1e6
    steps, evals = mb[metrics["kind"] == "step"], mb[metrics["kind"] == "eval"]
    round_1 = metrics["round"] == 1
    before, after = steps[round_1].max(), evals[round_1].max()
    assert before < after  # the returned fronts are counted at the round's end
    cfg = config(tmp_path / "run", privacy_eval="final", budget_mb=(before + after) / 2)
    summary = kill_then_rerun(monkeypatch, cfg, RunDir, "write_summary", 1)
    assert summary["status"] == "completed" and summary["stop_reason"] == "budget-mb"
    assert summary["rounds"] == 1 and summary["privacy_round"] == 1
    assert privacy(cfg)["round"].tolist() == [1, 1]


def test_privacy_keys_are_checked_before_anything_runs(tmp_path: Path) -> None:
    base = config(tmp_path).to_run_config()
    with pytest.raises(ConfigError, match="privacy-eval"):
        RunConfig.from_run_config(base | {"privacy-eval": "sometimes"})
    with pytest.raises(ConfigError, match=r"privacy-aux-samples.*allowed range is \[1, 359\]"):
        validate_run(base | {"privacy-aux-samples": 360})  # digits' test split: 360 images
    with pytest.raises(ConfigError, match="privacy-epochs"):
        RunConfig.from_run_config(base | {"privacy-epochs": 0})


def test_planted_pickle_in_the_images_file_is_refused(tmp_path: Path) -> None:
    """privacy_images.npz is data: an object array in it is an error naming the file, and
    nothing in it runs."""
    import numpy as np

    from adc_flwr.run.files import RunDirError

    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    np.savez(run_dir.path / "privacy_images.npz", merged=np.array([object()], dtype=object))
    with pytest.raises(RunDirError, match=r"privacy_images\.npz"):
        run_dir.read_privacy_images()
    (run_dir.path / "privacy_images.npz").write_bytes(b"not a zip")
    with pytest.raises(RunDirError, match=r"privacy_images\.npz"):
        run_dir.read_privacy_images()
    with (run_dir.path / "privacy_images.npz").open("wb") as f:
        np.save(f, np.zeros(3))  # a bare .npy under the name
    with pytest.raises(RunDirError, match=r"privacy_images\.npz"):
        run_dir.read_privacy_images()


def test_a_damaged_privacy_file_at_the_end_is_named_not_fatal(tmp_path: Path, monkeypatch) -> None:
    """The training finished; an unreadable privacy.csv (damaged after the audit wrote it)
    leaves the scores null and says why, instead of losing the summary."""
    cfg = config(tmp_path, privacy_eval="final", num_server_rounds=1)
    real = RunDir.append_privacy

    def append_then_damage(self, server_round, rows):
        real(self, server_round, rows)
        self.privacy.path.write_bytes(b"\xff\xfe not csv")

    monkeypatch.setattr(RunDir, "append_privacy", append_then_damage)
    summary, _ = run_server_app(cfg, 2)
    assert summary["status"] == "completed" and summary["privacy_ssim"] is None
    assert "privacy.csv cannot be read" in summary["privacy_error"]
