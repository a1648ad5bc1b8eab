"""Checkpoints' inputs follow their image processor (adc_flwr/model/preprocessing.py).

Everything is local: tiny checkpoints saved with ``save_pretrained``, a tiny parquet set,
and, for ``hf:`` ids, a Hugging Face cache built in tmp with the hub switched off.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from adc_flwr.config import ConfigError
from adc_flwr.data import load_data, to_model_input
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.preprocessing import (
    PROCESSOR_FILE,
    ImageProcessorWarning,
    Preprocessing,
    _resolve,
    checkpoint_preprocessing,
)
from adc_flwr.model.vit import ModelError, build_vit
from adc_flwr.run.validation import validate_run
from clients.node_cache import client_setup, model_skeleton
from simulations.experiments import load_experiment
from simulations.sweep import run_sweep
from tests.support.helpers import run_server_app, tiny_config, train_in_process
from tests.support.hub_standins import (
    PROCESSOR_MEAN,
    PROCESSOR_STD,
    processor_kwargs,
    save_parquet_images,
    save_tiny_vit,
    solid_colours,
)

SIDE = 32  # the checkpoint's and its processor's size; the parquet images are 20 px


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, the Arrow cache in tmp, and a fresh per-process resolution for each test."""
    import datasets

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    _resolve.cache_clear()
    yield
    _resolve.cache_clear()


@pytest.fixture
def checkpoint(tmp_path: Path) -> str:
    return str(save_tiny_vit(tmp_path / "vit", processor=processor_kwargs(SIDE)))


@pytest.fixture
def bare_checkpoint(tmp_path: Path) -> str:
    return str(save_tiny_vit(tmp_path / "bare"))


@pytest.fixture
def parquet(tmp_path: Path) -> str:
    return save_parquet_images(tmp_path / "pq", side=20)


def expected_pixels(colours: np.ndarray) -> torch.Tensor:
    """What a solid-colour image must become, written out here: (c / 255 - mean) / std at
    SIDE px (a solid colour is unchanged by any resize)."""
    mean, std = np.array(PROCESSOR_MEAN), np.array(PROCESSOR_STD)
    values = (colours.astype(np.float64) / 255.0 - mean) / std  # (B, 3)
    return torch.from_numpy(values).float()[:, :, None, None].expand(-1, -1, SIDE, SIDE)


def write_processor(folder: str, config: dict[str, Any]) -> None:
    (Path(folder) / PROCESSOR_FILE).write_text(json.dumps(config))


# ---- resolution -------------------------------------------------------------------------


def test_checkpoint_takes_its_processor_values_once_per_process(checkpoint: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no transformers chatter
        pre = checkpoint_preprocessing(checkpoint)
    assert pre == Preprocessing(SIDE, PROCESSOR_MEAN, PROCESSOR_STD, checkpoint)
    assert checkpoint_preprocessing(f"  {checkpoint} ") is pre  # cached, however spelled
    assert checkpoint_preprocessing("vit-cpu") is None  # presets: the dataset's statistics


DEIT_LEGACY = {  # facebook/deit-*-patch16-224 style: plain ints, a feature-extractor type
    "feature_extractor_type": "DeiTFeatureExtractor",
    "do_resize": True,
    "size": 36,
    "do_center_crop": True,
    "crop_size": 32,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
}


@pytest.mark.parametrize(
    ("config", "side", "mean", "std"),
    [
        (DEIT_LEGACY, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        (  # height/width resize, then a centre crop: the crop is the input size
            {
                "image_processor_type": "ViTImageProcessor",
                "size": {"height": 40, "width": 40},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "image_mean": 0.5,
                "image_std": 0.25,
            },
            32,
            (0.5,),
            (0.25,),
        ),
        (
            {
                "image_processor_type": "ViTImageProcessor",
                "size": {"shortest_edge": 32},
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.4, 0.5, 0.6],
            },
            32,
            (0.1, 0.2, 0.3),
            (0.4, 0.5, 0.6),
        ),
        (  # statistics in 0..255 units when the processor does not rescale
            {
                "image_processor_type": "ViTImageProcessor",
                "size": {"height": 32, "width": 32},
                "do_rescale": False,
                "image_mean": [25.5, 51.0, 76.5],
                "image_std": [102.0, 127.5, 153.0],
            },
            32,
            (0.1, 0.2, 0.3),
            (0.4, 0.5, 0.6),
        ),
        (  # no normalisation, no resize: pixels in [0, 1] at the model's size
            {
                "image_processor_type": "ViTImageProcessor",
                "do_resize": False,
                "do_normalize": False,
            },
            None,
            (0.0,),
            (1.0,),
        ),
    ],
    ids=["deit-legacy", "crop", "shortest-edge", "no-rescale", "identity"],
)
def test_processor_size_forms(
    bare_checkpoint: str, config: dict, side: int | None, mean: tuple, std: tuple
) -> None:
    write_processor(bare_checkpoint, config)
    pre = checkpoint_preprocessing(bare_checkpoint)
    assert pre is not None and pre.image_size == side
    np.testing.assert_allclose(pre.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(pre.std, std, rtol=1e-9)


def test_processor_size_must_match_the_model(tmp_path: Path, parquet: str) -> None:
    folder = str(save_tiny_vit(tmp_path / "big", processor=processor_kwargs(48)))
    data = load_data(parquet)
    vit = build_vit(folder, num_classes=data.num_classes)
    with pytest.raises(ModelError, match="48 px images but the model takes 32 px"):
        InputSpec.for_model(vit, data, folder)
    with pytest.raises(ValueError, match="needs model="):  # a checkpoint never gets data stats
        InputSpec.for_model(vit, data)
    cfg = tiny_config(tmp_path, model=folder, dataset=parquet, split_index=2)
    with pytest.raises(ConfigError, match="48 px"):  # refused before anything runs
        validate_run(cfg.to_run_config(), num_supernodes=1)


def test_no_processor_falls_back_to_the_dataset_with_one_warning(
    bare_checkpoint: str, parquet: str
) -> None:
    data = load_data(parquet)
    vit = build_vit(bare_checkpoint, num_classes=data.num_classes)
    with pytest.warns(ImageProcessorWarning, match=re.escape(repr(bare_checkpoint))) as caught:
        spec = InputSpec.for_model(vit, data, bare_checkpoint)
        again = InputSpec.for_model(vit, data, bare_checkpoint)
    assert len([w for w in caught if w.category is ImageProcessorWarning]) == 1  # once
    assert spec == again == InputSpec(SIDE, 3, data.mean, data.std)
    assert spec.mean != PROCESSOR_MEAN


def test_broken_processor_config_is_a_model_error(bare_checkpoint: str) -> None:
    write_processor(bare_checkpoint, {"image_processor_type": "NoSuchImageProcessor"})
    with pytest.raises(ModelError, match="cannot be loaded"):
        checkpoint_preprocessing(bare_checkpoint)


def _cache_repo(cache: Path, repo: str, processor: bool) -> None:
    """A hub repo as ``from_pretrained`` leaves it in the cache (one snapshot, refs/main);
    without ``processor`` the hub's "no such file" marker, as a 404 leaves it."""
    rev = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    save_tiny_vit(base / "snapshots" / rev, processor=processor_kwargs(SIDE) if processor else None)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    if not processor:
        marker = base / ".no_exist" / rev / PROCESSOR_FILE
        marker.parent.mkdir(parents=True)
        marker.touch()


def test_hub_ids_resolve_from_the_cache_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _cache_repo(cache, "org/with-processor", processor=True)
    _cache_repo(cache, "org/without", processor=False)
    pre = checkpoint_preprocessing("hf:org/with-processor")
    assert pre == Preprocessing(SIDE, PROCESSOR_MEAN, PROCESSOR_STD, "org/with-processor")
    with pytest.warns(ImageProcessorWarning, match="hf:org/without"):
        assert checkpoint_preprocessing("hf:org/without") is None
    with pytest.raises(ModelError, match=r"cache does not hold its preprocessor_config\.json"):
        checkpoint_preprocessing("hf:org/never-downloaded")


def test_gray_images_take_a_per_model_channel_normalisation() -> None:
    gray = np.array([[[[0, 255], [51, 102]]]], dtype=np.uint8)  # (1, 1, 2, 2)
    x = to_model_input(gray, image_size=2, num_channels=3, mean=PROCESSOR_MEAN, std=PROCESSOR_STD)
    pixels = torch.from_numpy(gray[0, 0]).float() / 255
    for c, (mean, std) in enumerate(zip(PROCESSOR_MEAN, PROCESSOR_STD, strict=True)):
        torch.testing.assert_close(x[0, c], (pixels - mean) / std)


# ---- runs -------------------------------------------------------------------------------


def test_client_and_server_feed_the_model_processor_normalised_pixels(
    tmp_path: Path, checkpoint: str, parquet: str
) -> None:
    """The tensors that reach the front, on a client (training) and on the server (central
    evaluation), are the 20 px images at the processor's 32 px with its mean/std."""
    cfg = tiny_config(
        tmp_path, model=checkpoint, dataset=parquet, split_index=2, batch_size=8, local_steps=2
    )
    client_inputs: list[torch.Tensor] = []
    server_inputs: list[torch.Tensor] = []

    def recorder(into: list[torch.Tensor]) -> Any:
        return lambda _module, args: into.append(args[0].detach().clone())

    # the in-process clients build this very skeleton (cached per process by config)
    model_skeleton(cfg).front.register_forward_pre_hook(recorder(client_inputs))
    strategy, _ = train_in_process(
        cfg,
        nodes=1,
        before_start=lambda s: s.client_modules["front"].register_forward_pre_hook(
            recorder(server_inputs)
        ),
    )
    assert strategy.global_step == cfg.local_steps
    assert client_inputs and server_inputs
    assert load_data(parquet).image_size == 20

    train_colours, _ = solid_colours(60, seed=0)
    first = client_setup(cfg, 0, 1).batch_indices(0)
    torch.testing.assert_close(client_inputs[0], expected_pixels(train_colours[first]))
    test_colours, test_labels = solid_colours(24, seed=1)
    np.testing.assert_array_equal(load_data(parquet).test.labels, test_labels)  # same order
    (evaluated,) = [x for x in server_inputs if x.device.type != "meta"]  # not FLOP counting
    torch.testing.assert_close(evaluated, expected_pixels(test_colours))


def test_a_checkpoint_run_goes_end_to_end(tmp_path: Path, checkpoint: str, parquet: str) -> None:
    cfg = tiny_config(
        tmp_path,
        model=checkpoint,
        dataset=parquet,
        method="adc",
        split_index=2,
        batch_size=16,
        num_server_rounds=2,
        local_steps=2,
        eval_samples=0,
    )
    summary, _ = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed", summary
    assert summary["rounds"] == 2 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert json.loads((Path(cfg.run_dir) / "config.json").read_text())["model"] == checkpoint


def test_the_paper_experiment_runs_offline_on_stand_ins(tmp_path: Path, parquet: str) -> None:
    """paper_deit_cifar100 as users run it (the sweep's own validation and in-process runner),
    with only the downloads replaced: a local checkpoint for the hub DeiT-Tiny, a parquet set
    for CIFAR-100, and a budget two tiny steps spend instead of 10 DeiT epochs. The
    experiment's paper augmentation runs; a ``classes`` subset (2 of the set's 3 classes, in
    another order) is what trains; and the stand-in's head, pretrained on 2 other class
    names, is re-created (seeded) for the run's, as DeiT's ImageNet head is for CIFAR-100."""
    from transformers import ViTForImageClassification

    from adc_flwr.data.augment import PaperAugment
    from adc_flwr.model.vit import split_vit

    experiment = load_experiment("paper_deit_cifar100", check_points=False)
    (point,) = [p for p in experiment.points if p.name == "adc-c0.1-s43422"]
    assert point.run_config["model"].startswith("hf:")
    assert point.run_config["dataset"].startswith("hf:")
    assert point.run_config["augment"] == "paper"
    local = save_tiny_vit(tmp_path / "deit-standin", processor=processor_kwargs(SIDE))
    # pretrained on two classes named "a" and "b": a head of the run's size, other labels
    pretrained = ViTForImageClassification.from_pretrained(
        local, num_labels=2, id2label={0: "a", 1: "b"}, ignore_mismatched_sizes=True
    )
    pretrained.save_pretrained(local)
    overrides = {"model": str(local), "dataset": parquet, "budget-mb": 0.16, "classes": "2,0"}
    stand_in = dataclasses.replace(point, run_config=point.run_config | overrides)
    experiment = dataclasses.replace(experiment, points=[stand_in])
    lines: list[str] = []
    (result,) = run_sweep(experiment, results_root=tmp_path / "results", progress=lines.append)
    assert result.status == "completed", (result.error, lines)
    summary = result.summary
    assert summary["stop_reason"] == "budget-mb"  # the budget, not the step cap, stops it
    steps = summary["history"][-1]["steps"]
    assert 0 < steps < stand_in.run_config["local-steps"]
    run_dir = tmp_path / "results" / "paper_deit_cifar100" / stand_in.name
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["lr"], config["batch-size"], config["split-index"]) == (1e-4, 128, 3)
    assert (config["augment"], config["classes"]) == ("paper", "2,0")
    cfg = stand_in.config(tmp_path / "results" / "paper_deit_cifar100")
    assert isinstance(model_skeleton(cfg).augment, PaperAugment)  # what the client trained with
    # the subset trained: classes 2 and 0 of the set (20 train images each), renumbered 0, 1
    counts = (run_dir / "partitions.csv").read_text().splitlines()
    assert counts[0].split(",")[1:] == ["0", "1", "total"] and counts[1].endswith(",20,20,40")
    # a new head, the seeded one a run builds for classes "c", "a"; the body is the stand-in's
    fresh = build_vit(str(local), num_classes=2, seed=cfg.seed, class_names=["c", "a"])
    assert fresh.config.id2label == {0: "c", 1: "a"}
    _, fresh_back = split_vit(fresh, cfg.split_index)
    _, old_back = split_vit(pretrained, cfg.split_index)
    back = torch.load(run_dir / "checkpoint.pt", weights_only=True)["back"]
    moved = 2 * cfg.lr * steps  # Adam moves a weight by about lr a step
    for key, old in old_back.state_dict().items():
        new = fresh_back.state_dict()[key]
        torch.testing.assert_close(back[key], new, rtol=0, atol=moved)
        if key.startswith("classifier"):  # re-created: nowhere near the pretrained head
            assert key == "classifier.bias" or (back[key] - old).abs().max() > 20 * moved
        else:
            assert torch.equal(new, old)
