# Which build of the pinned torch this machine gets, and installing exactly that build.
# Functions for scripts/setup.sh: sourced, never run (tests/simulations/test_setup.py sources it with a
# fake nvidia-smi and a fake pip). Messages go to stderr; results to stdout.
#
# A build is torch's local version label: 2.13.0+cpu, 2.13.0+cu126, ... pip counts the
# unlabelled pin `torch==2.13.0` as satisfied by every build, so one build never replaces
# another under it; the pin installed here always carries the label (`torch==2.13.0+cu130`).

TORCH_WHL=https://download.pytorch.org/whl

# CUDA builds PyTorch publishes for torch 2.13, newest first, each with the oldest driver CUDA
# version (as `nvidia-smi` prints it, 12.8 -> 1208) that runs it. Check the list against
# https://download.pytorch.org/whl/torch/ when the pin moves.
# cu126 from 12.0, not 12.6: CUDA's minor version compatibility runs a program built with any
# CUDA 12.x toolkit on any 12.x driver (>= 525), without PTX JIT (NVIDIA, "CUDA Compatibility",
# https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html, table 1).
# PyTorch's CUDA wheels bundle their CUDA runtime and rely on this: their binary smoke tests
# run a build on an older driver of the same major version (pytorch/pytorch#82913). PyTorch's
# install page itself says nothing either way. The cu126 wheels carry compiled kernels up to
# sm_90; newer GPUs (Blackwell) need a 570+ driver, which reports 12.8 and gets cu128.
TORCH_CUDA_BUILDS="1300:cu130 1208:cu128 1200:cu126"

# The build to install: TORCH_INDEX_URL when set (a build name, `cpu` or `cu126`, or an index
# URL ending in one), else the newest CUDA build the driver runs where nvidia-smi lists a GPU,
# else cpu. Exits 1 on a TORCH_INDEX_URL that names no build.
torch_build() {
    local index=${TORCH_INDEX_URL:-} driver_cuda rank build
    if [ -n "$index" ]; then
        build=${index%/}
        build=${build##*/}
        case $build in
            cpu | cu[0-9]*) echo "$build"; return 0 ;;
        esac
        echo "[setup] TORCH_INDEX_URL=$index names no torch build: give 'cpu', 'cu126'," \
            "or an index ending in one ($TORCH_WHL/cu126)" >&2
        return 1
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo cpu
        return 0
    fi
    driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1.\2/p' | head -n 1)
    driver_cuda=${driver_cuda:-0.0}
    rank=$(( ${driver_cuda%.*} * 100 + 10#${driver_cuda#*.} ))
    for build in $TORCH_CUDA_BUILDS; do
        if [ "$rank" -ge "${build%:*}" ]; then
            echo "${build#*:}"
            return 0
        fi
    done
    echo "[setup] the NVIDIA driver runs CUDA $driver_cuda, older than any CUDA build of" \
        "torch here (12.0 at least): installing the CPU build (TORCH_INDEX_URL chooses)" >&2
    echo cpu
}

# python $1 -m pip "${@:2}", its output on stderr without the noise of the file:// indexes
# this machine's pip config lists and that may be absent; pip's exit status.
_pip() {
    local python=$1
    shift
    "$python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
    return "${PIPESTATUS[0]}"
}

# The torch version installed in the environment of python $1 ("" when none), read from its
# metadata without importing torch.
torch_installed() {
    "$1" -c 'import importlib.metadata as m
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    print("")' 2>/dev/null || true
}

# Install torch==$2+$3 with python $1 unless it is there already; print the build installed.
# The CPU build comes from pip's configured sources first (a local wheel directory works
# offline), else from PyTorch's CPU index. A CUDA build comes from PyTorch's index for it;
# when that fails (no network, say) the CPU build is installed instead, with a warning.
install_torch() {
    local python=$1 version=$2 build=$3
    if [ "$(torch_installed "$python")" = "$version+$build" ]; then
        echo "$build"
        return 0
    fi
    if [ "$build" != cpu ]; then
        echo "[setup] torch==$version+$build from $TORCH_WHL/$build" >&2
        if _pip "$python" install --quiet --retries 1 --timeout 60 "torch==$version+$build" \
            --index-url "$TORCH_WHL/$build"; then
            echo "$build"
            return 0
        fi
        echo "[setup] WARNING: installing torch==$version+$build failed (no network?): installing" \
            "the CPU build instead, so this machine's GPU goes unused. Remove .venv/.installed-*" \
            "to try again, or set TORCH_INDEX_URL=cpu to ask for the CPU build." >&2
    fi
    if _pip "$python" install --quiet "torch==$version+cpu" \
        || _pip "$python" install --quiet "torch==$version+cpu" --index-url "$TORCH_WHL/cpu"; then
        echo cpu
        return 0
    fi
    echo "[setup] could not install torch==$version+cpu either" >&2
    return 1
}
