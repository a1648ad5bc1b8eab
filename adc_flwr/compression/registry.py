"""Name -> compressor class. Methods register themselves on import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adc_flwr.compression.base import Compressor

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig

_REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` available as ``method = cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"compressor {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get_compressor_class(method: str) -> type[Compressor]:
    """The class registered as ``method``."""
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ValueError(
            f"method={method!r} is not a known compressor; choose one of {available_methods()}"
        ) from None


def build_compressor(
    cfg: RunConfig, num_classes: int, hidden_size: int | None = None
) -> Compressor:
    """Instantiate the compressor that ``cfg.method`` names, with its parameters from ``cfg``
    (``hidden_size``: the front's output width d, needed by learned methods)."""
    cls = get_compressor_class(cfg.method)
    return cls.from_config(cfg, num_classes, hidden_size=hidden_size)
