"""The paper's training augmentation (``augment = "paper"``): seeded, per image, leaves the
global RNG alone, and treats grey-scale images as the RGB images they stand for."""

from __future__ import annotations

import pytest
import torch
from kornia.augmentation import ColorJitter
from torch import Tensor, nn

from adc_flwr.config import ConfigError, RunConfig
from adc_flwr.data.augment import RANDAUGMENT_OPS, PaperAugment, _apply, build_augment


def images(batch: int, channels: int = 3, size: int = 8, seed: int = 0) -> Tensor:
    """Seeded noise in [0, 1]: (batch, channels, size, size); no row is mirror-symmetric."""
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


class Tag(nn.Module):
    """A stand-in RandAugment op that adds 2**index to the rows it gets, so the sum of the
    tags on a row says which ops it drew (RandAugment's op interface, no magnitude)."""

    magnitude_range = None
    _factor_name = None

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward_parameters(self, shape: torch.Size, mag: Tensor | None = None) -> dict:
        return {}

    def forward(self, x: Tensor, params: dict) -> Tensor:
        return x + 2.0**self.index


def drawn_ops(aug: PaperAugment, batch: int, seed: int) -> list[tuple[int, ...]]:
    """Which op indices each of ``batch`` rows drew, through the real per-image selection."""
    aug._ops = [(f"tag{i}", None, Tag(i)) for i in range(len(aug._ops))]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tags = aug._randaugment(torch.zeros(batch, 3, 2, 2))[:, 0, 0, 0]  # (batch,)
    return [tuple(i for i in range(len(aug._ops)) if int(t) >> i & 1) for t in tags]


def test_same_seed_same_images_and_another_seed_others() -> None:
    x = images(16)
    aug = PaperAugment()
    first = aug(x, 11)
    assert torch.equal(first, aug(x, 11))
    assert torch.equal(first, PaperAugment()(x, 11))  # a fresh instance (another process)
    assert not torch.equal(first, aug(x, 12))


def test_keeps_shape_dtype_and_range_and_changes_every_image() -> None:
    x = images(32, size=12)  # (32, 3, 12, 12)
    out = PaperAugment()(x, 3)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert all(not torch.equal(o, i) for o, i in zip(out, x, strict=True))
    assert torch.equal(x, images(32, size=12))  # the input is not touched


def test_leaves_the_global_rng_where_it_was() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    PaperAugment()(images(8), 99)
    assert torch.equal(torch.get_rng_state(), before)


def test_ops_are_drawn_per_image() -> None:
    """kornia's RandAugment draws one pair for the whole batch; the paper's torchvision one
    pair per image: every row gets two distinct ops, and the rows get many pairs."""
    pairs = drawn_ops(PaperAugment(), batch=400, seed=1)
    assert all(len(p) == RANDAUGMENT_OPS for p in pairs)
    ops = len(PaperAugment()._ops)
    assert len(set(pairs)) > 50  # of the C(14, 2) = 91 possible
    counts = torch.bincount(torch.tensor([i for p in pairs for i in p]), minlength=ops)
    expected = 400 * RANDAUGMENT_OPS / ops  # 57.1 per op when uniform
    assert int(counts.min()) > expected / 2 and int(counts.max()) < expected * 2
    assert drawn_ops(PaperAugment(), batch=400, seed=1) == pairs  # seeded


def test_identical_images_come_out_different_without_jitter_and_flip() -> None:
    """With the jitter and the flip off, only the RandAugment ops differ between rows."""
    aug = PaperAugment()
    aug._jitter, aug._flip = nn.Identity(), nn.Identity()
    out = aug(images(1).expand(64, -1, -1, -1), 4)  # (64, 3, 8, 8), one image 64 times
    distinct = {tuple(row.flatten().tolist()) for row in out}
    assert len(distinct) > 16


def test_about_half_the_rows_are_flipped() -> None:
    """The flip is the last op: the output with it is, row by row, the output without it
    (same seed, so the same draws before it) or that row mirrored."""
    x = images(400)
    full = PaperAugment()(x, 8)
    unflipped = PaperAugment()
    unflipped._flip = nn.Identity()
    plain = unflipped(x, 8)
    kept = [torch.equal(f, p) for f, p in zip(full, plain, strict=True)]
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(full, plain, strict=True)]
    assert all(k != m for k, m in zip(kept, mirrored, strict=True))  # exactly one of the two
    assert 160 <= sum(mirrored) <= 240  # p = 0.5: 200 +- 4 sigma (sigma = 10)


def test_grey_images_are_augmented_as_three_equal_channels() -> None:
    grey = images(16, channels=1)  # (16, 1, 8, 8)
    aug = PaperAugment()
    out = aug(grey, 21)
    assert out.shape == grey.shape
    rgb = aug(grey.expand(-1, 3, -1, -1).contiguous(), 21)  # (16, 3, 8, 8)
    # every op keeps the channels equal, so folding back to one channel loses nothing
    assert torch.equal(rgb[:, 1], rgb[:, 0]) and torch.equal(rgb[:, 2], rgb[:, 0])
    assert torch.equal(out[:, 0], rgb[:, 0])
    assert not torch.equal(out, grey)


def test_saturation_does_nothing_to_grey_images() -> None:
    """What the docs claim for grey-scale: the saturation ops (the jitter's and RandAugment's
    ``color``) blend an image with its own grey, which for equal channels is the image."""
    rgb = images(32, channels=1).expand(-1, 3, -1, -1).contiguous()  # (32, 3, 8, 8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        jittered = ColorJitter(0.0, 0.0, 0.4, 0.0, p=1.0)(rgb)
        ((name, strength, color),) = [op for op in PaperAugment()._ops if op[0] == "color"]
        coloured = _apply(name, strength, color, rgb)
    torch.testing.assert_close(jittered, rgb, rtol=0, atol=1e-6)
    torch.testing.assert_close(coloured, rgb, rtol=0, atol=1e-6)
    assert not torch.allclose(ColorJitter(0.0, 0.0, 0.4, 0.0, p=1.0)(images(4)), images(4))


def test_the_pool_and_strengths_are_torchvision_s_at_magnitude_9() -> None:
    """The paper's RandAugment is torchvision's: 14 ops (identity among them, no invert or
    solarize-add) at 9/30 of each op's maximum; enhance factors 1 ± 0.27, not kornia's
    0.1 + 1.8 * 9/30 = 0.64 (always darker)."""
    names = [name for name, _, _ in PaperAugment()._ops]
    assert sorted(names) == sorted([
        "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
        "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
        "auto_contrast", "equalize",
    ])  # fmt: skip
    x = images(400, size=8)  # (400, 3, 8, 8)
    ops = {name: (strength, op) for name, strength, op in PaperAugment()._ops}
    strength, brightness = ops["brightness"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = _apply("brightness", strength, brightness, x)
    ratio = out.flatten(1).sum(1) / x.flatten(1).sum(1)  # clipped above at 1: <= the factor
    darker, brighter = int((ratio < 0.8).sum()), int((ratio > 1.05).sum())
    assert darker > 100 and brighter > 100  # both signs, about half each
    assert float(ratio[ratio < 1].min()) == pytest.approx(0.73, abs=1e-3)
    assert ops["rotate"][0] == pytest.approx(9.0) and ops["posterize"][0] == 7.0
    assert ops["translate_x"][0] == pytest.approx(150 / 331 * 0.3)
    assert ops["solarize"][0] == pytest.approx(0.7)


def test_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match="expected"):
        PaperAugment()(torch.rand(2, 2, 8, 8), 0)


def test_build_augment_and_the_config_key() -> None:
    assert build_augment("none") is None
    assert isinstance(build_augment("paper"), PaperAugment)
    assert RunConfig().augment == "none"
    assert RunConfig.from_run_config({"augment": "paper"}).augment == "paper"
    with pytest.raises(ConfigError, match=r"'augment'.*none, paper"):
        RunConfig.from_run_config({"augment": "bogus"})
    with pytest.raises(ValueError, match="'augment'"):
        build_augment("bogus")
