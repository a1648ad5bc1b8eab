#!/usr/bin/env bash
# Run the app with `flwr run .` on a private local SuperLink; exit 0 only when it completed.
#
#   scripts/flwr_run.sh [RUN_CONFIG] [FEDERATION_CONFIG]
#   OUT_DIR (default ./results) and RUN_NAME (default run-<timestamp>) come from the
#   environment; `out-dir` / `run-name` in RUN_CONFIG win over them.
#
# simulations/launcher.py does the work, under simulations/supervise.py: it validates the
# config before anything starts, gives the run its own Flower home, Ray temp dir and free
# ports, judges the run by the summary.json this invocation wrote, and on exit or Ctrl-C /
# SIGTERM ends every process the run started, by PID. Exit status: 0 completed, 1 failed or
# no verdict, 2 invalid config or run directory, 130 interrupted (rerun the same command to
# resume). Needs scripts/setup.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"

exec python -m simulations.launcher "$@"
