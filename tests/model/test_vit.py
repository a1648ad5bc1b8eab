"""build_vit presets / checkpoints and the front/back split."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from adc_flwr.model.vit import (
    PRESETS,
    ClientFront,
    ModelError,
    ServerBack,
    build_vit,
    model_input_spec,
    split_vit,
)


def tiny_vit(seed: int = 0, num_classes: int = 5) -> ViTForImageClassification:
    """vit-cpu on 8×8×1 images: patch 2, 17 tokens, fast enough for every test."""
    return build_vit("vit-cpu", num_classes=num_classes, image_size=8, num_channels=1, seed=seed)


def pixels(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- presets -------------------------------------------------------------------------


def test_vit_cpu_on_fashion_mnist_shapes() -> None:
    vit = build_vit("vit-cpu", num_classes=10, image_size=28, num_channels=1)
    cfg = vit.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 6, 2)
    assert (cfg.intermediate_size, cfg.patch_size) == (128, 7)
    assert cfg.hidden_dropout_prob == 0.0 and cfg.attention_probs_dropout_prob == 0.0
    assert cfg._attn_implementation == "sdpa"
    assert model_input_spec(vit) == (28, 1)
    front, _ = split_vit(vit, 3)
    assert front.num_tokens == 17 and front.hidden_size == 64
    assert vit(torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)


@pytest.mark.parametrize(
    ("model", "hidden", "heads", "mlp"),
    [("deit-tiny", 192, 3, 768), ("deit-small", 384, 6, 1536)],
)
def test_deit_presets_default_to_224(model: str, hidden: int, heads: int, mlp: int) -> None:
    assert PRESETS[model]["hidden_size"] == hidden
    vit = build_vit(model, num_classes=100)
    cfg = vit.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (hidden, heads, mlp)
    assert cfg.num_hidden_layers == 12 and cfg.patch_size == 16
    assert model_input_spec(vit) == (224, 3)
    assert vit.classifier.out_features == 100


@pytest.mark.parametrize(
    ("model", "image_size", "patch"),
    [("vit-cpu", 28, 7), ("vit-cpu", 8, 2), ("vit-cpu", 32, 4), ("vit-cpu", 5, 1),
     ("deit-tiny", 224, 16), ("deit-tiny", 32, 8), ("deit-tiny", 28, 7)],
)  # fmt: skip
def test_automatic_patch_size(model: str, image_size: int, patch: int) -> None:
    vit = build_vit(model, num_classes=3, image_size=image_size, num_channels=1)
    assert vit.config.patch_size == patch
    assert (image_size // patch) ** 2 >= 16


def test_explicit_patch_size_is_kept() -> None:
    assert build_vit("vit-cpu", num_classes=3, image_size=28, patch_size=7).config.patch_size == 7


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"model": "vit-large"}, "model"),
        ({"model": "hf:"}, "model"),
        ({"model": "vit-cpu", "image_size": 0}, "image-size"),
        ({"model": "vit-cpu", "image_size": 3}, "image-size"),
        ({"model": "vit-cpu", "image_size": -1}, "image-size"),
        ({"model": "vit-cpu", "image_size": 28, "patch_size": 5}, "patch-size"),
        ({"model": "vit-cpu", "image_size": 28, "patch_size": -2}, "patch-size"),
    ],
)
def test_bad_choices_name_the_run_config_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ModelError, match=key):
        build_vit(num_classes=3, **kwargs)


def test_unknown_model_lists_the_allowed_values() -> None:
    with pytest.raises(ModelError) as err:
        build_vit("deit-base", num_classes=3, image_size=28)
    for allowed in ("vit-cpu", "deit-tiny", "deit-small", "hf:", "local directory"):
        assert allowed in str(err.value)


def test_patch_size_error_lists_divisors() -> None:
    with pytest.raises(ModelError, match=r"\[1, 2, 4, 7, 14, 28\]"):
        build_vit("vit-cpu", num_classes=3, image_size=28, patch_size=3)


def test_seed_fixes_weights_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_vit(seed=7), tiny_vit(seed=7), tiny_vit(seed=8)
    assert torch.equal(torch.rand(3), expected_next)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vit.embeddings.cls_token"], sc["vit.embeddings.cls_token"])
    assert not torch.equal(sa["classifier.weight"], sc["classifier.weight"])


# ---- checkpoints ---------------------------------------------------------------------


@pytest.fixture
def saved_vit(tmp_path):
    """A tiny checkpoint with 12×12×3 inputs and 4 labels, saved the HF way."""
    config = ViTConfig(
        hidden_size=24, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
        image_size=12, patch_size=3, num_channels=3, num_labels=4, hidden_dropout_prob=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    return tmp_path, ViTForImageClassification.from_pretrained(tmp_path)


def test_local_checkpoint_gets_a_new_head_and_keeps_its_body(saved_vit) -> None:
    path, original = saved_vit
    vit = build_vit(str(path), num_classes=7, num_channels=1, seed=3)
    assert vit.classifier.out_features == 7
    assert model_input_spec(vit) == (12, 3)  # the checkpoint's geometry, not the arguments
    assert vit.config._attn_implementation == "sdpa"
    assert vit.config.hidden_dropout_prob == 0.0  # forced: recomputation must be exact
    ours, theirs = vit.state_dict(), original.state_dict()
    body = [k for k in theirs if not k.startswith("classifier.")]
    assert body and all(torch.equal(ours[k], theirs[k]) for k in body)
    again = build_vit(str(path), num_classes=7, seed=3)
    assert torch.equal(again.classifier.weight, vit.classifier.weight)


def test_local_checkpoint_with_same_classes_keeps_its_head(saved_vit) -> None:
    path, original = saved_vit
    vit = build_vit(str(path), num_classes=4)
    assert torch.equal(vit.classifier.weight, original.classifier.weight)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(vit(x).logits, original.eval()(x).logits, rtol=0, atol=1e-5)


def test_local_checkpoint_with_the_same_class_names_keeps_its_head(saved_vit) -> None:
    path, original = saved_vit
    names = [original.config.id2label[i] for i in range(4)]
    vit = build_vit(str(path), num_classes=4, seed=3, class_names=names)
    assert torch.equal(vit.classifier.weight, original.classifier.weight)
    assert torch.equal(vit.classifier.bias, original.classifier.bias)


def test_local_checkpoint_with_other_class_names_gets_a_new_seeded_head(saved_vit) -> None:
    """Pretrained on some classes, fine-tuned on as many others: the old head would map the
    new labels onto the old classes' weights, so it is re-created, seeded, and the body kept."""
    path, original = saved_vit
    names = ["coat", "shirt", "pullover", "t-shirt"]
    vit = build_vit(str(path), num_classes=4, seed=3, class_names=names)
    assert not torch.equal(vit.classifier.weight, original.classifier.weight)
    assert torch.count_nonzero(vit.classifier.bias) == 0
    assert float(vit.classifier.weight.detach().std()) == pytest.approx(0.02, rel=0.2)  # the init's
    again = build_vit(str(path), num_classes=4, seed=3, class_names=names)
    other = build_vit(str(path), num_classes=4, seed=4, class_names=names)
    assert torch.equal(again.classifier.weight, vit.classifier.weight)
    assert not torch.equal(other.classifier.weight, vit.classifier.weight)
    ours, theirs = vit.state_dict(), original.state_dict()
    body = [k for k in theirs if not k.startswith("classifier")]
    assert body and all(torch.equal(ours[k], theirs[k]) for k in body)
    assert vit.config.id2label == dict(enumerate(names))  # a saved fine-tune names its classes
    assert vit.config.label2id == {n: i for i, n in enumerate(names)}


def test_class_names_must_fit_the_head(saved_vit) -> None:
    path, _ = saved_vit
    with pytest.raises(ModelError, match="3 class names for a head of 4"):
        build_vit(str(path), num_classes=4, class_names=["a", "b", "c"])


def test_local_checkpoint_keeps_its_geometry(saved_vit) -> None:
    path, _ = saved_vit
    # Callers pass the dataset's size; the pipeline resizes to what the checkpoint expects.
    vit = build_vit(str(path), num_classes=4, image_size=28, num_channels=1, patch_size=3)
    assert model_input_spec(vit) == (12, 3) and vit.config.patch_size == 3
    with pytest.raises(ModelError, match="patch-size"):
        build_vit(str(path), num_classes=4, patch_size=4)


def test_directory_without_checkpoint_is_a_model_error(tmp_path) -> None:
    with pytest.raises(ModelError, match="model"):
        build_vit(str(tmp_path), num_classes=4)


def test_unreachable_hub_is_a_short_model_error(monkeypatch) -> None:
    # Offline mode makes the failure immediate instead of minutes of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="unreachable") as err:
        build_vit("hf:adc-flwr-tests/no-such-model", num_classes=10)
    assert "local directory" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)


# ---- split ---------------------------------------------------------------------------


@pytest.mark.parametrize("split_index", [0, 6, -1])
def test_split_index_out_of_range(split_index: int) -> None:
    with pytest.raises(ModelError, match=r"split-index must be in \[1, 5\]"):
        split_vit(tiny_vit(), split_index)


@pytest.mark.parametrize("split_index", [1, 3, 5])
def test_front_and_back_partition_the_parameters(split_index: int) -> None:
    vit = tiny_vit()
    front, back = split_vit(vit, split_index)
    assert isinstance(front, ClientFront) and isinstance(back, ServerBack)
    front_ids = {id(p) for p in front.parameters()}
    back_ids = {id(p) for p in back.parameters()}
    assert not front_ids & back_ids
    assert front_ids | back_ids == {id(p) for p in vit.parameters()}
    assert len(front.layers) == split_index and len(back.layers) == 6 - split_index


@pytest.mark.parametrize("with_cls_attention", [True, False])
@pytest.mark.parametrize("split_index", [1, 4])
def test_front_then_back_equals_the_whole_model(split_index: int, with_cls_attention: bool) -> None:
    vit = tiny_vit()
    front, back = split_vit(vit, split_index)
    x = pixels(6)
    h, cls_attn = front(x, with_cls_attention=with_cls_attention)
    assert h.shape == (6, 17, PRESETS["vit-cpu"]["hidden_size"])
    assert (cls_attn is not None) == with_cls_attention
    torch.testing.assert_close(back(h), vit(x).logits, rtol=0, atol=1e-5)


def test_h_does_not_depend_on_cls_attention() -> None:
    front, _ = split_vit(tiny_vit(), 2)
    x = pixels()
    h_on, _ = front(x, with_cls_attention=True)
    h_off, _ = front(x, with_cls_attention=False)
    assert torch.equal(h_on, h_off)


def test_back_takes_any_token_count() -> None:
    vit = tiny_vit()
    front, back = split_vit(vit, 3)
    h, _ = front(pixels(5))
    for k in (1, 4, 17):
        assert back(h[:, :k]).shape == (5, 5)
    # Only CLS is read after the blocks, but the other tokens still shape it.
    assert not torch.allclose(back(h[:, :1]), back(h))
    with pytest.raises(ValueError):
        back(h[0])


def test_gradients_reach_every_front_parameter_through_h() -> None:
    vit = tiny_vit()
    front, back = split_vit(vit, 2)
    h, cls_attn = front(pixels())
    assert h.requires_grad and not cls_attn.requires_grad
    # The split-learning way: the server returns dL/dh, the client backpropagates it.
    h_server = h.detach().requires_grad_()
    torch.nn.functional.cross_entropy(back(h_server), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in back.parameters())
    assert all(p.grad is None for p in front.parameters())
    torch.autograd.backward([h], [h_server.grad])
    grads = {name: p.grad for name, p in front.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["embeddings.patch_embeddings.projection.weight"].abs().sum() > 0
    assert grads["layers.1.mlp.fc2.weight"].abs().sum() > 0
    assert grads["layers.0.attention.q_proj.weight"].abs().sum() > 0


def test_front_rejects_wrong_image_geometry() -> None:
    front, _ = split_vit(tiny_vit(), 2)
    with pytest.raises(ValueError):
        front(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError):
        front(torch.randn(2, 3, 8, 8))
