#!/usr/bin/env bash
# Install (scripts/setup.sh), then train the embedded default with `flwr run .`:
# Fashion-MNIST, the vit-cpu preset, ADC at compression 0.1, SplitFed over 4 SuperNodes.
# Optional arguments: extra --run-config pairs, e.g. "method='none' num-server-rounds=5".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec bash scripts/flwr_run.sh "${1:-}" "num-supernodes=4 client-resources-num-cpus=1"
