"""scripts/setup.sh's choice of torch build, with a fake nvidia-smi and a fake pip.

Nothing is installed: ``scripts/torch_install.sh`` is sourced by bash with a stand-in
``nvidia-smi`` first on PATH (printing the CUDA version a driver would) and a stand-in Python
whose ``-m pip install`` logs its arguments and records the ``torch==...`` it was asked for
(failing for the sources listed in ``FAIL``), which ``importlib.metadata`` then reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ROOT / "scripts" / "torch_install.sh"
WHL = "https://download.pytorch.org/whl"

FAKE_SMI = """#!/usr/bin/env bash
echo "nvidia-smi $*" >> "$SMI_LOG"
[ -n "${FAKE_CUDA:-}" ] || exit 9  # no GPU: `nvidia-smi -L` fails
[ "${1:-}" = -L ] && { echo "GPU 0: NVIDIA Fake (UUID: GPU-0)"; exit 0; }
echo "| NVIDIA-SMI 999.99   Driver Version: 999.99   CUDA Version: $FAKE_CUDA     |"
"""

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$PIP_LOG"
if [ "$1" = -c ]; then cat "$TORCH_STATE" 2>/dev/null || echo; exit 0; fi
want="" index=configured prev=""
for a in "$@"; do
    case $a in torch==*) want=${a#torch==} ;; esac
    [ "$prev" = --index-url ] && index=$a
    prev=$a
done
[ -n "$want" ] || exit 0
case " ${FAIL:-} " in
    *" $index "*) echo "ERROR: No matching distribution ($index)" >&2; exit 1 ;;
esac
echo "$want" > "$TORCH_STATE"
"""


class Machine:
    """A temp dir with the fakes; ``run`` runs bash there with them first on PATH."""

    def __init__(self, path: Path) -> None:
        self.path = path
        bin_dir = path / "bin"
        bin_dir.mkdir()
        for name, text in (("nvidia-smi", FAKE_SMI), ("python", FAKE_PYTHON)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.python = bin_dir / "python"
        self.state = path / "torch-installed"
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SMI_LOG": str(path / "smi.log"),
            "PIP_LOG": str(path / "pip.log"),
            "TORCH_STATE": str(self.state),
        }
        self.env.pop("TORCH_INDEX_URL", None)

    def run(self, script: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", script],
            cwd=cwd or self.path,
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def build(self, **env: str) -> subprocess.CompletedProcess:
        return self.run(f"set -euo pipefail; source {FUNCTIONS}; torch_build", **env)

    def install(self, build: str, **env: str) -> subprocess.CompletedProcess:
        script = (
            f"set -euo pipefail; source {FUNCTIONS}; install_torch {self.python} 2.13.0 {build}"
        )
        return self.run(script, **env)

    def log(self, name: str) -> str:
        path = self.path / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def clear_logs(self) -> None:
        for name in ("smi", "pip"):
            (self.path / f"{name}.log").unlink(missing_ok=True)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


@pytest.mark.parametrize(
    ("driver_cuda", "build"),
    [
        ("13.1", "cu130"),
        ("13.0", "cu130"),
        ("12.9", "cu128"),
        ("12.8", "cu128"),
        ("12.6", "cu126"),
        ("12.2", "cu126"),  # minor version compatibility: any 12.x driver runs cu126
        ("12.0", "cu126"),
        ("11.8", "cpu"),
        ("", "cpu"),  # nvidia-smi there, but no GPU
    ],
)
def test_the_build_follows_the_driver(machine: Machine, driver_cuda: str, build: str) -> None:
    proc = machine.build(FAKE_CUDA=driver_cuda)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{build}\n"
    assert ("older than any CUDA build" in proc.stderr) == (driver_cuda == "11.8")


@pytest.mark.parametrize(
    ("index", "build"),
    [("cpu", "cpu"), ("cu126", "cu126"), (f"{WHL}/cpu", "cpu"), (f"{WHL}/cu128/", "cu128")],
)
def test_torch_index_url_chooses_without_asking_the_driver(
    machine: Machine, index: str, build: str
) -> None:
    proc = machine.build(FAKE_CUDA="13.0", TORCH_INDEX_URL=index)
    assert proc.returncode == 0 and proc.stdout == f"{build}\n", proc.stderr
    assert machine.log("smi") == ""


def test_torch_index_url_naming_no_build_is_an_error(machine: Machine) -> None:
    proc = machine.build(TORCH_INDEX_URL="https://pypi.org/simple")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "TORCH_INDEX_URL=https://pypi.org/simple names no torch build" in proc.stderr


def test_switching_builds_pins_the_label(machine: Machine) -> None:
    machine.state.write_text("2.13.0+cpu\n")  # what pip counts as satisfying torch==2.13.0
    proc = machine.install("cu130")
    assert proc.returncode == 0 and proc.stdout == "cu130\n", proc.stderr
    pinned = f"torch==2.13.0+cu130 --index-url {WHL}/cu130"
    assert f"-m pip install --quiet --retries 1 --timeout 60 {pinned}" in machine.log("pip")
    assert machine.state.read_text() == "2.13.0+cu130\n"
    machine.clear_logs()
    proc = machine.install("cpu")  # and back: the CPU build from pip's own sources (offline)
    assert proc.returncode == 0 and proc.stdout == "cpu\n", proc.stderr
    assert "install --quiet torch==2.13.0+cpu\n" in machine.log("pip")
    assert "download.pytorch.org" not in machine.log("pip")
    assert machine.state.read_text() == "2.13.0+cpu\n"
    machine.clear_logs()
    proc = machine.install("cpu")  # already there: pip is not run
    assert proc.stdout == "cpu\n" and "install" not in machine.log("pip")


def test_a_failed_cuda_install_falls_back_to_the_cpu_build(machine: Machine) -> None:
    proc = machine.install("cu128", FAIL=f"{WHL}/cu128")
    assert proc.returncode == 0 and proc.stdout == "cpu\n", proc.stderr
    assert "WARNING: installing torch==2.13.0+cu128 failed" in proc.stderr
    assert machine.state.read_text() == "2.13.0+cpu\n"
    # no local CPU wheel either: PyTorch's CPU index
    machine.state.unlink()
    proc = machine.install("cu128", FAIL=f"{WHL}/cu128 configured")
    assert proc.stdout == "cpu\n" and f"torch==2.13.0+cpu --index-url {WHL}/cpu" in machine.log(
        "pip"
    )
    proc = machine.install("cu128", FAIL=f"{WHL}/cu128 configured {WHL}/cpu")
    assert proc.returncode == 1 and "could not install torch==2.13.0+cpu either" in proc.stderr


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="setup.sh would install Fashion-MNIST",
)
def test_setup_sh_stamps_the_build_it_installed(machine: Machine) -> None:
    """The whole script in a copy of the repository's layout, with the fake as .venv's python."""
    repo = machine.path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "torch_install.sh"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    (repo / "pyproject.toml").write_text('dependencies = [\n    "torch==2.13.0",\n]\n')
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(machine.python, repo / ".venv" / "bin" / "python")
    machine.state.write_text("2.13.0+cpu\n")
    setup = "source scripts/setup.sh"
    env = {"PYTHON": sys.executable, "FAKE_CUDA": "13.0"}

    def stamps() -> dict[str, str]:
        return {
            p.name.split("-torch-")[1]: p.read_text() for p in (repo / ".venv").glob(".installed-*")
        }

    proc = machine.run(setup, cwd=repo, **env)
    assert proc.returncode == 0, proc.stderr
    assert machine.state.read_text() == "2.13.0+cu130\n"
    assert "-e .[dev]" in machine.log("pip") and stamps() == {"cu130": "2.13.0+cu130\n"}
    machine.clear_logs()
    assert machine.run(setup, cwd=repo, **env).returncode == 0  # a second call only checks
    assert machine.log("pip") == ""
    machine.clear_logs()
    proc = machine.run(setup, cwd=repo, **env | {"TORCH_INDEX_URL": "cpu"})
    assert proc.returncode == 0 and stamps() == {"cpu": "2.13.0+cpu\n"}
    assert machine.state.read_text() == "2.13.0+cpu\n" and machine.log("smi") == ""
    assert "download.pytorch.org" not in machine.log("pip")  # the local wheel: offline
    # the CUDA install fails: the stamp says what is there, and every call says so
    for _ in range(2):
        proc = machine.run(setup, cwd=repo, **env | {"FAKE_CUDA": "12.8", "FAIL": f"{WHL}/cu128"})
        assert proc.returncode == 0 and stamps() == {"cu128": "2.13.0+cpu\n"}
        assert "WARNING: torch 2.13.0+cpu is installed, not the cu128 build" in proc.stderr
