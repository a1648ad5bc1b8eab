"""The notebooks run top to bottom on a real (tiny) sweep's results."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from simulations.sweep import load_experiment, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_vs_bandwidth_notebook_plots_a_sweep(tmp_path: Path, monkeypatch) -> None:
    run_sweep(load_experiment("smoke"), results_root=tmp_path, progress=lambda _: None)
    results = tmp_path / "smoke"
    monkeypatch.setenv("ADC_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    notebook = nbformat.read(ROOT / "notebooks" / "accuracy_vs_bandwidth.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    assert (results / "accuracy_vs_mb.png").stat().st_size > 1000
    assert (results / "accuracy_vs_compression.png").stat().st_size > 1000
    printed = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    assert "2 runs" in printed and "| method" in printed
