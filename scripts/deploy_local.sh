#!/usr/bin/env bash
# Run the app with `flwr run .` on a local Flower deployment: one SuperLink and N SuperNodes
# on 127.0.0.1, over TLS, with SuperNode authentication; exit 0 only when the run completed.
#
#   scripts/deploy_local.sh N [RUN_CONFIG]
#   N: SuperNodes, 1 to 32 (SuperNode i holds partition-id=i num-partitions=N).
#   OUT_DIR (default ./results) and RUN_NAME (default run-<timestamp>) come from the
#   environment; `out-dir` / `run-name` in RUN_CONFIG win over them.
#
# simulations/deploy.py does the work, under simulations/supervise.py: it validates the
# config before anything starts, generates a throw-away CA, a server certificate for
# 127.0.0.1 and a key pair per SuperNode (registered with `flwr supernode register`) in a
# private directory, judges the run by the summary.json this invocation wrote, and on exit or
# Ctrl-C / SIGTERM ends every process it started, by PID, and removes the directory. Exit status: 0 completed, 1 failed, no verdict
# or the deployment did not start, 2 invalid N or config, 130 interrupted (rerun the same
# command to resume). Needs scripts/setup.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"

exec python -m simulations.deploy "$@"
