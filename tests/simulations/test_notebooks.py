"""The study notebooks run top to bottom on a real tiny sweep's tables and on the shipped ones."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from simulations.studies import SHIPPED

ROOT = Path(__file__).resolve().parents[2]
# notebook -> (the env vars that point it at its tables, the figures it saves, text it prints)
NOTEBOOKS = {
    "accuracy_vs_bandwidth": (
        ("ADC_RESULTS",),
        ("accuracy_vs_mb", "accuracy_vs_time", "accuracy_vs_compression"),
        ("not stopped by the budget", "| point | seeds | final accuracy", "To reach test accuracy"),
    ),
    "non_iid": (
        ("ADC_RESULTS",),
        ("label_distributions", "accuracy_vs_alpha", "client_accuracy_spread"),
        ("| point \\ alpha |", "| count | min | 10% |"),
    ),
    "heterogeneity": (
        ("ADC_RESULTS", "ADC_DEADLINES", "ADC_TRACES"),
        ("accuracy_vs_sim_time", "client_time", "deadlines", "energy"),
        (
            "| point | profile | client_rounds |",
            "| setting | seeds | final accuracy |",
            "| point, links | seeds | final accuracy |",
        ),
    ),
    "paper_pretrained": (
        ("ADC_RESULTS",),
        ("accuracy_vs_xi", "accuracy_vs_mb"),
        ("| regime point | seeds | final accuracy |", "| seeds | steps | mb |"),
    ),
    "privacy": (
        ("ADC_PRIVACY",),
        ("privacy_ssim", "privacy_dcor", "privacy_reconstructions"),
        ("| method | ξ | split | seeds | accuracy |", "with an audit"),
    ),
}
SHIPPED_TABLES = {
    "accuracy_vs_bandwidth": ("paper_comparison",),
    "non_iid": ("non_iid",),
    "heterogeneity": ("edge_mix", "edge_deadlines", "edge_traces"),
    "paper_pretrained": ("paper_pretrained",),
    "privacy": ("privacy",),
}


def execute(name: str, env: dict[str, str], figures: Path, monkeypatch) -> str:
    """Run notebook ``name`` with ``env``, its figures into ``figures``; its printed text."""
    for key, value in {**env, "ADC_FIGURES": str(figures), "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    return "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )


def check(name: str, figures: Path, printed: str) -> None:
    _, pngs, texts = NOTEBOOKS[name]
    for png in pngs:
        assert (figures / f"{png}.png").stat().st_size > 5000, png
    for text in texts:
        assert text in printed, text


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_on_a_tiny_sweep(
    name: str, studies_sweep: Path, tmp_path: Path, monkeypatch
) -> None:
    env = {key: str(studies_sweep) for key in NOTEBOOKS[name][0]}
    printed = execute(name, env, tmp_path, monkeypatch)
    check(name, tmp_path, printed)
    assert "12 runs (11 completed)" in printed  # the failed point is counted, not plotted


@pytest.mark.parametrize("name", sorted(SHIPPED_TABLES))
def test_notebook_runs_on_the_shipped_tables(name: str, tmp_path: Path, monkeypatch) -> None:
    env = {key: "" for key in NOTEBOOKS[name][0]}  # the notebook's own default: SHIPPED
    printed = execute(name, env, tmp_path, monkeypatch)
    check(name, tmp_path, printed)
    for folder in SHIPPED_TABLES[name]:
        assert str(SHIPPED / folder) in printed
