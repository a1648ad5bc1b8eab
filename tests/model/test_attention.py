"""CLS-attention row: exact against the full map, cheap, and invisible to h."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adc_flwr.model.attention import CLSAttentionProbe, cls_attention_row
from adc_flwr.model.vit import build_vit, split_vit

N_TOKENS = 17  # 8×8 images, patch 2: a count no other dimension of the tiny model has


def tiny_vit(seed: int = 0):
    """Tiny vit-cpu with sharpened attention.

    At init (std 0.02) every row is within 1e-3 of uniform, which any wrong formula would
    match to 1e-5; scaling the query and key weights makes the rows peaked (max ~0.3).
    """
    vit = build_vit("vit-cpu", num_classes=5, image_size=8, num_channels=1, seed=seed)
    with torch.no_grad():
        for layer in vit.vit.layers:
            layer.attention.q_proj.weight.mul_(8)
            layer.attention.k_proj.weight.mul_(8)
    return vit


def pixels(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class OpRecorder(TorchDispatchMode):
    """Every aten op run inside, with the shapes of its tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else [out]
        shapes = [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, shapes))
        return out


def full_map_row(q_cls: torch.Tensor, keys: torch.Tensor, heads: int, scaling: float):
    """Reference: build all n queries' (n, n) map, read the CLS row, mean over heads."""
    b, n, d = keys.shape
    q = torch.randn(b, n, d, dtype=torch.float64)
    q[:, 0] = q_cls.double()
    q = q.view(b, n, heads, -1).transpose(1, 2)  # (B, h, n, hd)
    k = keys.double().view(b, n, heads, -1).transpose(1, 2)  # (B, h, n, hd)
    full = (q @ k.transpose(-1, -2) * scaling).softmax(-1)  # (B, h, n, n)
    return full[:, :, 0].mean(1)  # (B, n)


def test_row_matches_the_full_map_and_sums_to_one() -> None:
    g = torch.Generator().manual_seed(0)
    q_cls, keys = torch.randn(5, 24, generator=g) * 3, torch.randn(5, 11, 24, generator=g) * 3
    row = cls_attention_row(q_cls, keys, num_heads=4, scaling=6**-0.5)
    assert row.shape == (5, 11) and row.dtype == torch.float32
    ref = full_map_row(q_cls, keys, 4, 6**-0.5)
    torch.testing.assert_close(row.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(row.sum(-1), torch.ones(5), rtol=0, atol=1e-6)
    # Heads are averaged after each head's own softmax, not one softmax over summed logits.
    one_head = cls_attention_row(q_cls, keys, num_heads=1, scaling=6**-0.5)
    assert not torch.allclose(one_head, row, atol=1e-3)


def test_row_is_float32_and_detached_for_half_inputs() -> None:
    q_cls = torch.randn(2, 8, requires_grad=True)
    keys = torch.randn(2, 5, 8, requires_grad=True)
    row = cls_attention_row(q_cls.bfloat16(), keys.bfloat16(), num_heads=2, scaling=0.5)
    assert row.dtype == torch.float32 and not row.requires_grad
    with pytest.raises(ValueError):
        cls_attention_row(q_cls, keys, num_heads=3, scaling=0.5)
    with pytest.raises(ValueError):
        cls_attention_row(q_cls[:1], keys, num_heads=2, scaling=0.5)


@pytest.mark.parametrize("split_index", [1, 3, 5])
def test_front_row_equals_eager_attention_of_the_last_client_block(split_index: int) -> None:
    vit = tiny_vit(seed=split_index)
    front, _ = split_vit(vit, split_index)
    x = pixels()
    _, cls_attn = front(x)
    # HF's eager kernel materialises the (B, heads, n, n) map; read its CLS row.
    eager = copy.deepcopy(vit)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = eager.vit(x, output_attentions=True).attentions
    expected = maps[split_index - 1][:, :, 0, :].mean(dim=1)  # (B, n)
    assert cls_attn.shape == (4, N_TOKENS) and cls_attn.dtype == torch.float32
    assert not cls_attn.requires_grad
    torch.testing.assert_close(cls_attn, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(cls_attn.sum(-1), torch.ones(4), rtol=0, atol=1e-5)
    assert cls_attn.max() > 0.15  # far from uniform (1/17), so the comparison has teeth
    # Another block's row differs, so the check above really pins the last client block.
    other = maps[split_index % 6][:, :, 0, :].mean(dim=1)
    assert not torch.allclose(cls_attn, other, atol=1e-4)


def test_no_n_by_n_tensor_and_no_extra_projection() -> None:
    front, _ = split_vit(tiny_vit(), 3)
    x = pixels()
    counts = {}
    for flag in (False, True):
        with OpRecorder() as rec:
            front(x, with_cls_attention=flag)
        square = [(op, s) for op, s in rec.ops for shape in s if shape.count(N_TOKENS) >= 2]
        assert not square, square
        counts[flag] = sum(op in ("addmm", "mm", "linear") for op, _ in rec.ops)
    assert counts[True] == counts[False]  # keys and queries are reused, not re-projected


def test_hooks_exist_only_during_the_forward() -> None:
    front, _ = split_vit(tiny_vit(), 2)
    attention = front.layers[-1].attention
    front(pixels())
    assert not attention.q_proj._forward_hooks and not attention.k_proj._forward_hooks
    with pytest.raises(ValueError), CLSAttentionProbe(attention):
        raise ValueError("a failing forward")
    assert not attention.q_proj._forward_hooks and not attention.k_proj._forward_hooks
    copy.deepcopy(front)  # nothing bound to a probe travels with the module


def test_probe_without_a_forward_raises() -> None:
    front, _ = split_vit(tiny_vit(), 2)
    with CLSAttentionProbe(front.layers[-1].attention) as probe:
        pass
    with pytest.raises(RuntimeError):
        probe.row()
    with pytest.raises(TypeError):
        CLSAttentionProbe(front.layers[-1].mlp)


def test_row_follows_the_input() -> None:
    front, _ = split_vit(tiny_vit(), 2)
    x = pixels(2)
    _, a = front(x)
    _, b = front(x.flip(-1))
    assert not torch.allclose(a, b, atol=1e-4)
    _, a_batch = front(torch.cat([x, x.flip(-1)]))
    torch.testing.assert_close(a_batch, torch.cat([a, b]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_is_float32_under_bf16_autocast(dtype: torch.dtype) -> None:
    """``precision = "bf16"`` autocasts the front; the row is still computed in float32 from
    float32 copies of the block's queries and keys (bf16 under autocast), bit for bit as
    without autocast."""
    gen = torch.Generator().manual_seed(2)
    q_cls = (4 * torch.randn(3, 64, generator=gen)).to(dtype)
    keys = (4 * torch.randn(3, N_TOKENS, 64, generator=gen)).to(dtype)
    plain = cls_attention_row(q_cls, keys, num_heads=4, scaling=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        row = cls_attention_row(q_cls, keys, num_heads=4, scaling=0.25)
    assert plain.dtype == row.dtype == torch.float32
    torch.testing.assert_close(row, plain, rtol=0, atol=0)
    front, _ = split_vit(tiny_vit(), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, cls_attn = front(pixels())
    assert cls_attn.dtype == torch.float32
