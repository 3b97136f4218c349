#!/usr/bin/env bash
# ELPV from good parts only, next to the supervised classifier on the same split.
# Runs examples/elpv/run.sh first when no supervised run is given (about 10 minutes on 2 CPU
# cores), then fits the anomaly model on the functional cells with defect probability 0 and
# prints both models' test metrics. Pass an existing supervised run folder to skip its training:
#   bash examples/elpv/run_anomaly.sh runs/binary-tf_efficientnet_lite0-1
set -euo pipefail
cd "$(dirname "$0")/../.."
work=.examples
classifier=${1:-}
if [ -z "$classifier" ]; then
  classifier="$work/elpv-runs/classifier"
  if [ ! -f "$classifier/metrics.json" ]; then
    bash examples/elpv/run.sh --out "$classifier" --force
  fi
fi
python examples/elpv/anomaly.py --classifier-run "$classifier" --work "$work"
