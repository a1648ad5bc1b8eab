"""What a pretrained checkpoint expects as input: size, mean and std from its image processor.

A hub or local checkpoint (the ``model`` run-config key, not a preset) was trained on
images resized to one size and normalised with fixed statistics (ImageNet's for DeiT);
fine-tuning it on inputs normalised with the new dataset's own statistics shifts every
activation it learned on. So for checkpoints the model input takes ``image_mean``,
``image_std`` and the final size from the checkpoint's image processor
(``AutoImageProcessor.from_pretrained``), read once per process. Only these values are
used: the data pipeline (:func:`adc_flwr.data.to_model_input`) resizes each (square) image
straight to that size, bilinear, where the processor may first resize larger and then
centre-crop (DeiT: 256 then 224), with bicubic resampling.

Every process (server and each client) resolves the same files (a local folder, or the
Hugging Face cache that the model load filled), so all agree. A checkpoint without an
image processor config keeps the dataset's statistics (presets' behaviour), with one
:class:`ImageProcessorWarning` per process naming it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adc_flwr.hub import hub_unreachable
from adc_flwr.model.vit import HUB_PREFIX, PRESETS, ModelError

__all__ = [
    "PROCESSOR_FILE",
    "ImageProcessorWarning",
    "Preprocessing",
    "checkpoint_preprocessing",
    "input_statistics",
]

Stats = tuple[tuple[float, ...], tuple[float, ...]]

PROCESSOR_FILE = "preprocessor_config.json"


class ImageProcessorWarning(UserWarning):
    """A checkpoint has no image processor: its inputs get the dataset's statistics."""


@dataclass(frozen=True)
class Preprocessing:
    """A checkpoint's input convention, in the data pipeline's units.

    Attributes:
        image_size: the square side the processor outputs (its crop when it centre-crops,
            else its resize); None when it neither resizes nor crops (the model's own size).
        mean, std: per channel, for pixels scaled to [0, 1].
        source: the hub id or folder it came from (for messages).
    """

    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


def checkpoint_preprocessing(model: str) -> Preprocessing | None:
    """The image processor's size, mean and std for ``model`` (the run-config key).

    None for presets (their inputs use the dataset's statistics) and for a checkpoint that
    has no image processor config (warned once per process). Cached per process: every
    caller in a process gets the same object, and the hub is asked at most once.
    Raises :class:`ModelError` when the config exists but cannot be used, or when the hub
    cannot be asked and the cache does not say.
    """
    return _resolve(model.strip())


def input_statistics(
    model: str, image_size: int, dataset_mean: tuple[float, ...], dataset_std: tuple[float, ...]
) -> Stats:
    """The mean/std for ``model``'s inputs: its image processor's for a checkpoint, the
    dataset's for a preset or a checkpoint without one. Raises :class:`ModelError` when
    the processor's output size is not ``image_size``, the model's."""
    pre = checkpoint_preprocessing(model) if model else None
    if pre is None:
        return dataset_mean, dataset_std
    if pre.image_size not in (None, image_size):
        raise ModelError(
            f"model {model!r}: its image processor outputs {pre.image_size} px images but the "
            f"model takes {image_size} px"
        )
    return pre.mean, pre.std


@functools.lru_cache(maxsize=8)
def _resolve(model: str) -> Preprocessing | None:
    if model in PRESETS:
        return None
    is_hub = model.startswith(HUB_PREFIX)
    source = model[len(HUB_PREFIX) :].strip() if is_hub else model
    has_config = _hub_has_processor(model, source) if is_hub else _local_has_processor(source)
    if not has_config:
        warnings.warn(
            f"model {model!r} has no image processor ({PROCESSOR_FILE}): its inputs are "
            "normalised with the dataset's mean/std and resized to the model's image size, "
            "not to what the checkpoint was trained with",
            ImageProcessorWarning,
            stacklevel=2,
        )
        return None
    processor = _load_processor(model, source)
    scale = _pixel_scale(processor)
    if getattr(processor, "do_normalize", True):
        mean = _per_channel(getattr(processor, "image_mean", None), model, "image_mean")
        std = _per_channel(getattr(processor, "image_std", None), model, "image_std")
    else:
        mean, std = (0.0,), (1.0,)
    # the processor computes (x * scale - mean) / std on 0..255 pixels; the pipeline works
    # on x / 255, so divide both by 255 * scale (a no-op for the usual scale 1/255)
    factor = 255.0 * scale
    if not all(s > 0 for s in std):
        raise ModelError(f"model {model!r}: its image processor's image_std {std} must be > 0")
    return Preprocessing(
        image_size=_output_side(processor, model),
        mean=tuple(m / factor for m in mean),
        std=tuple(s / factor for s in std),
        source=source,
    )


def _local_has_processor(source: str) -> bool:
    return (Path(source).expanduser() / PROCESSOR_FILE).is_file()


def _hub_has_processor(model: str, source: str) -> bool:
    """Whether the hub checkpoint has an image processor config, fetched into the cache.

    The first process to ask (the config check, ``validate_run``) downloads the file into
    the model's cache (the model's ``from_pretrained`` does not fetch it), so later
    processes, offline ones included, find the file (or the hub's "no such file" marker)
    there and decide the same way.
    """
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    cached = huggingface_hub.try_to_load_from_cache(source, PROCESSOR_FILE)
    if isinstance(cached, str):
        return True
    if cached is huggingface_hub._CACHED_NO_EXIST:
        return False
    help_text = (
        f"Save it once where the hub is reachable, model and image processor "
        f"(AutoImageProcessor.from_pretrained({source!r}).save_pretrained(folder)), and set "
        "model to that local folder."
    )
    if problem := hub_unreachable():
        raise ModelError(
            f"model {model!r}: the Hugging Face hub is unreachable ({problem}) and the local "
            f"cache does not say whether it has an image processor. {help_text}"
        )
    try:
        huggingface_hub.hf_hub_download(source, PROCESSOR_FILE)
    except RemoteEntryNotFoundError:
        return False
    except LocalEntryNotFoundError as err:
        raise ModelError(
            f"model {model!r}: hub access is off and the cache does not hold its "
            f"{PROCESSOR_FILE}. {help_text}"
        ) from err
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {model!r}: cannot fetch its image processor ({PROCESSOR_FILE}) from the "
            f"hub: {err}. {help_text}"
        ) from err
    return True


def _load_processor(model: str, source: str) -> Any:
    """``AutoImageProcessor.from_pretrained`` with the PIL backend: the same class and
    values whether or not torchvision is installed (only the values are read)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, backend="pil")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"model {model!r}: its image processor ({PROCESSOR_FILE}) cannot be loaded: {err}"
        ) from err


def _pixel_scale(processor: Any) -> float:
    """What the processor multiplies 0..255 pixels by before normalising."""
    if not getattr(processor, "do_rescale", True):
        return 1.0
    return float(getattr(processor, "rescale_factor", 1 / 255) or 1 / 255)


def _per_channel(values: Any, model: str, name: str) -> tuple[float, ...]:
    if values is None:
        raise ModelError(f"model {model!r}: its image processor normalises but has no {name}")
    return tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))


def _output_side(processor: Any, model: str) -> int | None:
    """The square side of the processor's output: its centre crop when it crops, else the
    size it resizes to (``height``/``width``, ``shortest_edge`` or a plain int)."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        return _square_side(processor.crop_size, model, "crop_size")
    if getattr(processor, "do_resize", False) and getattr(processor, "size", None):
        return _square_side(processor.size, model, "size")
    return None


def _square_side(size: Any, model: str, name: str) -> int:
    if isinstance(size, int):
        return size
    height, width, shortest = (_field(size, k) for k in ("height", "width", "shortest_edge"))
    if height and width:
        if height != width:
            raise ModelError(
                f"model {model!r}: its image processor's {name} is {height}×{width}; only "
                "square inputs are supported"
            )
        return int(height)
    if shortest:
        return int(shortest)
    raise ModelError(
        f"model {model!r}: its image processor's {name} ({size!r}) gives no square size "
        "(expected height = width, or shortest_edge)"
    )


def _field(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
