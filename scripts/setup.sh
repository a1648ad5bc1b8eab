#!/usr/bin/env bash
# Install what adc-flwr needs on a fresh machine: a virtual environment with the pinned
# packages (.venv), and Fashion-MNIST from Debian's dataset-fashion-mnist when apt and root
# are there. Idempotent: a second call only checks. Sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "adc-flwr needs Python 3.11 (flwr 1.41 and the torch 2.13 CPU wheel); found $("$PYTHON" --version)" >&2
    exit 1
}

# torch: the build of the pinned version that suits this machine (scripts/torch_install.sh):
# with an NVIDIA GPU (nvidia-smi lists one) the CUDA build for the newest CUDA the driver
# runs, from PyTorch's index, else the CPU build (a local wheel directory in pip's config
# serves it offline). TORCH_INDEX_URL chooses: cpu (no CUDA attempt, no PyTorch index), cu126,
# or an index URL ending in a build. It is installed first, with its label, so the
# unlabelled pin in pyproject.toml is already satisfied by that very build.
source scripts/torch_install.sh
torch_version=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
torch_version=${torch_version#torch==}
torch_wanted=$(torch_build)

stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-torch-$torch_wanted
if [ ! -f "$stamp" ]; then
    echo "[setup] creating .venv and installing pinned packages (about 2 minutes the first time)"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    torch_got=$(install_torch .venv/bin/python "$torch_version" "$torch_wanted")
    # (This machine's pip config lists file:// indexes that may be absent: drop that noise.)
    .venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    rm -f .venv/.installed-*
    # the stamp holds the torch installed: the CPU build where the CUDA install failed
    echo "$torch_version+$torch_got" > "$stamp"
fi
if [ "$(cat "$stamp")" != "$torch_version+$torch_wanted" ]; then
    echo "[setup] WARNING: torch $(cat "$stamp") is installed, not the $torch_wanted build (its" \
        "install failed); remove .venv/.installed-* to try again, or set TORCH_INDEX_URL=cpu" >&2
fi

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
        apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
    else
        echo "[setup] Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist'" \
             "or pass --run-config \"data-dir='/path/to/idx/files'\"" >&2
    fi
fi

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
