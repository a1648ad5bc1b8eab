"""The honest-but-curious server's audit: how well it reconstructs what clients trained on.

After a round (``privacy-eval = every-round``) or after the last one (``final``), the server:

1. passes its auxiliary images (a part of the test split central evaluation does not use)
   through the current global front and the run's compressor, as a client would, and over
   the wire (codec, channel), then decodes them as it decodes packets (``server_decode``);
2. trains an :class:`InversionNet` from those decoded rows to the images they stand for;
3. replays the packets a fixed, seeded set of clients sends for its first batch (their own
   partition, batch order and encoding seed), with the same front, and inverts them.

A decoded row stands for one image, or (ADC) for its cluster's mean image: the reconstruction
is scored against that merged target and against the best-matching sample that went into
the row (:meth:`Compressor.row_sources`), beside the score of always answering the auxiliary
set's mean image. Distance correlation pairs each decoded row with its merged target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from adc_flwr.compression import Compressor
from adc_flwr.config import RunConfig
from adc_flwr.data import ImageSplit, to_model_input
from adc_flwr.data.batches import BatchCursor
from adc_flwr.data.partition import held_out_split, run_partitions
from adc_flwr.model.inputs import InputSpec
from adc_flwr.privacy.columns import REFERENCES
from adc_flwr.privacy.inversion import InversionNet, fit_inversion
from adc_flwr.privacy.metrics import (
    distance_correlation,
    distance_correlation_unbiased,
    image_scores,
)
from adc_flwr.training.device import module_device
from adc_flwr.training.workers import front_forward, step_seed
from adc_flwr.wire.channel import build_channel
from adc_flwr.wire.codec import packet_to_record, record_to_packet

_TAG = 0x9F1D  # separates the audit's draws from every other stream of the run seed
MAX_VIEWS = 8  # passes over the auxiliary set, each in a new order (merging methods)
EXAMPLES = 6  # decoded rows whose images are kept (privacy_images.npz), for figures


class AuditResult(NamedTuple):
    """One audit: ``privacy.csv`` rows (one per reference) and, for the first
    :data:`EXAMPLES` decoded rows, uint8 images ``(m, C, S, S)``: ``merged`` (what each row
    stands for), ``best_member`` and ``reconstruction``."""

    rows: list[dict[str, Any]]
    images: dict[str, np.ndarray]


def aux_split(test: ImageSplit, samples: int, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """(the rest, the attacker's auxiliary set): ``samples`` test images drawn with ``seed``;
    central evaluation then uses only the rest."""
    if not 0 < samples < len(test):
        raise ValueError(f"privacy-aux-samples = {samples}: allowed range is [1, {len(test) - 1}]")
    chosen = np.zeros(len(test), dtype=bool)
    chosen[np.random.default_rng([seed, _TAG]).choice(len(test), samples, replace=False)] = True
    rest, aux = np.flatnonzero(~chosen), np.flatnonzero(chosen)
    return (
        ImageSplit(test.images[rest], test.labels[rest]),
        ImageSplit(test.images[aux], test.labels[aux]),
    )


def victim_batches(cfg: RunConfig, num_partitions: int) -> list[tuple[int, np.ndarray]]:
    """(partition, indices of its first batch) for ``privacy-clients`` partitions drawn with
    the run seed: the batch that client's own seeded stream starts with."""
    rng = np.random.default_rng([cfg.seed, _TAG, num_partitions])
    count = min(cfg.privacy_clients, num_partitions)
    picks = np.sort(rng.choice(num_partitions, count, replace=False))
    parts = run_partitions(cfg, num_partitions)
    out = []
    for p in picks.tolist():
        train = parts[p]
        if cfg.federated_eval_every:  # clients never train on their held-out share
            train, _ = held_out_split(train, cfg.federated_eval_fraction, cfg.seed, p)
        cursor = BatchCursor(train, cfg.batch_size, step_seed(cfg.seed, p))
        out.append((p, cursor.next_batch()))
    return out


@dataclass
class Observation:
    """What the server holds after decoding some batches, and what it stands for."""

    tokens: Tensor  # (R, k, d) decoded rows
    targets: Tensor  # (R, C, S, S) the image each row stands for (merged target)
    images: Tensor  # (N, C, S, S) the samples of those batches
    mixed: Tensor  # (R, N) bool: the samples that went into each row


class PrivacyAudit:
    """Runs the attack of this module's docstring on the current global front."""

    def __init__(
        self,
        cfg: RunConfig,
        compressor: Compressor,
        spec: InputSpec,
        train: ImageSplit,
        aux: ImageSplit,
        patch_size: int,
    ) -> None:
        self.cfg, self.compressor, self.spec = cfg, compressor, spec
        self.train, self.aux, self.patch_size = train, aux, patch_size

    def due(self, server_round: int, *, final: bool) -> bool:
        """Whether to audit after ``server_round`` (``final``: the run's last round)."""
        mode = self.cfg.privacy_eval
        return mode == "every-round" or (mode == "final" and final)

    def run(
        self, modules: dict[str, nn.Module], server_round: int, num_partitions: int
    ) -> AuditResult:
        """The audit after ``server_round``: one row per reference (:data:`REFERENCES`) and
        example images.

        Draws only from generators of its own (the run's RNG state, which checkpoints
        carry, is left as it was), so a resumed run repeats it exactly.
        """
        started = time.perf_counter()
        front = modules["front"]
        device = module_device(front)
        seed = step_seed(self.cfg.seed, server_round, _TAG)
        was_training = front.training
        front.eval()
        try:
            # the run's generators, CUDA's included, are as they were after the audit
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                aux = self._observe_aux(front, server_round)
                victims = self._observe(
                    front,
                    self.train,
                    [
                        (idx, step_seed(self.cfg.seed, server_round, p, 0))
                        for p, idx in victim_batches(self.cfg, num_partitions)
                    ],
                    noise_seed=step_seed(self.cfg.seed, server_round, _TAG, MAX_VIEWS),
                )
                c, s = self.spec.num_channels, self.spec.image_size
                net = InversionNet(
                    aux.tokens.shape[-1],
                    front.num_tokens,
                    image_size=s,
                    patch_size=self.patch_size,
                    channels=c,
                ).to(device)
                gen = torch.Generator().manual_seed(seed)
                fit_loss = fit_inversion(
                    net, aux.tokens, aux.targets, epochs=self.cfg.privacy_epochs, generator=gen
                )
                with torch.no_grad():
                    pred = torch.cat([net(t) for t in victims.tokens.split(256)])
        finally:
            front.train(was_training)
        mean_image = aux.targets.mean(dim=0, keepdim=True).expand_as(pred)
        (attack, best), (baseline, _) = _score(pred, victims), _score(mean_image, victims)
        n = len(victims.tokens)  # too few rows for an estimator: a blank cell, not a failed run
        common = {
            "round": server_round,
            "dcor": distance_correlation(victims.tokens, victims.targets) if n >= 2 else math.nan,
            "dcor_unbiased": (
                distance_correlation_unbiased(victims.tokens, victims.targets)
                if n >= 4
                else math.nan
            ),
            "rows": n,
            "samples": len(victims.images),
            "aux_rows": len(aux.tokens),
            "fit_loss": fit_loss,
            "wall_time_s": time.perf_counter() - started,
        }
        rows = [
            {
                **common,
                "reference": ref,
                **attack[ref],
                **{f"{k}_mean_image": v for k, v in baseline[ref].items()},
            }
            for ref in REFERENCES
        ]
        shown = slice(0, EXAMPLES)
        images = {
            "merged": victims.targets[shown],
            "best_member": victims.images[best[shown]],
            "reconstruction": pred[shown],
        }
        return AuditResult(rows, {k: _to_uint8(v) for k, v in images.items()})

    # ---- what the server sees -----------------------------------------------------------

    def _observe_aux(self, front: nn.Module, server_round: int) -> Observation:
        """The auxiliary set, in up to :data:`MAX_VIEWS` seeded orders: methods that merge a
        batch into fewer rows get as many rows as there are auxiliary images."""
        views: list[Observation] = []
        n, b = len(self.aux), min(self.cfg.batch_size, len(self.aux))
        while not views or (sum(len(v.tokens) for v in views) < n and len(views) < MAX_VIEWS):
            view = len(views)
            order = np.random.default_rng([self.cfg.seed, _TAG, server_round, view]).permutation(n)
            batches = [order[i : i + b] for i in range(0, n, b)]
            if len(batches) > 1 and len(batches[-1]) < 2:  # one sample cannot be clustered
                batches.pop()
            views.append(
                self._observe(
                    front,
                    self.aux,
                    [
                        (idx, step_seed(self.cfg.seed, server_round, _TAG, view, i))
                        for i, idx in enumerate(batches)
                    ],
                    noise_seed=step_seed(self.cfg.seed, server_round, _TAG, view),
                )
            )
        return _concat(views)

    @torch.no_grad()
    def _observe(
        self,
        front: nn.Module,
        split: ImageSplit,
        batches: list[tuple[np.ndarray, int]],
        *,
        noise_seed: int,
    ) -> Observation:
        """Each batch as a client encodes it (with that seed), through the codec and the
        channel, decoded as the server decodes it; with the images each row stands for.
        The channel is a copy with a noise stream of its own (``noise_seed``): the run's
        keeps its position, and no two observations share noise draws."""
        device = module_device(front)
        channel = build_channel(self.cfg, noise_seed)
        parts = []
        for idx, seed in batches:
            pixels, labels = self.spec.batch(split, idx, device)
            h, cls_attn = front_forward(front, pixels, self.cfg.precision, with_cls_attention=True)
            assert cls_attn is not None
            packet = self.compressor.encode(h, labels, cls_attn, seed=seed)
            received = record_to_packet(packet_to_record(packet, self.cfg.wire_dtype), device)
            if channel is not None:
                channel.apply_message_(received.tensors)
            tokens, _ = self.compressor.server_decode(received.tensors)  # (B', k, d)
            images = to_model_input(  # the model's view of the image, in [0, 1]
                split.images[idx],
                image_size=self.spec.image_size,
                num_channels=self.spec.num_channels,
                mean=(0.0,),
                std=(1.0,),
            ).to(device)
            weights, mixed = self.compressor.row_sources(packet, len(idx))  # (B', B)
            targets = torch.einsum("rb,bchw->rchw", weights.to(images), images)
            parts.append(Observation(tokens.float().detach(), targets, images, mixed))
        return _concat(parts)


def privacy_summary(rows: pd.DataFrame) -> dict[str, float | None]:
    """The summary's privacy keys from ``privacy.csv``'s rows: the last audited round's
    scores against the merged target (``privacy_*``) and the best member
    (``privacy_ssim_best_member``); None before any audit."""
    keys = ("mse", "psnr", "ssim", "ssim_mean_image", "dcor", "dcor_unbiased")
    last = rows[rows["round"] == rows["round"].max()] if len(rows) else rows
    merged = last[last["reference"] == REFERENCES[0]]
    best = last[last["reference"] == REFERENCES[1]]
    if merged.empty or best.empty:
        return (
            {"privacy_round": None}
            | {f"privacy_{k}": None for k in keys}
            | {"privacy_ssim_best_member": None}
        )
    return (
        {"privacy_round": int(merged["round"].iloc[0])}
        | {f"privacy_{k}": float(merged[k].iloc[0]) for k in keys}
        | {"privacy_ssim_best_member": float(best["ssim"].iloc[0])}
    )


def _concat(parts: list[Observation]) -> Observation:
    """One observation of several; ``mixed`` becomes block diagonal."""
    mixed = torch.block_diag(*[p.mixed.to(torch.uint8) for p in parts]).bool()
    return Observation(
        torch.cat([p.tokens for p in parts]),
        torch.cat([p.targets for p in parts]),
        torch.cat([p.images for p in parts]),
        mixed,
    )


def _to_uint8(images: Tensor) -> np.ndarray:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _score(pred: Tensor, obs: Observation) -> tuple[dict[str, dict[str, float]], Tensor]:
    """Mean scores of ``pred`` (R, C, S, S) against each row's merged target, and against
    the sample of that row closest to it in squared error (the attacker's best guess at one
    member); and the index of that sample, per row."""
    merged = image_scores(pred, obs.targets)
    # (R, N) squared error of each prediction to every sample; rows only see their members
    errors = torch.cdist(pred.flatten(1).double(), obs.images.flatten(1).double()).pow(2)
    errors = errors.masked_fill(~obs.mixed.to(errors.device), float("inf"))
    closest = errors.argmin(dim=1).to(obs.images.device)  # (R,)
    best = image_scores(pred, obs.images[closest])
    means = {
        ref: {name: float(values.mean()) for name, values in scores.items()}
        for ref, scores in zip(REFERENCES, (merged, best), strict=True)
    }
    return means, closest
