"""What a ClientApp builds once per process and reuses for every message it handles.

Ray actors are long-lived, so data, partitions and a model skeleton are cached per process;
the weights themselves always come from the message or ``context.state``, never the cache.
Where every message is a new process (Flower's Deployment Runtime), ``ADC_NODE_CACHE`` keeps
a client's data on the node's disk instead (:mod:`clients.disk_cache`).
The skeleton lives on this process's client device (:func:`adc_flwr.training.device.client_device`:
the GPU Ray gave the actor, if any).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from adc_flwr.compression import Compressor, build_compressor
from adc_flwr.config import RunConfig
from adc_flwr.data import BatchCursor, DataBundle, held_out_split, load_data, run_partitions
from adc_flwr.data.augment import Augment, build_augment
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import ClientFront, build_model, split_vit
from adc_flwr.training.device import client_device, module_device
from adc_flwr.training.modules import (
    client_modules,
    client_parameters,
    load_modules_state,
    load_optimizer_tensors,
    make_optimizer,
)
from adc_flwr.training.workers import ClientWorker, front_forward, step_seed
from clients.disk_cache import ClientData, cached_client_data

AUGMENT_STREAM = 0xA06  # keeps the augmentation's draws apart from every other use of the seed


@dataclass
class ModelSkeleton:
    """A front and compressor whose weights are overwritten on every use."""

    front: ClientFront
    compressor: Compressor
    spec: InputSpec
    augment: Augment | None  # the training forward's (``augment``)

    @property
    def front_device(self) -> torch.device:
        return module_device(self.front)


def model_skeleton(cfg: RunConfig) -> ModelSkeleton:
    """The run's front and compressor, built once per process."""
    return _skeleton(cfg, load_data(cfg.dataset, cfg.data_dir, cfg.classes))


_SKELETONS: dict[RunConfig, ModelSkeleton] = {}  # the last two configs (as lru_cache(2))


def _skeleton(cfg: RunConfig, data: DataBundle) -> ModelSkeleton:
    """:func:`model_skeleton` from a bundle already at hand (a disk-cached one reads only
    the dataset's description: classes, channels, size, mean and std)."""
    if (cached := _SKELETONS.pop(cfg, None)) is None:
        cached = _build_skeleton(cfg, data)
    _SKELETONS[cfg] = cached  # most recent last
    while len(_SKELETONS) > 2:
        del _SKELETONS[next(iter(_SKELETONS))]
    return cached


def _build_skeleton(cfg: RunConfig, data: DataBundle) -> ModelSkeleton:
    vit = build_model(cfg, data)
    front, _ = split_vit(vit, cfg.split_index)
    device = client_device(cfg.device)
    return ModelSkeleton(
        front.to(device),
        build_compressor(cfg, data.num_classes, hidden_size=front.hidden_size).to(device),
        InputSpec.for_model(vit, data, cfg.model),
        build_augment(cfg.augment),
    )


@functools.lru_cache(maxsize=64)
def compressor_for(cfg: RunConfig, compression: float, num_classes: int) -> Compressor:
    """The compressor of a client with its own ξ (``adaptive-compression``; methods without
    learned parts only, so nothing but ξ differs from the run's)."""
    return build_compressor(cfg.replace(compression=compression), num_classes)


@dataclass
class ClientSetup:
    """One client's view: its partition, batch order and a worker factory."""

    cfg: RunConfig
    partition_id: int
    data: DataBundle
    indices: np.ndarray  # what it trains on
    skeleton: ModelSkeleton
    held_out: np.ndarray  # for federated evaluation only (empty when it is off)

    @property
    def cursor_seed(self) -> int:
        return step_seed(self.cfg.seed, self.partition_id)

    @property
    def steps_per_epoch(self) -> int:
        return BatchCursor(self.indices, self.cfg.batch_size, self.cursor_seed).steps_per_epoch

    def batch_indices(self, batch_number: int) -> np.ndarray:
        """Batch ``batch_number`` of this client's endless, seeded stream (random access)."""
        cursor = BatchCursor(
            self.indices, self.cfg.batch_size, self.cursor_seed, position=batch_number
        )
        return cursor.next_batch()

    @torch.no_grad()
    def held_out_activations(
        self, front_state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Federated evaluation: the client's half of the model on its held-out samples,
        uncompressed (the compressor's learned encoder only, as central evaluation does):
        (E, n, d') activations and (E,) labels."""
        sk = self.skeleton
        load_modules_state(client_modules(sk.front, sk.compressor), front_state)
        pixels, _ = sk.spec.batch(self.data.train, self.held_out, sk.front_device)
        sk.front.eval()
        h, _ = front_forward(sk.front, pixels, self.cfg.precision, with_cls_attention=False)
        sk.front.train()
        labels = torch.from_numpy(self.data.train.labels[self.held_out]).long()
        return sk.compressor.eval_client(h).cpu(), labels  # (E, n, d'), (E,) for the wire

    def encode_seed(self, server_round: int, step: int) -> int:
        return step_seed(self.cfg.seed, server_round, self.partition_id, step)

    def augment_seed(self, batch_number: int) -> int:
        """The augmentation of this partition's batch ``batch_number`` (its global count, as
        :meth:`batch_indices`): the same images for the forward, its replay and a resume,
        in every method."""
        return step_seed(AUGMENT_STREAM, self.cfg.seed, self.partition_id, batch_number)

    def worker(
        self,
        front_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, torch.Tensor] | None,
        compression: float | None = None,
    ) -> ClientWorker:
        """A worker holding ``front_state``, with its optimizer restored when given, and
        the compressor for ``compression`` (this client's own ξ; None: the run's)."""
        sk = self.skeleton
        compressor = sk.compressor
        if compression is not None and compression != self.cfg.compression:
            compressor = compressor_for(self.cfg, compression, sk.compressor.num_classes)
        modules = client_modules(sk.front, compressor)
        load_modules_state(modules, front_state)
        optimizer = make_optimizer(client_parameters(modules), self.cfg)
        if optimizer_state is not None:
            load_optimizer_tensors(optimizer, optimizer_state)
        return ClientWorker(
            sk.front,
            compressor,
            optimizer,
            self.data.train,
            sk.spec,
            self.cfg.precision,
            sk.augment,
        )


def client_setup(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientSetup:
    """The cached setup for partition ``partition_id`` of ``num_partitions``."""
    client = cached_client_data(
        cfg, partition_id, num_partitions, lambda: _client_data(cfg, partition_id, num_partitions)
    )
    return ClientSetup(
        cfg,
        partition_id,
        client.data,
        client.indices,
        _skeleton(cfg, client.data),
        client.held_out,
    )


def _client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Partition ``partition_id``'s train and held-out indices, and the dataset."""
    parts = run_partitions(cfg, num_partitions)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} outside 0..{len(parts) - 1}")
    data = load_data(cfg.dataset, cfg.data_dir, cfg.classes)
    train, held_out = parts[partition_id], parts[partition_id][:0]
    if cfg.federated_eval_every:
        train, held_out = held_out_split(train, cfg.federated_eval_fraction, cfg.seed, partition_id)
    return ClientData(data, train, held_out)
