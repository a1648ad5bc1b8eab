"""One run of split learning: config -> data, model, strategy -> run directory.

The ServerApp calls :func:`run_training` with Flower's grid; tests and in-process sweeps call
it with :class:`simulations.inprocess_grid.InProcessGrid`. It writes ``config.json``,
``metrics.csv`` and ``summary.json``, checkpoints each round and resumes from the checkpoint
when the same run directory is used again; a finished run is not redone.
"""

from __future__ import annotations

import os
import secrets
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from adc_flwr.compression import build_compressor
from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.data import ImageSplit, load_data
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import build_model, split_vit
from adc_flwr.privacy.audit import PrivacyAudit, aux_split, privacy_summary
from adc_flwr.run.files import RunDirError
from adc_flwr.run.inputs import check_inputs, write_inputs
from adc_flwr.run.lock import TOKEN_ENV, RunLock
from adc_flwr.run.resume import (
    FINISHED,
    NEW,
    RESUME,
    check_ours,
    resumable_checkpoint,
    run_state,
)
from adc_flwr.run.run_dir import RunDir
from adc_flwr.run.summary import run_energy, run_summary
from adc_flwr.run.validation import check_in_root, check_out_root, validate_run
from adc_flwr.training.device import resolve_device
from adc_flwr.training.modules import (
    client_modules,
    make_optimizer,
    modules_state,
    server_parameters,
)
from adc_flwr.training.workers import ServerWorker
from adc_flwr.wire.accounting import Traffic
from adc_flwr.wire.channel import build_channel
from adc_flwr.wire.codec import state_to_record
from strategies.split_strategy import SplitLearningStrategy


def build_strategy(
    cfg: RunConfig,
    *,
    run_dir: RunDir | None,
    progress: Callable[[str], None] = print,
) -> tuple[SplitLearningStrategy, ArrayRecord]:
    """The strategy (owning the back) and the initial global client-side weights; with a
    run directory it writes its rows there and checkpoints there after each round.

    The back, the global client-side modules (for central evaluation) and the compressor's
    learned parts live on ``device``; the weights are built on the CPU first, so a seed gives
    the same initial model on every device.
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.classes)
    vit = build_model(cfg, data).to(device)
    front, back = split_vit(vit, cfg.split_index)
    compressor = build_compressor(cfg, data.num_classes, hidden_size=front.hidden_size)
    compressor.to(device)
    server = ServerWorker(
        back,
        compressor,
        make_optimizer(server_parameters(back, compressor), cfg),
        channel=build_channel(cfg),
        precision=cfg.precision,
    )
    modules = client_modules(front, compressor)
    spec = InputSpec.for_model(vit, data, cfg.model)
    test, audit = data.test, None
    if cfg.privacy_eval != "off":  # the attacker's images are not evaluated on
        test, aux = aux_split(data.test, cfg.privacy_aux_samples, cfg.seed)
        audit = PrivacyAudit(cfg, compressor, spec, data.train, aux, vit.config.patch_size)
    strategy = SplitLearningStrategy(
        cfg,
        server,
        modules,
        evaluation_split(test, cfg.eval_samples, cfg.seed),
        spec,
        run_dir=run_dir,
        progress=progress,
        checkpoint=None if run_dir is None else run_dir.save_checkpoint,
        privacy=audit,
    )
    return strategy, state_to_record(modules_state(modules))


def evaluation_split(test: ImageSplit, samples: int, seed: int) -> ImageSplit:
    """The central test split, or a seeded random subset of ``eval-samples`` of it."""
    if samples <= 0 or samples >= len(test.labels):
        return test
    idx = np.sort(np.random.default_rng(seed).choice(len(test.labels), samples, replace=False))
    return ImageSplit(test.images[idx], test.labels[idx])


def run_training(
    grid: Grid, cfg: RunConfig, *, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) ``cfg`` on ``grid``; returns the summary written to ``summary.json``.

    One writer per run directory: one another process holds is refused (:class:`RunLock`),
    unless it is the launcher that started this process. A directory holding another run is
    refused (:func:`run_state`), a damaged one too (:func:`resumable_checkpoint`), and a
    resume whose inputs changed (:func:`check_inputs`), all before anything is written; a
    finished run is not redone; then the config is validated (:func:`validate_run`) and a new
    run's inputs recorded (:func:`write_inputs`). A failure, at start-up or later, writes a
    ``failed`` summary, Ctrl-C an ``interrupted`` one (both resumable), then re-raises.
    """
    check_out_root(cfg)  # before anything is made there
    check_in_root(cfg)  # before anything is read
    check_runtime(grid, cfg)
    run_dir = RunDir(cfg.run_dir)
    check_ours(run_dir)  # someone else's folder: refused before a lock file is made there
    lock = RunLock(run_dir.path)
    launcher = os.environ.get(TOKEN_ENV, "")  # the token of the launcher that started us
    holder = lock.held_elsewhere()
    if holder is not None and not (launcher and holder.token == launcher):
        raise lock.busy()  # another run writes there: touch nothing
    if holder is None:  # no launcher holds it for us: this process is the one writer
        lock.acquire(launcher or f"{os.getpid()}-{secrets.token_hex(8)}")
    try:
        return _run_locked(grid, cfg, run_dir, progress)
    finally:
        lock.release()


def check_runtime(grid: Grid, cfg: RunConfig) -> None:
    """``num-partitions`` belongs to simulations: on the deployment runtime (Flower's
    ``HttpGrid``) each SuperNode is a real client that trains its own data."""
    try:
        from flwr.superlink.grid import HttpGrid  # flwr 1.41's deployment grid
    except ImportError:  # another Flower: its deployment grid is unknown here
        return
    if cfg.pooled and isinstance(grid, HttpGrid):
        raise ConfigError(
            f"run-config key 'num-partitions' = {cfg.num_partitions}: the deployment runtime "
            "trains each SuperNode on its own data; set num-partitions = 0 (simulation only)"
        )


def _run_locked(
    grid: Grid, cfg: RunConfig, run_dir: RunDir, progress: Callable[[str], None]
) -> dict[str, Any]:
    state = run_state(run_dir, cfg.to_run_config())
    if state == FINISHED:
        check_inputs(run_dir, cfg, finished=True)  # a warning at most: nothing is redone
        progress(f"{run_dir.path} already finished; move it away or pick another run-name")
        return run_dir.read_summary() or {}
    if state == RESUME:
        check_inputs(run_dir, cfg)  # an input changed since the run started: refused
    checkpoint = resumable_checkpoint(run_dir) if state == RESUME else None
    if state == NEW:
        run_dir.summary_path.unlink(missing_ok=True)  # a start-up failure's, if any
    run_dir.write_config(cfg.to_run_config())
    strategy = None
    started = time.perf_counter()
    try:
        validate_run(cfg.to_run_config())  # a start-up failure leaves a failed summary
        if state == NEW:
            write_inputs(run_dir, cfg)  # what it reads, for a resume to compare
        strategy, _ = build_strategy(cfg, run_dir=run_dir, progress=progress)
        dropped = run_dir.truncate_metrics_after(int(checkpoint["round"]) if checkpoint else 0)
        if checkpoint is not None:
            strategy.load_state_dict(checkpoint)
            progress(f"resuming {run_dir.path} after round {checkpoint['round']}")
        if dropped:
            progress(f"dropped {dropped} metric row(s) of the unfinished round (redone now)")
        arrays = state_to_record(modules_state(strategy.client_modules))
        progress(
            f"run {cfg.resolved_run_name}: {cfg.method} (compression {cfg.compression:g}), "
            f"{cfg.sl_mode}, model {cfg.model} split at {cfg.split_index}, dataset "
            f"{cfg.dataset} ({cfg.partitioner}), results in {run_dir.path}"
        )
        strategy.start(grid, arrays, num_rounds=cfg.num_server_rounds, timeout=cfg.step_timeout)
    except (Exception, KeyboardInterrupt) as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        status = "interrupted" if interrupted else "failed"
        error = "interrupted (KeyboardInterrupt)" if interrupted else f"{type(exc).__name__}: {exc}"
        if strategy is None:
            summary = run_summary(status, [], Traffic(), None, error=error)
        else:
            summary = _summary(strategy, status, run_dir, error=error)
        progress(f"run {status}: {error}")
        if not interrupted:
            traceback.print_exc()
        try:
            run_dir.write_summary(summary)
            run_dir.close()
        except RunDirError as also:  # a full disk fails the summary too: say both
            progress(f"the {status} summary could not be written either: {also}")
        raise
    summary = _summary(strategy, "completed", run_dir, stop_reason=strategy.stop_reason)
    run_dir.write_summary(summary)
    run_dir.close()
    progress(
        f"done in {time.perf_counter() - started:.1f} s ({strategy.stop_reason}): "
        f"accuracy {summary['test_accuracy']:.4f}, summary in {run_dir.summary_path}"
    )
    return summary


def _summary(
    strategy: SplitLearningStrategy, status: str, run_dir: RunDir, **extra: Any
) -> dict[str, Any]:
    extra.setdefault("sim_time_s", strategy.clients.clock.now)
    if strategy.privacy is not None:
        try:
            extra |= privacy_summary(run_dir.read_privacy())
        except (ValueError, KeyError, OSError) as exc:  # a damaged file: say so, keep the rest
            extra |= privacy_summary(pd.DataFrame(columns=["round", "reference"]))
            extra["privacy_error"] = f"{run_dir.privacy.path} cannot be read: {exc}"
    extra |= run_energy(run_dir)
    extra.setdefault("clients_missed", list(strategy.recorder.missed.values()))
    extra.setdefault("batch_clamped", strategy.clients.batch_clamped)
    return run_summary(
        status, strategy.history, strategy.ledger.total(), strategy.elapsed(), **extra
    )
