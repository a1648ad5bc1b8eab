"""Pretrain a ViT centrally (plain PyTorch, no Flower) and save it as a Hugging Face checkpoint.

The project's stand-in for "an ImageNet-pretrained DeiT": train a preset on some classes of a
dataset, then fine-tune it by split learning on others with ``model='<the folder>'``
(``classes=``, a new head: docs/sweeps.md). The folder is what ``save_pretrained`` writes
(config with the class names in ``id2label``, safetensors weights, the image processor's
config with the size and statistics it was trained with), plus ``README.md`` (a model card)
and ``pretrain.json`` (the recipe and the held-out accuracy)::

    python -m simulations.pretrain --classes 1,3,5,7,8,9 --patch-size 4 --steps 3000 \\
        --lr 1e-3 --augment paper --out simulations/models/fmnist-vit-cpu-p4

Seeded: the same flags give the same weights, bit for bit, on one machine. The checkpoint is
written to a temporary folder beside ``--out`` and renamed at the end, so Ctrl-C, SIGTERM or a
kill never leaves a half-written one; a rerun with the same flags finds it and does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from adc_flwr.config import AUGMENTS, ConfigError, RunConfig
from adc_flwr.data import BatchCursor, DataBundle, DataError, ImageSplit, load_data
from adc_flwr.data.augment import Augment, build_augment
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.vit import PRESETS, ModelError, build_model
from adc_flwr.run.files import file_mode
from adc_flwr.training.workers import step_seed
from simulations.stopping import stop_signals

RECIPE_FILE = "pretrain.json"
WEIGHT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
CARD_FILE = "README.md"
_TMP = ".pretrain-"  # <parent>/.<name>.pretrain-<host>-<pid>: a checkpoint being written
AUGMENT_STREAM = 0xA07  # the pretraining's augmentation draws, apart from the runs'
# the flags that decide the weights: a rerun with the same ones finds the checkpoint
RECIPE_KEYS = (
    "dataset", "data_dir", "classes", "model", "patch_size", "image_size", "steps",
    "batch_size", "lr", "seed", "augment",
)  # fmt: skip


class PretrainError(ValueError):
    """Bad flags or an ``--out`` that cannot take the checkpoint: one ``error:`` line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; those named as run-config keys mean and are checked the same."""
    p = argparse.ArgumentParser(
        prog="python -m simulations.pretrain",
        description="Pretrain a ViT preset centrally and save it as a Hugging Face checkpoint "
        "folder that model='<folder>' loads.",
    )
    p.add_argument("--dataset", default="fashion-mnist", help="as the run-config key")
    p.add_argument("--data-dir", default="", help="as the run-config key")
    p.add_argument("--classes", default="", help="class indices, e.g. '1,3,5' or '0-4' (all)")
    p.add_argument("--model", default="vit-cpu", choices=sorted(PRESETS), help="a preset")
    p.add_argument("--patch-size", type=int, default=0, help="0: the preset's rule")
    p.add_argument("--image-size", type=int, default=0, help="0: the dataset's (or preset's)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (>= 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", default="paper", choices=AUGMENTS)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    return p.parse_args(argv)


def recipe_config(args: argparse.Namespace) -> RunConfig:
    """The flags as a validated RunConfig (their run-config namesakes' checks and errors)."""
    if args.steps < 1:
        raise PretrainError(f"--steps {args.steps}: must be >= 1")
    try:
        return RunConfig().replace(
            dataset=args.dataset,
            data_dir=args.data_dir,
            classes=args.classes,
            model=args.model,
            patch_size=args.patch_size,
            image_size=args.image_size,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            augment=args.augment,
            eval_batch_size=args.eval_batch_size,
        )
    except ConfigError as err:
        raise PretrainError(_as_flag(str(err))) from err


def _as_flag(message: str) -> str:
    """``run-config key 'patch-size' = 3`` or ``patch-size 3 ...`` -> ``--patch-size 3``:
    the user typed flags, not run-config keys."""
    message = re.sub(r"run-config key '([a-z-]+)' = ", r"--\1 ", message)
    first = message.split(" ", 1)[0]
    if first.replace("-", "_") in RECIPE_KEYS:
        message = f"--{message}"
    return message


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in RECIPE_KEYS}


# ---- the output folder -----------------------------------------------------------------


def found(out: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """What ``out`` holds: None (absent or empty: write it), the finished checkpoint of these
    very flags (its record), or a :class:`PretrainError` (other flags, or not ours)."""
    if out.exists() and not out.is_dir():
        raise PretrainError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        record = json.loads((out / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        raise PretrainError(
            f"--out {out} holds something else (no readable {RECIPE_FILE}); "
            "choose another --out or empty it"
        ) from None
    missing = [name for name in WEIGHT_FILES if not (out / name).is_file()]
    if missing:
        raise PretrainError(
            f"--out {out} holds a damaged checkpoint (no {', '.join(missing)}); remove it "
            "and pretrain again"
        )
    theirs = record.get("recipe", {}) if isinstance(record, dict) else {}
    changed = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {v!r} now"
               for k, v in wanted.items() if theirs.get(k) != v]  # fmt: skip
    if changed:
        raise PretrainError(
            f"--out {out} holds a checkpoint pretrained with other flags ({'; '.join(changed)}); "
            "choose another --out or remove it"
        )
    return record


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove the temporary folders of earlier attempts at ``out`` whose process is gone
    (a kill -9); the ones removed. Another host's are kept: whether its process lives
    cannot be told from here (a shared file system)."""
    removed = []
    prefix = f".{out.name}{_TMP}"
    for tmp in out.parent.glob(f"{prefix}*"):
        host, _, pid = tmp.name.removeprefix(prefix).rpartition("-")
        if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ---- training --------------------------------------------------------------------------


def train(
    vit: torch.nn.Module,
    data: DataBundle,
    spec: InputSpec,
    cfg: RunConfig,
    steps: int,
    augment: Augment | None,
) -> list[float]:
    """``steps`` Adam steps on the train split, seeded batches and augmentation; the loss of
    each step. A progress bar shows the loss and accuracy of the last 50 steps."""
    optimizer = torch.optim.Adam(vit.parameters(), lr=cfg.lr)
    indices = np.arange(len(data.train))
    cursor = BatchCursor(indices, cfg.batch_size, step_seed(cfg.seed))
    losses: list[float] = []
    hits: list[float] = []
    bar = tqdm(range(steps), desc="pretrain", unit="step", mininterval=1.0, file=sys.stderr)
    for step in bar:
        idx = cursor.next_batch()
        view = None
        if augment is not None:
            seed = step_seed(AUGMENT_STREAM, cfg.seed, step)
            view = lambda x, s=seed: augment(x, s)  # noqa: E731
        pixels, labels = spec.batch(data.train, idx, augment=view)  # (B, C, S, S), (B,)
        logits = vit(pixel_values=pixels).logits  # (B, classes)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        hits.append(float((logits.argmax(1) == labels).float().mean()))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{np.mean(hits[-50:]):.3f}")
    bar.close()
    return losses


@torch.no_grad()
def accuracy(vit: torch.nn.Module, split: ImageSplit, spec: InputSpec, batch_size: int) -> float:
    """Top-1 accuracy on ``split``, unaugmented."""
    vit.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        idx = np.arange(start, min(start + batch_size, len(split)))
        pixels, labels = spec.batch(split, idx)
        correct += int((vit(pixel_values=pixels).logits.argmax(1) == labels).sum())
    vit.train()
    return correct / len(split)


# ---- the checkpoint --------------------------------------------------------------------


def save_checkpoint(
    vit: torch.nn.Module, spec: InputSpec, folder: Path, record: dict[str, Any]
) -> None:
    """What ``model='<folder>'`` loads: weights + config (``id2label``: the classes), the
    image processor (size and the statistics trained with), the model card and the record."""
    from transformers import ViTImageProcessorPil

    vit.save_pretrained(folder)
    ViTImageProcessorPil(
        do_resize=True,
        size={"height": spec.image_size, "width": spec.image_size},
        resample=2,  # bilinear, as the data pipeline resizes
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    ).save_pretrained(folder)
    (folder / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (folder / CARD_FILE).write_text(model_card(record))


def model_card(record: dict[str, Any]) -> str:
    """A short model card: data, classes, model, training, held-out accuracy, the command."""
    r, m = record["recipe"], record["model"]
    facts = [
        f"**Data**: `{r['dataset']}`, classes `{r['classes'] or 'all'}` "
        f"({', '.join(record['class_names'])}); {record['train_samples']} train images.",
        f"**Model**: {m['image_size']} px, {m['num_channels']} channel(s), patch "
        f"{m['patch_size']} ({m['tokens']} tokens), width {m['hidden_size']}, {m['layers']} "
        f"blocks, {m['parameters']} parameters.",
        f"**Training**: {r['steps']} steps of Adam (lr {r['lr']:g}), batch {r['batch_size']}, "
        f"augment `{r['augment']}`, seed {r['seed']}; {record['wall_time_s']:.0f} s on "
        f"{record['machine']}.",
        f"**Held-out accuracy**: {record['test_accuracy']:.4f} on the "
        f"{record['test_samples']} test images of these classes (unaugmented).",
        f"**Command**: `{record['command']}`",
    ]
    header = "---\nlibrary_name: transformers\npipeline_tag: image-classification\n"
    header += "tags: [vit, adc-flwr, pretrained-stand-in]\n---\n"
    intro = (
        f"A `{r['model']}` ViT pretrained centrally by adc-flwr (`simulations/pretrain.py`), "
        "the project's stand-in for an ImageNet-pretrained DeiT: fine-tune it by split "
        "learning on other classes with `model='<this folder>'` and `classes=` (the head is "
        "re-created for new labels)."
    )
    body = "\n".join(f"- {fact}" for fact in facts)
    return f"{header}# {Path(record['out']).name}\n\n{intro}\n\n{body}\n"


def write_atomically(out: Path, write: Any) -> None:
    """``write(tmp)`` into ``.<name>.pretrain-<host>-<pid>`` beside ``out``, then rename:
    ``out`` holds a whole checkpoint or nothing."""
    tmp = out.parent / f".{out.name}{_TMP}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for path in tmp.iterdir():  # safetensors writes 0600: the umask's mode, as the rest
            path.chmod(file_mode())
        try:
            if out.exists():
                out.rmdir()  # empty (found() said so)
            os.rename(tmp, out)
        except OSError as err:  # another process wrote --out meanwhile
            raise PretrainError(
                f"--out {out} was filled by another process while this one trained ({err}); "
                "nothing of this run was written"
            ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- main ------------------------------------------------------------------------------


def pretrain(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train, evaluate and write the checkpoint; its record."""
    cfg = recipe_config(args)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.classes)
    vit = build_model(cfg, data)  # as a run builds it: the preset sized for the data
    spec = InputSpec.for_model(vit, data)
    out = Path(args.out).expanduser().resolve()
    started = time.perf_counter()
    train(vit, data, spec, cfg, args.steps, build_augment(cfg.augment))
    wall = time.perf_counter() - started
    test_accuracy = accuracy(vit, data.test, spec, cfg.eval_batch_size)
    vc = vit.config
    record = {
        "recipe": recipe(args),
        "out": str(out),
        "command": command,
        "class_names": list(data.class_names),
        "train_samples": len(data.train),
        "test_samples": len(data.test),
        "test_accuracy": round(test_accuracy, 6),
        "wall_time_s": round(wall, 1),
        "machine": f"{os.cpu_count()} CPU(s), torch {torch.__version__}",
        "model": {
            "image_size": vc.image_size,
            "num_channels": vc.num_channels,
            "patch_size": vc.patch_size,
            "tokens": (vc.image_size // vc.patch_size) ** 2 + 1,
            "hidden_size": vc.hidden_size,
            "layers": vc.num_hidden_layers,
            "parameters": sum(p.numel() for p in vit.parameters()),
        },
    }
    write_atomically(out, lambda tmp: save_checkpoint(vit, spec, tmp, record))
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "simulations.pretrain", *(argv or sys.argv[1:])])
    out = Path(args.out).expanduser().resolve()
    try:
        recipe_config(args)
        for tmp in sweep_leftovers(out):
            print(f"removed {tmp.name}: a half-written checkpoint of a process that is gone")
        if (record := found(out, recipe(args))) is not None:
            print(
                f"found {out}: pretrained with these flags already (held-out accuracy "
                f"{record.get('test_accuracy')}); nothing to do"
            )
            return 0
        with stop_signals():
            record = pretrain(args, command)
    except (PretrainError, DataError, ModelError) as err:
        print(f"error: {_as_flag(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted ({str(exc) or 'SIGINT'}): nothing written to {out}", file=sys.stderr)
        return 130
    print(
        f"wrote {out}: held-out accuracy {record['test_accuracy']:.4f} on "
        f"{record['test_samples']} test images, {record['wall_time_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
