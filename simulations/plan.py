"""What a sweep will send and how long it will train, before it runs, offline.

    python -m simulations.plan paper_deit_cifar100 --model <dir or config.json>
        [--train-size N] [--num-classes C] [--only KEY=VALUE[,VALUE]] [--nodes N] [--csv FILE]

For each point of an experiment: the bytes of one step (activations and side information
up, targets up, gradients down), the model sync of a round (the front's weights, down and
up), the steps until ``budget-mb`` is spent against the step cap (``num-server-rounds`` x
``local-steps``), which of the two stops the run, and its total bytes; then the totals.

The bytes are the run's own, not an estimate: measured through the real codec, and the
steps follow the engine's bookings (:mod:`simulations.step_costs` says how).

The model's geometry comes from its config only (built on the ``meta`` device, no weights):
``--model`` names a local stand-in (a folder holding ``config.json``, e.g. a
``save_pretrained`` copy, or the ``config.json`` itself) where the hub cannot be reached;
presets and local checkpoints need none. The data: the client's training images (one epoch
is that many batches, the last one shorter) and the number of classes come from the dataset
when it loads here (its partition, after ``classes`` and any held-out part), or from
``--train-size`` and ``--num-classes`` when it does not (a hub set offline).

Only runs of one client are planned (``nodes`` = 1 and ``num-partitions`` <= 1, as every
experiment with a budget here): with more, which partition trains when and its size decide
the bytes. The plan assumes the client never drops out (the ``uniform`` profile mix and no
deadline: a note says so otherwise) and a fixed ξ (``adaptive-compression`` is refused).
Exit status: 0, or 2 for an experiment or stand-in the plan cannot read.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adc_flwr.config import RunConfig
from simulations.experiments import Experiment, ExperimentError, Point, load_experiment, select
from simulations.step_costs import (
    PlanError,
    Schedule,
    StepBytes,
    build_meta_vit,
    data_shape,
    epoch_batches,
    measure_epoch,
    schedule,
    sync_nbytes,
)

MAX_ROUNDS = 1_000_000  # rounds followed to find where an unlimited run spends its budget
COLUMNS = (
    "name",
    "method",
    "level",
    "seed",
    "batch_size",
    "step_bytes",
    "step_up_act",
    "step_up_targets",
    "step_down_grad",
    "last_batch",
    "last_step_bytes",
    "steps_per_epoch",
    "sync_bytes",
    "front_params",
    "tokens",
    "hidden",
    "budget_mb",
    "budget_steps",
    "step_cap",
    "steps",
    "rounds",
    "stop_reason",
    "total_bytes",
)


@dataclass(frozen=True)
class PointPlan:
    """One point's plan (the rows of the table and of ``--csv``)."""

    point: Point
    cfg: RunConfig
    tokens: int  # n
    hidden: int  # d
    front_params: int  # the client's trainable parameters (front, and encoder if any)
    full: StepBytes  # a step of batch-size samples
    last: StepBytes | None  # the epoch's last, shorter batch (None: every batch is full)
    steps_per_epoch: int
    sync_bytes: int  # the client's modules one way; a round sends them down and back up
    budget_steps: int | None  # steps until budget-mb is spent, rounds unlimited
    step_cap: int
    planned: Schedule

    @property
    def level(self) -> str:
        """The method's compression setting, as the experiments sweep it."""
        method = self.cfg.method
        if method == "none":
            return "-"
        if method == "c3sl":
            from adc_flwr.compression.c3sl import group_size

            return f"R={group_size(self.cfg.compression, self.cfg.c3sl_r)}"
        if method == "quant" and self.cfg.quant_bits:
            return f"{self.cfg.quant_bits}b"
        return f"{self.cfg.compression:g}"

    def row(self) -> dict[str, Any]:
        return {
            "name": self.point.name,
            "method": self.cfg.method,
            "level": self.level,
            "seed": self.cfg.seed,
            "batch_size": self.full.batch,
            "step_bytes": self.full.total,
            "step_up_act": self.full.up_act,
            "step_up_targets": self.full.up_targets,
            "step_down_grad": self.full.down_grad,
            "last_batch": self.last.batch if self.last else "",
            "last_step_bytes": self.last.total if self.last else "",
            "steps_per_epoch": self.steps_per_epoch,
            "sync_bytes": self.sync_bytes,
            "front_params": self.front_params,
            "tokens": self.tokens,
            "hidden": self.hidden,
            "budget_mb": self.cfg.budget_mb,
            "budget_steps": "" if self.budget_steps is None else self.budget_steps,
            "step_cap": self.step_cap,
            "steps": self.planned.steps,
            "rounds": self.planned.rounds,
            "stop_reason": self.planned.stop_reason,
            "total_bytes": self.planned.total_bytes,
        }


# ---- the plan -----------------------------------------------------------------------------


def _check_plannable(cfg: RunConfig, nodes: int) -> None:
    partitions = cfg.num_partitions or nodes
    if partitions != 1:
        raise PlanError(
            f"{partitions} partitions: the plan covers runs of one client (nodes = 1, "
            "num-partitions <= 1); with more, which partition trains when decides the bytes"
        )
    if cfg.adaptive_compression:
        raise PlanError("adaptive-compression changes ξ as the run goes; the plan needs it off")


def may_drop(cfg: RunConfig) -> bool:
    """Whether the client could drop out or miss a deadline (the plan assumes it never does)."""
    return cfg.profile_mix != "uniform" or bool(cfg.profile_trace) or cfg.deadline_s > 0


def plan_points(
    experiment: Experiment,
    points: Sequence[Point],
    *,
    model: str | None = None,
    train_size: int | None = None,
    num_classes: int | None = None,
    nodes: int | None = None,
) -> list[PointPlan]:
    """The plan of ``points`` (see the module docstring); ``model`` replaces each point's
    model by a local stand-in, ``train_size`` / ``num_classes`` describe the client's data
    where the dataset does not load here."""
    from adc_flwr.compression import build_compressor
    from adc_flwr.model.vit import split_vit

    nodes = nodes or experiment.nodes
    steps_cache: dict[tuple[Any, ...], StepBytes] = {}
    fronts: dict[tuple[Any, ...], Any] = {}  # geometry -> the front, in CPU memory
    plans = []
    for point in points:
        cfg = point.config("results")
        _check_plannable(cfg, nodes)
        data = data_shape(cfg, train_size, num_classes)
        if data.train_size < 1 or data.num_classes < 1:
            raise PlanError(
                f"{point.name}: {data.train_size} train images, {data.num_classes} classes"
            )
        shape = (model or cfg.model, cfg.image_size, cfg.patch_size, cfg.split_index, data)
        if shape not in fronts:  # built once per geometry, its memory then allocated once
            front, _ = split_vit(build_meta_vit(cfg, data, model), cfg.split_index)
            fronts[shape] = front.to_empty(device="cpu").requires_grad_(False)
        front = fronts[shape]
        tokens, hidden = front.num_tokens, front.hidden_size
        try:
            compressor = build_compressor(cfg, data.num_classes, hidden_size=hidden)
        except ValueError as exc:
            raise PlanError(f"{point.name}: {exc}") from None
        sync, params = sync_nbytes(front, compressor)
        batches = epoch_batches(data.train_size, cfg.batch_size)
        measured = measure_epoch(
            cfg, compressor, batches, tokens, hidden, data.num_classes, steps_cache
        )
        per_step = [measured[b].total for b in batches]
        local = cfg.local_steps or len(batches)
        planned = schedule(per_step, sync, cfg.local_steps, cfg.num_server_rounds, cfg.budget_mb)
        budget_steps = None
        if cfg.budget_mb > 0:
            unlimited = schedule(per_step, sync, cfg.local_steps, MAX_ROUNDS, cfg.budget_mb)
            if unlimited.stop_reason == "budget-mb":
                budget_steps = unlimited.steps
        full = measured[batches[0]]
        last = measured[batches[-1]] if batches[-1] != batches[0] else None
        plans.append(
            PointPlan(
                point,
                cfg,
                tokens,
                hidden,
                params,
                full,
                last,
                len(batches),
                sync,
                budget_steps,
                local * cfg.num_server_rounds,
                planned,
            )
        )
    return plans


# ---- output ---------------------------------------------------------------------------------


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.3f}"


def format_plan(experiment: Experiment, plans: Sequence[PointPlan]) -> list[str]:
    """The table a user reads: one line per point, then the geometry and the totals."""
    lines = [
        f"{experiment.name}: {len(plans)} of {len(experiment.points)} points "
        "(bytes as the codec counts them; MB = 1e6 B)",
        f"{'point':<24} {'method':<11} {'level':>6} {'seed':>6} {'B a step':>12} "
        f"{'sync B':>10} {'budget steps':>12} {'step cap':>9} {'steps':>9} "
        f"{'stops on':<17} {'total MB':>14}",
    ]
    for p in plans:
        budget = "-" if p.budget_steps is None else f"{p.budget_steps:,}"
        if p.budget_steps is None and p.cfg.budget_mb > 0:
            budget = "never"
        lines.append(
            f"{p.point.name:<24} {p.cfg.method:<11} {p.level:>6} {p.cfg.seed:>6} "
            f"{p.full.total:>12,} {p.sync_bytes:>10,} {budget:>12} {p.step_cap:>9,} "
            f"{p.planned.steps:>9,} {p.planned.stop_reason:<17} {_mb(p.planned.total_bytes):>14}"
        )
    shapes = dict.fromkeys(
        (p.tokens, p.hidden, p.full.batch, p.last.batch if p.last else None, p.steps_per_epoch)
        for p in plans
    )
    for tokens, hidden, batch, last, epoch in shapes:
        short = f", the last of {last}" if last else ""
        lines.append(
            f"geometry: n = {tokens} tokens of d = {hidden}; an epoch is {epoch} "
            f"step{'s' * (epoch > 1)} of {batch}{short}"
        )
    sizes: dict[str, set[int]] = {}  # method -> its sync sizes (a learned part: several)
    for p in plans:
        sizes.setdefault(p.cfg.method, set()).add(p.sync_bytes)
    syncs: dict[tuple[int, int], list[str]] = {}  # (parameters, bytes) -> who sends them
    for p in plans:
        one = len(sizes[p.cfg.method]) == 1
        who = syncs.setdefault((p.front_params, p.sync_bytes), [])
        name = p.cfg.method if one else f"{p.cfg.method} {p.level}"
        if name not in who:
            who.append(name)
    for (params, sync), who in syncs.items():
        lines.append(
            f"sync: {sync:,} B each way a round ({params:,} client parameters): {', '.join(who)}"
        )
    steps = sum(p.planned.steps for p in plans)
    total = sum(p.planned.total_bytes for p in plans)
    stops = {
        r: sum(p.planned.stop_reason == r for p in plans)
        for r in ("budget-mb", "num-server-rounds")
    }
    lines.append(
        f"total: {len(plans)} points, {steps:,} steps, {_mb(total)} MB; stopped by "
        f"budget-mb {stops['budget-mb']}, num-server-rounds {stops['num-server-rounds']}"
    )
    if any(may_drop(p.cfg) for p in plans):
        lines.append(
            "note: some points' clients may drop out or miss deadlines (profile mix, trace or "
            "deadline-s); the plan assumes they never do"
        )
    return lines


def write_csv(path: str | Path, plans: Sequence[PointPlan]) -> None:
    """One row per point, the columns of :data:`COLUMNS`."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(p.row() for p in plans)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.plan",
        description="Plan an experiment's points offline: bytes a step, steps, what stops each.",
    )
    parser.add_argument("experiment", help="experiment name or path to a TOML file")
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR_OR_CONFIG",
        help="a local stand-in for every point's model: a folder with config.json, or the "
        "config.json (no weights needed)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="images the client trains on, where the dataset does not load here",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="the run's classes (with --train-size)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE[,VALUE]",
        help="plan only matching points (repeatable; name=GLOB matches run names)",
    )
    parser.add_argument("--nodes", type=int, default=None, help="SuperNodes (default: file)")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the plan as CSV")
    return parser


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    """Exit status: 0, or 2 when the experiment, the stand-in or the data cannot be read."""
    parser = _parser()
    args = parser.parse_args(argv)
    for flag in ("train_size", "num_classes", "nodes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.num_classes is not None and args.train_size is None:
        parser.error("--num-classes goes with --train-size")
    try:
        experiment = load_experiment(args.experiment, check_points=False)
        points = select(experiment.points, args.only)
        plans = plan_points(
            experiment,
            points,
            model=args.model,
            train_size=args.train_size,
            num_classes=args.num_classes,
            nodes=args.nodes,
        )
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in format_plan(experiment, plans):
        out(line)
    if args.csv:
        write_csv(args.csv, plans)
        out(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
