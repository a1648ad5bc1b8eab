"""``python -m simulations.pretrain``: a seeded checkpoint folder that ``model='<folder>'``
loads, its record and card, reruns that find it or refuse, bad flags refused before any
training, and interruptions that leave nothing behind.

Tiny runs only: scikit-learn's digits (8 px, 2 px patches), 2-3 steps of batch 16.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import simulations.pretrain as pretrain_module
from adc_flwr.data import load_data
from adc_flwr.model.inputs import InputSpec
from adc_flwr.model.preprocessing import checkpoint_preprocessing
from adc_flwr.model.vit import build_vit
from simulations.pretrain import CARD_FILE, RECIPE_FILE, main
from tests.support.helpers import flwr_run_env, run_server_app, tiny_config

ROOT = Path(__file__).resolve().parents[2]
CLASSES = "4,2,0"  # not sorted: id2label must follow the flag's order
TINY = ["--dataset", "digits", "--steps", "3", "--batch-size", "16", "--augment", "paper"]
FINE_TUNE_LR = 1e-6  # so small that a run's weights stay within 1e-4 of where they started


def flags(out: Path, *extra: str, classes: str = CLASSES) -> list[str]:
    """The tiny pretraining's argv into ``out``; ``extra`` flags override (argparse: last wins)."""
    return [*TINY, "--classes", classes, "--out", str(out), *extra]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` in process: exit status, stdout, stderr."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(out: Path) -> list[Path]:
    """Temporary folders of a checkpoint being written beside ``out``."""
    return sorted(out.parent.glob(f".{out.name}.pretrain-*"))


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def tree(root: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file under ``root`` (folders too): its bytes and mtime."""
    return {
        p: (b"" if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def error_lines(err: str) -> list[str]:
    """stderr's non-empty lines (no progress bar runs before an error)."""
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny checkpoint (digits classes 4,2,0, augment paper), shared read-only."""
    out = tmp_path_factory.mktemp("pretrained") / "ckpt"
    assert main(flags(out)) == 0
    return out


# ---- the checkpoint ----------------------------------------------------------------------


def test_same_flags_give_the_same_bytes_and_another_seed_does_not(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Seeded batches, init and augmentation: a second run of the same flags into another
    folder writes a byte-identical model.safetensors; --seed 1 changes the weights."""
    assert main(flags(tmp_path / "twin")) == 0
    assert (tmp_path / "twin" / "model.safetensors").read_bytes() == (
        checkpoint / "model.safetensors"
    ).read_bytes()
    assert main(flags(tmp_path / "seed1", "--seed", "1")) == 0
    ours, theirs = weights(checkpoint), weights(tmp_path / "seed1")
    assert ours.keys() == theirs.keys()
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_folder_loads_with_the_head_rule_and_the_training_statistics(
    checkpoint: Path,
) -> None:
    """build_vit keeps the head for the checkpoint's own class names (in its order) and makes
    a new one otherwise, the body loaded either way; id2label follows --classes' order; the
    image processor carries the dataset's statistics and the model's size."""
    saved = weights(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["id2label"] == {"0": "4", "1": "2", "2": "0"}

    same = build_vit(str(checkpoint), num_classes=3, class_names=["4", "2", "0"])
    assert torch.equal(same.classifier.weight.detach(), saved["classifier.weight"])
    assert torch.equal(same.classifier.bias.detach(), saved["classifier.bias"])
    for names in (["0", "2", "4"], ["5", "6", "7"]):  # reordered, or other classes
        other = build_vit(str(checkpoint), num_classes=3, class_names=names)
        assert not torch.equal(other.classifier.weight.detach(), saved["classifier.weight"])
        assert other.config.id2label == dict(enumerate(names))
        body, kept = other.vit.state_dict(), same.vit.state_dict()  # the body, loaded alike
        assert body.keys() == kept.keys() and all(torch.equal(body[k], kept[k]) for k in body)
    fewer = build_vit(str(checkpoint), num_classes=2, class_names=["8", "9"])
    assert fewer.classifier.weight.shape == (2, saved["classifier.weight"].shape[1])  # (C, d)

    digits = load_data("digits")
    pre = checkpoint_preprocessing(str(checkpoint))
    assert pre is not None
    assert pre.image_size == same.config.image_size == digits.image_size
    assert pre.mean == pytest.approx(digits.mean, rel=1e-9)
    assert pre.std == pytest.approx(digits.std, rel=1e-9)


def test_record_and_card_tell_the_truth(checkpoint: Path) -> None:
    """pretrain.json's held-out accuracy equals an evaluation of the saved folder on the
    test split of these classes; the card names the classes, steps, accuracy and command."""
    record = json.loads((checkpoint / RECIPE_FILE).read_text())
    data = load_data("digits", "", CLASSES)
    vit = build_vit(str(checkpoint), num_classes=data.num_classes, class_names=data.class_names)
    spec = InputSpec.for_model(vit, data, model=str(checkpoint))  # the processor's statistics
    pixels, labels = spec.batch(data.test, np.arange(len(data.test)))  # (N, 1, 8, 8), (N,)
    with torch.no_grad():
        predicted = vit.eval()(pixel_values=pixels).logits.argmax(1)  # (N,)
    accuracy = float((predicted == labels).double().mean())
    assert record["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert record["test_samples"] == len(data.test)
    assert record["class_names"] == ["4", "2", "0"]
    assert record["recipe"]["classes"] == CLASSES and record["recipe"]["steps"] == 3

    card = (checkpoint / CARD_FILE).read_text()
    command = shlex.join(["python", "-m", "simulations.pretrain", *flags(checkpoint)])
    assert record["command"] == command
    assert f"`{command}`" in card
    assert f"classes `{CLASSES}` (4, 2, 0)" in card
    assert "3 steps of Adam" in card
    assert f"{accuracy:.4f} on the {len(data.test)} test images" in card


# ---- reruns and foreign folders ----------------------------------------------------------


def test_rerun_finds_the_checkpoint_or_names_the_changed_flag(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same flags: "found", rc 0, nothing trained or rewritten; other --steps: one
    error line naming --steps, rc 2, the checkpoint as it was."""
    before = mtimes(checkpoint)
    monkeypatch.setattr(pretrain_module, "train", _no_training)
    code, out, err = run_main(flags(checkpoint), capsys)
    assert code == 0 and out.startswith(f"found {checkpoint}") and "nothing to do" in out
    code, out, err = run_main(flags(checkpoint, "--steps", "4"), capsys)
    assert code == 2 and out == ""
    (line,) = error_lines(err)
    assert line.startswith("error:") and "--steps 3 there, 4 now" in line
    assert "--seed" not in line  # only what changed
    assert mtimes(checkpoint) == before


@pytest.mark.parametrize("what", ["unrelated files", "a file"])
def test_an_out_that_is_not_ours_is_refused_untouched(
    what: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pretrain_module, "train", _no_training)
    if what == "a file":
        out = tmp_path / "notes.txt"
        out.write_text("mine\n")
        expected = "is a file, not a folder"
    else:
        out = tmp_path / "theirs"
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
        (out / "config.json").write_text("{}\n")
        expected = "holds something else"
    before = tree(tmp_path)
    code, _, err = run_main(flags(out), capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith("error:") and expected in line
    assert tree(tmp_path) == before


# ---- bad flags: refused before any training ----------------------------------------------


def _no_training(*_args: Any, **_kwargs: Any) -> list[float]:
    pytest.fail("train() ran, though the flags should have been refused first")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "0,12"], "--classes '0,12': the dataset has classes 0..9 (10), not [12]"),
        (["--patch-size", "3"], "--patch-size 3 does not divide image-size 8"),
        (["--steps", "0"], "--steps 0: must be >= 1"),
        (["--lr", "-1"], "--lr"),
    ],
)
def test_bad_flags_are_one_error_line_before_training(
    extra: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pretrain_module, "train", _no_training)
    out = tmp_path / "ckpt"
    code, stdout, err = run_main(flags(out, *extra), capsys)
    assert code == 2 and stdout == ""
    (line,) = error_lines(err)
    assert line.startswith("error: ") and message in line, line
    assert "run-config key" not in line  # the user typed flags
    assert not out.exists() and not leftovers(out)


def test_an_unknown_augment_is_argparse_s_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """argparse's own refusal (choices): rc 2, its usage lines, then one line with
    ``error:`` (prefixed by the program name, as argparse writes it)."""
    monkeypatch.setattr(pretrain_module, "train", _no_training)
    out = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exited:
        main(flags(out, "--augment", "bogus"))
    assert exited.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]] and "argument --augment: invalid choice: 'bogus'" in lines[-1]
    assert lines[0].startswith("usage: python -m simulations.pretrain")
    assert not out.exists()


# ---- interruptions and leftovers ---------------------------------------------------------


def _ctrl_c(*_args: Any, **_kwargs: Any) -> None:
    """What Ctrl-C does: SIGINT to this process (the command's handler raises)."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # the handler raises before this ends
    pytest.fail("SIGINT did not stop the command")


def _bare_interrupt(*_args: Any, **_kwargs: Any) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["train", "save_checkpoint", "bare"])
def test_an_interruption_leaves_nothing(
    where: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C in training (nothing written yet) or once the whole folder is written but not
    yet renamed, or a KeyboardInterrupt raised from inside: rc 130, no --out, no temporary
    folder."""
    if where == "save_checkpoint":
        real: Callable[..., None] = pretrain_module.save_checkpoint

        def written(vit: Any, spec: Any, folder: Path, record: dict[str, Any]) -> None:
            real(vit, spec, folder, record)
            assert (folder / "model.safetensors").exists()
            _ctrl_c()

        monkeypatch.setattr(pretrain_module, "save_checkpoint", written)
    else:
        monkeypatch.setattr(
            pretrain_module, "train", _bare_interrupt if where == "bare" else _ctrl_c
        )
    out = tmp_path / "ckpt"
    code, _, err = run_main(flags(out, "--steps", "2"), capsys)
    assert code == 130
    assert f"interrupted (SIGINT): nothing written to {out}" in err  # a bare one too
    assert not out.exists() and not leftovers(out)
    assert list(tmp_path.iterdir()) == []


def _temp_folder(out: Path, host: str, pid: int) -> Path:
    """A planted ``.<name>.pretrain-<host>-<pid>`` with a half-written file in it."""
    folder = out.parent / f".{out.name}.pretrain-{host}-{pid}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half")
    return folder


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill -9's temporary folder (its PID gone) is removed and reported by the next run;
    one of a live process on this host is someone writing now: kept. An empty --out (a
    user's mkdir) takes the checkpoint."""
    out = tmp_path / "ckpt"
    out.mkdir()
    gone = subprocess.Popen(["true"])  # a PID that was this host's, now no process's
    gone.wait()
    host = socket.gethostname()
    dead = _temp_folder(out, host, gone.pid)
    alive = subprocess.Popen(["sleep", "60"])
    try:
        live = _temp_folder(out, host, alive.pid)
        code, stdout, _ = run_main(flags(out, "--steps", "2"), capsys)
        assert code == 0
        assert f"removed {dead.name}: a half-written checkpoint" in stdout
        assert not dead.exists()
        assert live.exists() and (live / "model.safetensors").read_bytes() == b"half"
        assert leftovers(out) == [live]
        assert (out / "model.safetensors").exists() and (out / RECIPE_FILE).exists()
    finally:
        alive.kill()
        alive.wait()


def test_another_host_s_temporary_folder_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a shared file system another machine may be writing the same --out right now."""
    monkeypatch.setattr(pretrain_module, "train", _no_training)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")  # refused after the sweep: no training
    theirs = _temp_folder(out, "another-host.example", os.getpid())
    assert run_main(flags(out), capsys)[0] == 2
    assert theirs.exists()


def _read_until(stream: Any, marker: str, timeout: float) -> str:
    """What ``stream`` (binary, unbuffered) gave until ``marker`` appeared."""
    os.set_blocking(stream.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen and time.monotonic() < deadline:
        seen += stream.read() or b""
        time.sleep(0.1)
    return seen.decode(errors="replace")


def test_sigterm_while_training_exits_130_and_writes_nothing(tmp_path: Path) -> None:
    """SIGTERM to the real command mid-training (its progress bar showing): rc 130, one
    line saying nothing was written, no --out, no temporary folder."""
    out = tmp_path / "ckpt"
    argv = flags(out, "--steps", "100000", "--augment", "none")  # hours: still training
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.pretrain", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        seen = _read_until(proc.stderr, "step/s", timeout=60)  # the bar is up: in the loop
        assert "pretrain:" in seen, seen
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = seen + stderr.decode(errors="replace")
    assert proc.returncode == 130, err[-2000:]
    assert err.rstrip().endswith(f"interrupted (SIGTERM): nothing written to {out}")
    assert "Traceback" not in err and stdout == b""
    assert not out.exists() and not leftovers(out)


# ---- fine-tuning it: the head rule in a run ----------------------------------------------


def head_of(run_dir: Path) -> dict[str, torch.Tensor]:
    """The classifier of a run's last checkpoint (the server's back holds it)."""
    back = torch.load(run_dir / "checkpoint.pt", weights_only=True)["back"]
    return {k.rsplit(".", 1)[1]: v for k, v in back.items() if "classifier." in k}


def assert_head_rule(
    run_dir: Path, pretrained: Path, classes: list[str], *, seed: int, new: bool
) -> None:
    """A run at ``FINE_TUNE_LR`` ends with a head within 1e-4 of the one it started from:
    the pretrained head for the checkpoint's own classes, else the head build_vit re-creates
    from the run's seed, which is far from the pretrained one."""
    run = head_of(run_dir)
    saved = weights(pretrained)
    fresh = build_vit(str(pretrained), num_classes=len(classes), class_names=classes, seed=seed)
    start = (
        {"weight": fresh.classifier.weight.detach(), "bias": fresh.classifier.bias.detach()}
        if new
        else {"weight": saved["classifier.weight"], "bias": saved["classifier.bias"]}
    )
    for name in ("weight", "bias"):
        assert run[name].shape == start[name].shape  # (C, d), (C,)
        assert (run[name] - start[name]).abs().max() < 1e-4, name
    if new:
        assert (run["weight"] - saved["classifier.weight"]).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("classes", "new_head"), [("5,6,7", True), ("0,2,4", True), (CLASSES, False)]
)
def test_a_run_fine_tuning_the_checkpoint_re_creates_the_head_for_other_classes(
    checkpoint: Path, tmp_path: Path, classes: str, new_head: bool
) -> None:
    """The ServerApp in process on ``model='<folder>'``: it completes, and its head is new
    for other classes (the same count, or the same classes reordered) and the pretrained
    one for the checkpoint's own."""
    cfg = tiny_config(
        tmp_path,
        model=str(checkpoint),
        classes=classes,
        augment="paper",
        patch_size=0,
        lr=FINE_TUNE_LR,
        local_steps=2,
    )
    summary, _ = run_server_app(cfg, nodes=2)
    assert summary is not None and summary["status"] == "completed", summary
    names = load_data("digits", "", classes).class_names
    assert_head_rule(Path(cfg.run_dir), checkpoint, names, seed=cfg.seed, new=new_head)


@pytest.mark.slow  # Ray and Flower start: a minute
def test_pretrain_then_fine_tune_through_flwr_run(tmp_path: Path) -> None:
    """The issue's user path: pretrain digits 0-4 with the command, then fine-tune on 5-9
    with scripts/flwr_run.sh and model='<folder>': completed, rc 0, a new head."""
    pretrained = tmp_path / "digits-0-4"
    done = subprocess.run(
        [sys.executable, "-m", "simulations.pretrain", *flags(pretrained, classes="0-4")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run_config = (
        f"model='{pretrained}' classes='5,6,7,8,9' augment='paper' patch-size=0 "
        f"dataset='digits' num-server-rounds=1 local-steps=2 batch-size=16 eval-samples=64 "
        f"method='none' lr={FINE_TUNE_LR} seed=7"
    )
    done = subprocess.run(
        ["bash", "scripts/flwr_run.sh", run_config, "num-supernodes=2 client-resources-num-cpus=1"],
        cwd=ROOT,
        env=flwr_run_env(tmp_path / "out", "fine-tune"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "out" / "fine-tune"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert_head_rule(run_dir, pretrained, [str(c) for c in range(5, 10)], seed=7, new=True)


def test_a_checkpoint_missing_its_weights_is_damaged_not_found(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pretrain.json alone does not make a checkpoint: a folder whose weights are gone is
    named damaged, not "found", and left as it is."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("pretrain.json", "config.json", "preprocessor_config.json"):
        (out / name).write_bytes((checkpoint / name).read_bytes())
    before = tree(out)
    code, stdout, err = run_main(flags(out), capsys)
    assert code == 2 and "found" not in stdout
    (line,) = error_lines(err)
    assert line.startswith("error:") and "damaged" in line and "model.safetensors" in line
    assert tree(out) == before


def test_an_out_filled_by_another_process_meanwhile_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pretrainings into one --out: the second to finish finds it taken, says so in one
    line (rc 2) and leaves the first one's checkpoint and no temporary folder."""
    out = tmp_path / "ckpt"
    real_save = pretrain_module.save_checkpoint

    def save_then_race(vit: Any, spec: Any, folder: Path, record: dict[str, Any]) -> None:
        real_save(vit, spec, folder, record)
        out.mkdir()
        (out / "theirs.txt").write_text("the other process's checkpoint\n")

    monkeypatch.setattr(pretrain_module, "save_checkpoint", save_then_race)
    code, _, err = run_main(flags(out), capsys)
    assert code == 2
    (line,) = [ln for ln in error_lines(err) if ln.startswith("error:")]
    assert "filled by another process" in line
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and leftovers(out) == []


def test_every_file_gets_the_umask_s_mode(checkpoint: Path) -> None:
    """safetensors writes its file 0600; the checkpoint is for others to read too."""
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in checkpoint.iterdir()} == {
        p.name: 0o666 & ~umask for p in checkpoint.iterdir()
    }
