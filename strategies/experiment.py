"""One run of split learning: config -> data, model, strategy -> run directory.

The ServerApp calls :func:`run_experiment` with Flower's grid; tests and in-process sweeps call
it with :class:`strategies.inprocess_grid.InProcessGrid`. It writes ``config.json``,
``metrics.csv`` and ``summary.json``, checkpoints each round and resumes from the checkpoint
when the same run directory is used again; a finished run is not redone.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from adc_flwr.accounting import TrafficLedger
from adc_flwr.channel import build_channel
from adc_flwr.codec import state_to_record
from adc_flwr.compression import build_compressor
from adc_flwr.config import RunConfig
from adc_flwr.data import ImageSplit, load_data
from adc_flwr.model import split_vit
from adc_flwr.results import RunDir, make_summary
from adc_flwr.training import (
    InputSpec,
    ServerWorker,
    build_model,
    client_modules,
    load_modules_state,
    make_optimizer,
    modules_state,
)
from strategies.outcomes import DROP_REASONS
from strategies.split_strategy import SplitLearningStrategy


def build_strategy(
    cfg: RunConfig,
    *,
    run_dir: RunDir | None,
    progress: Callable[[str], None] = print,
) -> tuple[SplitLearningStrategy, ArrayRecord]:
    """The strategy (owning the back) and the initial global client-side weights."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.dataset, cfg.data_dir)
    vit = build_model(cfg, data)
    front, back = split_vit(vit, cfg.split_index)
    compressor = build_compressor(cfg, data.num_classes, hidden_size=front.hidden_size)
    server_params = list(back.parameters())
    if (decoder := compressor.server_module()) is not None:
        server_params += list(decoder.parameters())
    server = ServerWorker(
        back, compressor, make_optimizer(server_params, cfg), channel=build_channel(cfg)
    )
    modules = client_modules(front, compressor)
    strategy = SplitLearningStrategy(
        cfg,
        server,
        modules,
        evaluation_split(data.test, cfg.eval_samples, cfg.seed),
        InputSpec.for_model(vit, data),
        run_dir=run_dir,
        progress=progress,
    )
    return strategy, state_to_record(modules_state(modules))


def evaluation_split(test: ImageSplit, samples: int, seed: int) -> ImageSplit:
    """The central test split, or a seeded random subset of ``eval-samples`` of it."""
    if samples <= 0 or samples >= len(test.labels):
        return test
    idx = np.sort(np.random.default_rng(seed).choice(len(test.labels), samples, replace=False))
    return ImageSplit(test.images[idx], test.labels[idx])


def checkpoint_state(strategy: SplitLearningStrategy, server_round: int) -> dict[str, Any]:
    """Everything the server needs to continue after ``server_round`` as if never stopped.

    Client optimizer moments live in the clients' ``context.state`` and restart on resume.
    """
    decoder = strategy.server.compressor.server_module()
    channel = strategy.server.channel
    return {
        "round": server_round,
        "global_step": strategy.global_step,
        "back": strategy.server.back.state_dict(),
        "decoder": decoder.state_dict() if decoder is not None else {},
        "server_optimizer": strategy.server.optimizer.state_dict(),
        "client_modules": modules_state(strategy.client_modules),
        "ledger": strategy.ledger.state(),
        "batches_done": dict(strategy.batches_done),
        "history": list(strategy.history),
        "sampler_state": list(strategy.sampler_state()),
        "torch_rng": torch.get_rng_state(),
        "channel_rng": None if channel is None else channel.state(),  # noise stream position
        "wall_time_s": strategy.elapsed(),
    }


def restore(strategy: SplitLearningStrategy, state: dict[str, Any]) -> None:
    """Inverse of :func:`checkpoint_state`."""
    strategy.server.back.load_state_dict(state["back"])
    if (decoder := strategy.server.compressor.server_module()) is not None:
        decoder.load_state_dict(state["decoder"])
    strategy.server.optimizer.load_state_dict(state["server_optimizer"])
    load_modules_state(strategy.client_modules, state["client_modules"])
    strategy.ledger = TrafficLedger.from_state(state["ledger"])
    strategy.batches_done = {int(k): int(v) for k, v in state["batches_done"].items()}
    strategy.history = list(state["history"])
    strategy.set_sampler_state(state["sampler_state"])
    torch.set_rng_state(state["torch_rng"])
    if strategy.server.channel is not None and state.get("channel_rng") is not None:
        strategy.server.channel.load_state(state["channel_rng"])
    strategy.start_round = int(state["round"]) + 1
    strategy.global_step = int(state["global_step"])
    strategy.wall_offset = float(state["wall_time_s"])


def run_experiment(
    grid: Grid, cfg: RunConfig, *, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) ``cfg`` on ``grid``; returns the summary written to ``summary.json``."""
    run_dir = RunDir(cfg.run_dir)
    if run_dir.is_finished():
        progress(f"{run_dir.path} already finished; delete it or pick another run-name to rerun")
        return run_dir.read_summary() or {}
    previous = run_dir.read_config()
    if previous is not None and previous != cfg.to_run_config():
        raise ValueError(
            f"{run_dir.path} holds a run with another config; pick another run-name or out-dir"
        )
    run_dir.write_config(cfg.to_run_config())
    strategy, arrays = build_strategy(cfg, run_dir=run_dir, progress=progress)
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None:
        restore(strategy, checkpoint)
        run_dir.truncate_metrics_after(int(checkpoint["round"]))
        arrays = state_to_record(modules_state(strategy.client_modules))
        progress(f"resuming {run_dir.path} after round {checkpoint['round']}")
    strategy.after_round = lambda rnd, _arrays: run_dir.save_checkpoint(
        checkpoint_state(strategy, rnd)
    )
    progress(
        f"run {cfg.resolved_run_name}: {cfg.method} (compression {cfg.compression:g}), "
        f"{cfg.sl_mode}, model {cfg.model} split at {cfg.split_index}, dataset {cfg.dataset} "
        f"({cfg.partitioner}), results in {run_dir.path}"
    )
    started = time.perf_counter()
    try:
        strategy.start(grid, arrays, num_rounds=cfg.num_server_rounds, timeout=cfg.step_timeout)
    except Exception as exc:
        summary = _summary(strategy, "failed", error=f"{type(exc).__name__}: {exc}")
        run_dir.write_summary(summary)
        run_dir.close()
        progress(f"run failed: {summary['error']}")
        traceback.print_exc()
        raise
    summary = _summary(strategy, "completed", stop_reason=strategy.stop_reason)
    run_dir.write_summary(summary)
    run_dir.close()
    progress(
        f"done in {time.perf_counter() - started:.1f} s ({strategy.stop_reason}): "
        f"accuracy {summary['test_accuracy']:.4f}, summary in {run_dir.summary_path}"
    )
    return summary


def _summary(strategy: SplitLearningStrategy, status: str, **extra: Any) -> dict[str, Any]:
    last = strategy.history[-1] if strategy.history else {}
    return make_summary(
        status,
        test_accuracy=last.get("test_accuracy", float("nan")),
        test_loss=last.get("test_loss", float("nan")),
        rounds=len(strategy.history),
        wall_time_s=strategy.elapsed(),
        history=strategy.history,
        drops={
            reason: sum(int(row.get(f"dropped_{reason}", 0)) for row in strategy.history)
            for reason in DROP_REASONS
        },
        **strategy.ledger.total().as_dict(),
        **extra,
    )


__all__ = ["build_strategy", "checkpoint_state", "restore", "run_experiment"]
