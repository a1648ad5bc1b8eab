"""Build a Hugging Face ViT and split it into a client front and a server back.

The model is a plain ``transformers`` ``ViTForImageClassification`` (SDPA attention), so
presets, hub checkpoints and local checkpoints share one code path and one state-dict
layout. ``split_vit`` cuts it after block ``split_index``:

    ClientFront: patch + position embeddings, blocks[:split_index]     -> h (B, n, d)
    ServerBack:  blocks[split_index:], final LayerNorm, classifier(CLS) -> logits (B, C)

The back never assumes n: ViT blocks take any token count, so ADC can send (T, k, d).
Both parts reuse ``vit``'s modules (no copy); deep-copy the model first for independent
parts.

Presets use dropout 0 everywhere (a client must recompute its forward bit for bit from
a saved plan) and LayerNorm eps 1e-6, the value of timm's DeiT/ViT the presets mirror.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import ViTConfig, ViTForImageClassification

from adc_flwr.hub import hub_unreachable
from adc_flwr.model.attention import CLSAttentionProbe

if TYPE_CHECKING:
    from adc_flwr.config import RunConfig
    from adc_flwr.data import DataBundle

__all__ = [
    "PRESETS",
    "ClientFront",
    "ModelError",
    "ServerBack",
    "build_model",
    "build_vit",
    "model_input_spec",
    "split_vit",
]

# image_size 0: the dataset's own size (the caller passes it); patch_size is the largest
# patch the automatic rule may pick (see `_auto_patch_size`).
PRESETS: dict[str, dict[str, int]] = {
    "vit-cpu": {
        # sized for a 2-core CPU: about 3× cheaper per step than width 96 / MLP 384, and it
        # reached the same Fashion-MNIST accuracy after the same number of split steps.
        # Patches of up to 7 px: 28 px images give 16 patches + CLS (17 tokens, not 50 with
        # 4 px), about twice the steps per second and better accuracy in a few minutes
        # (simulations/results/main_job/README.md); 8 px digits keep 2 px patches
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "patch_size": 7,
        "image_size": 0,
    },
    "deit-tiny": {
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "patch_size": 16,
        "image_size": 224,
    },
    "deit-small": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "patch_size": 16,
        "image_size": 224,
    },
}

LAYER_NORM_EPS = 1e-6
MIN_PATCH_GRID = 4  # automatic patch size keeps at least a 4×4 grid (16 patch tokens)
HUB_PREFIX = "hf:"
MODEL_HELP = (
    f"one of {', '.join(repr(p) for p in PRESETS)}, '{HUB_PREFIX}<hub id>' "
    "or a local directory holding a saved ViTForImageClassification"
)


class ModelError(ValueError):
    """Bad model choice or geometry; the message names the run-config key to fix."""


def _auto_patch_size(image_size: int, max_patch: int) -> int:
    """Largest p <= max_patch dividing image_size with a grid of at least 4×4 patches."""
    for p in range(min(max_patch, image_size), 0, -1):
        if image_size % p == 0 and (image_size // p) >= MIN_PATCH_GRID:
            return p
    raise ModelError(
        f"image-size {image_size} is too small: it needs at least a {MIN_PATCH_GRID}×"
        f"{MIN_PATCH_GRID} patch grid, so image-size >= {MIN_PATCH_GRID}"
    )


def _preset_config(
    model: str, *, num_classes: int, image_size: int, num_channels: int, patch_size: int
) -> ViTConfig:
    preset = PRESETS[model]
    if image_size < 0:
        raise ModelError(f"image-size must be >= 0 (0: the preset's own), got {image_size}")
    if image_size == 0:
        image_size = preset["image_size"]
        if image_size == 0:
            raise ModelError(
                f"model {model!r} has no image size of its own: set image-size to the "
                "dataset's (e.g. 28 for fashion-mnist)"
            )
    if patch_size < 0:
        raise ModelError(f"patch-size must be >= 0 (0: automatic), got {patch_size}")
    if patch_size == 0:
        patch_size = _auto_patch_size(image_size, preset["patch_size"])
    elif image_size % patch_size:
        divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
        raise ModelError(
            f"patch-size {patch_size} does not divide image-size {image_size}; "
            f"use 0 (automatic) or one of {divisors}"
        )
    return ViTConfig(
        hidden_size=preset["hidden_size"],
        num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"],
        intermediate_size=preset["intermediate_size"],
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=LAYER_NORM_EPS,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        qkv_bias=True,
        num_labels=num_classes,
        attn_implementation="sdpa",
    )


def _load_pretrained(model: str, *, num_classes: int) -> ViTForImageClassification:
    """from_pretrained with a new head for num_classes; failures become a ModelError."""
    if model.startswith(HUB_PREFIX):
        source = model[len(HUB_PREFIX) :].strip()
        if not source:
            raise ModelError(f"model {model!r} names no hub id; expected {MODEL_HELP}")
    else:
        source = model
    offline = model.startswith(HUB_PREFIX) and not _in_hub_cache(source)
    if offline and (problem := hub_unreachable()):
        raise ModelError(
            f"model {model!r}: the Hugging Face hub is unreachable ({problem}) and the local "
            "cache does not hold it. Save the model once where the hub is reachable "
            "(save_pretrained) and set model to that local directory."
        )
    try:
        vit = ViTForImageClassification.from_pretrained(
            source,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            attn_implementation="sdpa",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    except (OSError, ValueError) as err:
        if model.startswith(HUB_PREFIX):
            raise ModelError(
                f"model {model!r}: cannot load {source!r} from the Hugging Face hub (the hub "
                "is unreachable from here, or the id is wrong or gated). Save the "
                "model once where the hub is reachable (save_pretrained) and set model to "
                f"that local directory. Cause: {err}"
            ) from err
        raise ModelError(
            f"model {model!r}: the directory holds no loadable ViTForImageClassification: {err}"
        ) from err
    return vit


def _match_head(vit: ViTForImageClassification, class_names: list[str]) -> None:
    """A new head (initialised as the model initialises one, from the RNG as seeded) when
    the checkpoint's labels are not ``class_names``; keep it when they are. The config then
    names the run's classes, so a saved fine-tuned model carries them."""
    if len(class_names) != vit.config.num_labels:
        raise ModelError(
            f"{len(class_names)} class names for a head of {vit.config.num_labels} classes"
        )
    ours = {i: str(name) for i, name in enumerate(class_names)}
    theirs = {int(i): str(name) for i, name in (vit.config.id2label or {}).items()}
    if theirs != ours:
        old = vit.classifier
        head = nn.Linear(old.in_features, old.out_features, dtype=old.weight.dtype)
        vit._init_weights(head)
        vit.classifier = head
    vit.config.id2label = ours
    vit.config.label2id = {name: i for i, name in ours.items()}


def _in_hub_cache(source: str) -> bool:
    """Whether the hub checkpoint's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(source, "config.json"), str)


def build_vit(
    model: str,
    *,
    num_classes: int,
    image_size: int = 0,
    num_channels: int = 3,
    patch_size: int = 0,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> ViTForImageClassification:
    """A seeded ViT classifier: a preset (random init) or a saved / hub checkpoint.

    For a checkpoint the image geometry is its own: ``image_size`` and ``num_channels`` are
    ignored (callers pass the dataset's; the data pipeline resizes to ``model_input_spec``),
    a nonzero ``patch_size`` other than the checkpoint's is an error, and only the
    classifier head is re-initialised (from ``seed``): when ``num_classes`` differs, or when
    ``class_names`` (the run's, in label order) differ from the checkpoint's ``id2label``
    (new labels: pretrained on some classes, fine-tuned on others). Either way the model's
    ``id2label`` becomes ``class_names``. The global RNG is left untouched. Returned in
    train mode (dropout is 0, so the mode changes nothing numerically).
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if num_channels < 1:
        raise ModelError(f"num_channels must be >= 1, got {num_channels}")
    is_preset = model in PRESETS
    if is_preset:
        config = _preset_config(
            model,
            num_classes=num_classes,
            image_size=image_size,
            num_channels=num_channels,
            patch_size=patch_size,
        )
    elif not (model.startswith(HUB_PREFIX) or Path(model).is_dir()):
        raise ModelError(f"model must be {MODEL_HELP}; got {model!r}")

    # fork_rng: same seed -> same weights, without shifting the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_preset:
            if class_names is not None:  # a saved preset (pretraining) names its classes
                config.id2label = {i: str(name) for i, name in enumerate(class_names)}
                config.label2id = {name: i for i, name in config.id2label.items()}
            vit = ViTForImageClassification(config)
        else:
            vit = _load_pretrained(model, num_classes=num_classes)
            if class_names is not None:
                _match_head(vit, class_names)

    if not is_preset:
        model_input_spec(vit)  # square inputs only: fail here, not in the data pipeline
        patch = vit.config.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        if patch_size not in (0, patch):
            raise ModelError(
                f"patch-size {patch_size} disagrees with {model!r}, which uses {patch}; "
                "use 0 to take the model's"
            )
    return vit.train()


def build_model(cfg: RunConfig, data: DataBundle) -> ViTForImageClassification:
    """The run's ViT, seeded: a preset sized for ``data`` unless ``image-size`` says otherwise,
    or a hub/local checkpoint. Server and clients build it the same way."""
    preset_size = PRESETS.get(cfg.model, {}).get("image_size", 0)
    return build_vit(
        cfg.model,
        num_classes=data.num_classes,
        image_size=cfg.image_size or preset_size or data.image_size,
        num_channels=data.num_channels,
        patch_size=cfg.patch_size,
        seed=cfg.seed,
        class_names=list(data.class_names),
    )


def model_input_spec(vit: ViTForImageClassification) -> tuple[int, int]:
    """(image_size, num_channels) the model expects, so the data pipeline can match it."""
    size = vit.config.image_size
    if not isinstance(size, int):
        height, width = size
        if height != width:
            raise ModelError(f"only square inputs are supported; the model expects {size}")
        size = height
    return int(size), int(vit.config.num_channels)


def split_vit(vit: ViTForImageClassification, split_index: int) -> tuple[ClientFront, ServerBack]:
    """Cut after block ``split_index``; the parts share ``vit``'s modules, disjointly."""
    layers = vit.vit.layers
    num_layers = len(layers)
    if num_layers < 2:
        raise ModelError(f"the model has {num_layers} block(s): it cannot be split")
    if not 1 <= split_index <= num_layers - 1:
        raise ModelError(
            f"split-index must be in [1, {num_layers - 1}] for a model with {num_layers} "
            f"blocks, got {split_index}"
        )
    front = ClientFront(vit.vit.embeddings, layers[:split_index])
    back = ServerBack(layers[split_index:], vit.vit.layernorm, vit.classifier)
    return front, back


class ClientFront(nn.Module):
    """Embeddings + the first blocks: the client's part of the ViT.

    Attributes:
        num_tokens: n, patch tokens + CLS.
        hidden_size: d.
    """

    def __init__(self, embeddings: nn.Module, layers: nn.ModuleList) -> None:
        super().__init__()
        if len(layers) < 1:
            raise ModelError("split-index must be >= 1: the client needs one block")
        self.embeddings = embeddings
        self.layers = layers
        self.num_tokens: int = int(embeddings.patch_embeddings.num_patches) + 1
        self.hidden_size: int = int(embeddings.cls_token.shape[-1])

    def forward(
        self, pixel_values: Tensor, *, with_cls_attention: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """pixel_values (B, C, H, W) -> h (B, n, d), cls_attn (B, n) float32 detached or None.

        cls_attn is the last block's CLS-query attention over all n keys, mean over heads,
        computed from that block's own projections (no n×n map); h is identical either way.
        """
        weight = self.embeddings.patch_embeddings.projection.weight
        h = self.embeddings(pixel_values.to(weight.dtype))  # (B, n, d)
        *body, last = self.layers
        for layer in body:
            h = layer(h)  # (B, n, d)
        if not with_cls_attention:
            return last(h), None
        with CLSAttentionProbe(last.attention) as probe:
            h = last(h)  # (B, n, d)
        return h, probe.row()  # (B, n)


class ServerBack(nn.Module):
    """The remaining blocks, final LayerNorm and classifier on the CLS token."""

    def __init__(self, layers: nn.ModuleList, layernorm: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layers = layers
        self.layernorm = layernorm
        self.classifier = classifier

    def forward(self, h: Tensor) -> Tensor:
        """h (B', k, d), any k >= 1 tokens with CLS first -> logits (B', C)."""
        if h.dim() != 3 or h.shape[1] < 1:
            raise ValueError(f"h must be (B, k >= 1, d), got {tuple(h.shape)}")
        for layer in self.layers:
            h = layer(h)  # (B', k, d)
        cls = self.layernorm(h[:, 0])  # (B', d): LayerNorm is per token, only CLS is read
        return self.classifier(cls)  # (B', C)
