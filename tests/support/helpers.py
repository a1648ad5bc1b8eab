"""Shared test scaffolding: a tiny digits config and an in-process run of the strategy.

tests/ is a package (pytest puts the repository root first on the path for it), so test
modules import this one as ``from tests.support.helpers import ...``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, RecordDict

from adc_flwr.config import RunConfig
from adc_flwr.run.run_dir import RunDir
from clients import client_app as client_module
from simulations.inprocess_grid import InProcessGrid
from strategies import server_app
from strategies.lifecycle import build_strategy
from strategies.split_strategy import SplitLearningStrategy


def flwr_run_env(out_dir: Path, run_name: str) -> dict[str, str]:
    """The environment ``scripts/flwr_run.sh`` reads, with this interpreter's tools first."""
    return os.environ | {
        "OUT_DIR": str(out_dir),
        "RUN_NAME": run_name,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def tiny_config(tmp_path: Path, **overrides: object) -> RunConfig:
    """A one-round digits run of method ``none`` (about a second on a CPU).

    Overrides take snake_case names (``local_steps=4``) and replace the base values.
    """
    base: dict[str, Any] = {
        "dataset": "digits",
        "method": "none",
        "num-server-rounds": 1,
        "local-steps": 3,
        "batch-size": 16,
        "eval-samples": 64,
        "lr": 1e-3,  # what these tests were tuned with (the default became 2e-3)
        "out-dir": str(tmp_path),
        "run-name": "t",
    }
    return RunConfig.from_run_config(base | {k.replace("_", "-"): v for k, v in overrides.items()})


def train_in_process(
    cfg: RunConfig,
    nodes: int,
    *,
    before_start: Callable[[SplitLearningStrategy], None] | None = None,
    **grid_kwargs: Any,
) -> tuple[SplitLearningStrategy, InProcessGrid]:
    """Build a strategy (no run directory), run all its rounds through an in-process grid.

    ``before_start`` sees the built strategy before the first round (to snapshot weights);
    ``grid_kwargs`` go to :class:`InProcessGrid` (``silent_nodes``, ``before_call``).
    """
    grid = InProcessGrid(client_module.app, nodes, cfg.to_run_config(), **grid_kwargs)
    strategy, arrays = build_strategy(cfg, run_dir=None, progress=lambda _: None)
    if before_start is not None:
        before_start(strategy)
    strategy.sampler.settle_s = 0.0
    strategy.start(grid, arrays, num_rounds=cfg.num_server_rounds, timeout=cfg.step_timeout)
    return strategy, grid


def run_server_app(
    cfg: RunConfig, nodes: int, **grid_kwargs: Any
) -> tuple[dict[str, Any] | None, InProcessGrid]:
    """Run the ServerApp exactly as Flower calls it (``app(grid, context)``) on an in-process
    grid with random node ids; returns the run's ``summary.json`` and the grid.

    Exceptions of the ServerApp propagate, as they do to Flower.
    """
    grid = InProcessGrid(client_module.app, nodes, cfg.to_run_config(), **grid_kwargs)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    server_app.app(grid=grid, context=context)
    return RunDir(cfg.run_dir).read_summary(), grid


def front_copy(strategy: SplitLearningStrategy) -> dict[str, torch.Tensor]:
    """A detached copy of the global front's weights (e.g. for ``before_start``)."""
    return {k: v.detach().clone() for k, v in strategy.client_modules["front"].state_dict().items()}


def front_batch(
    batch: int, tokens: int, hidden: int, classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded stand-in for the front's output: ``h`` (B, n, d), labels (B,) and a
    CLS-attention row (B, n) whose rows sum to one."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, tokens, hidden, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    cls_attn = torch.softmax(torch.randn(batch, tokens, generator=g), dim=-1)
    return h, labels, cls_attn
