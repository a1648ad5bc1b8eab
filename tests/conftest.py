"""Fixtures shared by test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.collect import collect
from simulations.experiments import load_experiment
from simulations.sweep import run_sweep

STUDIES_TINY = Path(__file__).resolve().parent / "support" / "studies_tiny.toml"


@pytest.fixture(scope="session")
def studies_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny sweep with what every study notebook reads (seeds, Dirichlet α, the edge
    mix, federated evaluation, quant with bits, a deadline that cuts clients and one that
    fails every round), collected: the folder of its tables."""
    root = tmp_path_factory.mktemp("studies")
    run_sweep(load_experiment(STUDIES_TINY), results_root=root, progress=lambda _: None)
    collect(root / "studies_tiny")
    return root / "studies_tiny"
