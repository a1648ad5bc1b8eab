"""What one step and one round of a single-client run cost, measured, for the plan.

:mod:`simulations.plan` puts these together per point of an experiment; this module holds
the measurements it rests on:

- the schedule: the engine's bookings for one client, round by round, to where the budget
  (``budget-mb``) or the step cap (``num-server-rounds`` x ``local-steps``) stops it;
- the client's data: its training images and the run's classes, from flags or from the
  dataset where it loads here;
- the model's geometry from its config only, built on the ``meta`` device (no weights): a
  preset, a local folder or ``config.json``, or a hub id in the local cache or the hub;
- the bytes of a step, the run's own rather than an estimate: the point's compressor
  encodes a batch of the model's shape ``(B, n, d)`` (random tensors, on the CPU), the
  packet goes through the real codec (:mod:`adc_flwr.wire.codec`), the server side decodes
  it and its gradients go back through ``compress_grads`` and the codec, exactly as
  :mod:`strategies.step_engine` books them;
- the sync: the codec's record of the client's modules (front and, for learned methods,
  the encoder).

Sizes depend on shapes and on the ranges of integer tensors, not on the values, so the seed
changes none of them (points that differ only in ``seed`` share one measurement).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adc_flwr.config import RunConfig, parse_classes
from simulations.experiments import ExperimentError


class PlanError(ExperimentError):
    """The plan cannot be made: a model or dataset it cannot read, or a point it cannot plan."""


@dataclass(frozen=True)
class DataShape:
    """What the client trains on: its training images and the run's classes."""

    train_size: int
    num_classes: int
    image_size: int = 0  # the dataset's, for presets sized by it; 0: unknown
    num_channels: int = 3


@dataclass(frozen=True)
class StepBytes:
    """One step of ``batch`` samples as :mod:`strategies.step_engine` books it."""

    batch: int
    up_act: int  # activations and side information
    up_targets: int
    down_grad: int

    @property
    def total(self) -> int:
        return self.up_act + self.up_targets + self.down_grad


@dataclass(frozen=True)
class Schedule:
    """Where a run stops: steps, rounds begun, why, and every byte booked until then."""

    steps: int
    rounds: int
    stop_reason: str
    total_bytes: int


# ---- the schedule -----------------------------------------------------------------------


def schedule(
    step_bytes: Sequence[int],
    sync_bytes: int,
    local_steps: int,
    rounds: int,
    budget_mb: float,
) -> Schedule:
    """Follow the engine's bookings for one client whose batch ``i`` (counted over the run)
    costs ``step_bytes[i % len(step_bytes)]`` (an epoch's steps, in order).

    Per round: the front down; steps, the budget checked after each step's gradients (a
    step that spends it is the last, the client then sends its front up); the front up at
    the round's end; no round starts once the budget is spent. ``local_steps`` 0: an epoch.
    """
    epoch = len(step_bytes)
    cum = np.concatenate([[0], np.cumsum(np.asarray(step_bytes, dtype=np.int64))]).tolist()

    def prefix(batches: int) -> int:  # bytes of the run's first ``batches`` batches
        whole, part = divmod(batches, epoch)
        return whole * cum[epoch] + cum[part]

    def spent(total: int) -> bool:  # the engine's test, in its floats
        return budget_mb > 0 and total / 1e6 >= budget_mb

    per_round = local_steps or epoch
    total = batches = 0
    for round_ in range(1, rounds + 1):
        if spent(total):
            return Schedule(batches, round_ - 1, "budget-mb", total)
        total += sync_bytes
        base = total - prefix(batches)  # total after the run's first x batches: base + prefix(x)
        end = batches + per_round
        if spent(base + prefix(end)):  # a step of this round spends it: the first such step
            low, high = batches + 1, end
            while low < high:
                mid = (low + high) // 2
                if spent(base + prefix(mid)):
                    high = mid
                else:
                    low = mid + 1
            return Schedule(low, round_, "budget-mb", base + prefix(low) + sync_bytes)
        batches, total = end, base + prefix(end) + sync_bytes
    return Schedule(batches, rounds, "num-server-rounds", total)


def epoch_batches(train_size: int, batch_size: int) -> list[int]:
    """The batch sizes of one epoch, in order, as the client's cursor draws them."""
    from adc_flwr.data import BatchCursor

    cursor = BatchCursor(np.arange(train_size), batch_size, seed=0)
    return [len(cursor.next_batch()) for _ in range(cursor.steps_per_epoch)]


# ---- the data -----------------------------------------------------------------------------


def data_shape(cfg: RunConfig, train_size: int | None, num_classes: int | None) -> DataShape:
    """The client's data: from the flags where given, else from the dataset itself."""
    if train_size is not None:
        if num_classes is None:
            picked = parse_classes(cfg.classes)
            if not picked:
                raise PlanError(
                    "--train-size needs --num-classes (the run's classes) unless the point "
                    "sets 'classes'"
                )
            num_classes = len(picked)
        return DataShape(train_size, num_classes)
    from adc_flwr.data import DataError, held_out_split, load_data, run_partitions

    try:
        data = load_data(cfg.dataset, cfg.data_dir, cfg.classes)
        train = run_partitions(cfg, 1)[0]
    except (DataError, OSError, ValueError) as exc:
        raise PlanError(
            f"dataset {cfg.dataset!r} does not load here ({exc}); pass --train-size (the "
            "images the client trains on) and --num-classes (the run's classes)"
        ) from None
    if cfg.federated_eval_every:
        train, _ = held_out_split(train, cfg.federated_eval_fraction, cfg.seed, 0)
    return DataShape(
        len(train), num_classes or data.num_classes, data.image_size, data.num_channels
    )


# ---- the model ----------------------------------------------------------------------------


def model_config(source: str) -> Any:
    """A ``ViTConfig`` from a local folder, a ``config.json``, or a hub id (``hf:``) in the
    local cache or, where the hub answers, from it (the config alone, no weights)."""
    from transformers import ViTConfig

    from adc_flwr.hub import hub_unreachable
    from adc_flwr.model.vit import HUB_PREFIX

    if source.startswith(HUB_PREFIX):
        hub_id = source[len(HUB_PREFIX) :].strip()
        try:
            return ViTConfig.from_pretrained(hub_id, local_files_only=True)
        except (OSError, ValueError):
            pass
        stand_in = "pass --model <a local folder or config.json of the same model>"
        if problem := hub_unreachable():
            raise PlanError(
                f"model {source!r}: the hub is unreachable ({problem}) and its config is not "
                f"in the local cache; {stand_in}"
            )
        try:
            return ViTConfig.from_pretrained(hub_id)
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PlanError(
                f"model {source!r}: cannot read its config ({first}); {stand_in}"
            ) from None
    path = Path(source).expanduser()
    if not (path.is_dir() or path.is_file()):
        raise PlanError(f"model {source!r}: no such folder or config.json")
    try:
        return ViTConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise PlanError(f"model {source!r}: not a ViT config: {exc}") from None


def build_meta_vit(cfg: RunConfig, data: DataShape, stand_in: str | None) -> Any:
    """The point's ViT on the ``meta`` device (shapes only): its preset, or the config of
    ``stand_in`` / its checkpoint, with the geometry checks a run makes."""
    from transformers import ViTForImageClassification

    from adc_flwr.model.vit import PRESETS, ModelError, build_vit, model_input_spec

    source = stand_in or cfg.model
    try:
        with torch.device("meta"):
            if source in PRESETS:
                preset_size = PRESETS[source]["image_size"]
                return build_vit(
                    source,
                    num_classes=data.num_classes,
                    image_size=cfg.image_size or preset_size or data.image_size,
                    num_channels=data.num_channels,
                    patch_size=cfg.patch_size,
                )
            config = model_config(source)
            config.num_labels = data.num_classes
            vit = ViTForImageClassification(config)
        model_input_spec(vit)
    except ModelError as exc:
        raise PlanError(f"model {source!r}: {exc}") from None
    patch = vit.config.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    if cfg.patch_size not in (0, patch):
        raise PlanError(
            f"patch-size {cfg.patch_size} disagrees with {source!r}, which uses {patch}"
        )
    return vit


# ---- bytes, measured through the codec ---------------------------------------------------


def measure_step(
    cfg: RunConfig, compressor: Any, batch: int, tokens: int, hidden: int, num_classes: int
) -> StepBytes:
    """Encode a random batch ``(batch, tokens, hidden)`` with the point's compressor, book
    the packet and the gradients that come back as the engine does (through the codec)."""
    from adc_flwr.wire.codec import (
        act_and_target_nbytes,
        grads_to_record,
        packet_to_record,
        record_nbytes,
        record_to_packet,
    )

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(batch, tokens, hidden, generator=gen)  # (B, n, d)
    cls_attn = torch.softmax(torch.randn(batch, tokens, generator=gen), dim=1)  # (B, n)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)  # (B,)
    labels[0] = num_classes - 1  # the widest label: its dtype is the widest a batch needs
    with torch.no_grad():
        packet = compressor.encode(h, labels, cls_attn, seed=0)
    record = packet_to_record(packet, cfg.wire_dtype)
    up_act, up_targets = act_and_target_nbytes(record)
    received = record_to_packet(record)
    decoded, leaves = compressor.server_decode(received.tensors)
    names = list(leaves)
    grads = torch.autograd.grad(
        decoded.float().sum(), [leaves[k] for k in names], allow_unused=True
    )
    sent = {
        k: torch.zeros_like(leaves[k]) if g is None else g
        for k, g in zip(names, grads, strict=True)
    }
    down = record_nbytes(grads_to_record(compressor.compress_grads(sent), cfg.wire_dtype))
    return StepBytes(batch, up_act, up_targets, down)


def measure_epoch(
    cfg: RunConfig,
    compressor: Any,
    batches: Sequence[int],
    tokens: int,
    hidden: int,
    num_classes: int,
    cache: dict[tuple[Any, ...], StepBytes],
) -> dict[int, StepBytes]:
    """Each distinct batch size of an epoch's ``batches``, measured once; ``cache`` carries
    the measurements across points (the seed changes no size, so it is not in the key)."""
    measured: dict[int, StepBytes] = {}
    for batch in sorted(set(batches), reverse=True):
        # the seed changes no size: points that differ only in it share a measurement
        key = (dataclasses.replace(cfg, seed=0), batch, tokens, hidden, num_classes)
        if key not in cache:
            cache[key] = measure_step(cfg, compressor, batch, tokens, hidden, num_classes)
        measured[batch] = cache[key]
    return measured


def sync_nbytes(front: Any, compressor: Any) -> tuple[int, int]:
    """(bytes of the client's modules one way, their parameters): the record a
    ``train.start`` carries down and the last step's reply carries up (the front and, for
    learned methods, the compressor's encoder), from a front in CPU memory."""
    from adc_flwr.training.modules import client_modules, modules_state
    from adc_flwr.wire.codec import record_nbytes, state_to_record

    state = modules_state(client_modules(front, compressor))
    if any(not t.is_floating_point() for t in state.values()):
        raise PlanError("the front holds integer buffers, whose wire size depends on values")
    return record_nbytes(state_to_record(state)), sum(t.numel() for t in state.values())
