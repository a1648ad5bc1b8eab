#!/usr/bin/env bash
# Run the app with `flwr run .` on a private local SuperLink, and fail when the run fails.
#
#   scripts/flwr_run.sh [RUN_CONFIG] [FEDERATION_CONFIG]
#
# `flwr run` exits 0 even when the ServerApp raised and leaves its SuperLink running, so this
# script gives the SuperLink a private FLWR_HOME, reads the run's summary.json for the
# verdict, and ends every process of that SuperLink on exit. Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUN_CONFIG=${1:-}
FEDERATION_CONFIG=${2:-"num-supernodes=4 client-resources-num-cpus=1"}
OUT_DIR=${OUT_DIR:-$PWD/results}
RUN_NAME=${RUN_NAME:-run-$(date +%Y%m%d-%H%M%S)}

export FLWR_HOME=${FLWR_HOME:-$(mktemp -d -t adc-flwr-home.XXXXXX)}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
# the ServerApp (2 threads) shares 2 cores with the client actors: spinning OpenMP threads
# would steal their time
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"

stop_superlink() {
    # The SuperLink runs detached, in its own session: end that session (superexec,
    # flwr-simulation and Ray started under it), found through our private FLWR_HOME.
    local pids
    pids=$(pgrep -f "flower-superlink.*$FLWR_HOME" || true)
    for pid in $pids; do
        kill -TERM -- "-$(ps -o sid= -p "$pid" | tr -d ' ')" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 1
    pkill -KILL -f "$FLWR_HOME" 2>/dev/null || true
}
trap stop_superlink EXIT

# A private SuperLink on two free ports, so that runs side by side never share one.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-$(free_port)}
export FLWR_LOCAL_CONTROL_API_PORT=${FLWR_LOCAL_CONTROL_API_PORT:-$(free_port)}

mkdir -p "$OUT_DIR"
flwr run . --stream \
    --run-config "out-dir='$OUT_DIR' run-name='$RUN_NAME' $RUN_CONFIG" \
    --federation-config "$FEDERATION_CONFIG"

summary="$OUT_DIR/$RUN_NAME/summary.json"
status=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$summary" 2>/dev/null || echo missing)
if [ "$status" != completed ]; then
    echo "run $RUN_NAME did not complete (summary status: $status); see $FLWR_HOME/local-superlink/superlink.log" >&2
    exit 1
fi
echo "run $RUN_NAME completed: $summary"
