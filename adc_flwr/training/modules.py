"""Which modules and parameters each side of the split trains, their optimizers, and their
state as flat tensors (what travels for model sync and through ``context.state``)."""

from __future__ import annotations

import torch
from torch import nn

from adc_flwr.compression import Compressor
from adc_flwr.config import RunConfig
from adc_flwr.model.vit import ClientFront


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names (client and server use the same kind)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def client_modules(front: ClientFront, compressor: Compressor) -> dict[str, nn.Module]:
    """Client-side trainable modules by prefix: ``front`` and, for learned methods, ``encoder``."""
    encoder = compressor.client_module()
    return {"front": front} | ({"encoder": encoder} if encoder is not None else {})


def client_parameters(modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    """What a client's optimizer steps: every parameter of its :func:`client_modules`."""
    return [p for module in modules.values() for p in module.parameters()]


def server_parameters(back: nn.Module, compressor: Compressor) -> list[nn.Parameter]:
    """What the server's optimizer steps: the back's parameters and, for learned methods,
    the compressor's decoder's."""
    decoder = compressor.server_module()
    return [*back.parameters(), *(decoder.parameters() if decoder is not None else ())]


def modules_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """One flat state dict ``<prefix>.<param>`` over several modules (detached copies)."""
    return {
        f"{prefix}.{k}": v.detach().clone()
        for prefix, module in modules.items()
        for k, v in module.state_dict().items()
    }


def load_modules_state(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`modules_state`; every module must be covered exactly."""
    for prefix, module in modules.items():
        part = {
            k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")
        }
        module.load_state_dict(part, strict=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors ``<param index>.<name>``.

    Hyper-parameters are not included: :func:`make_optimizer` rebuilds them from the config.
    Flat tensors travel through ``context.state`` far faster than a pickled state dict.
    """
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is not a tensor: {value!r}")
            flat[f"{index}.{name}"] = value
    return flat


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of :func:`optimizer_tensors` for an optimizer built the same way."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )
