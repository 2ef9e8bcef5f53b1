#!/bin/bash
# The memory plan's estimate against the measured peak with the default re-fit (session 34), one
# process per row, launched from this shell so that the peak is the row's own. Prints a JSON line
# per row. ResNet-56 and MobileNetV1 have random weights here (no checkpoint): memory only.
#   PYTHONPATH=src bash benchmarks/memory_plan_refit_rows.sh ../shared/data runs/memory_rows
set -euo pipefail
DATA=${1:?the shared data folder}; OUT=${2:?a folder for the run folders}
CK=$DATA/checkpoints/resnet20_cifar10.pth.tar
mkdir -p "$OUT"
for row in "resnet20-b|--checkpoint $CK|falcon|0.6|" "resnet20-b|--checkpoint $CK|falcon++|0.6|" \
           "resnet56||falcon|0.5|--fisher-samples 20" "mobilenetv1-cifar||falcon|0.5|--fisher-samples 20"; do
  IFS='|' read -r model checkpoint method flops extra <<< "$row"
  run="$OUT/${model}_${method}_$flops"
  # shellcheck disable=SC2086  # the checkpoint and extra flags are word lists
  python -m prunekit prune --model "$model" $checkpoint --data cifar10 --data-dir "$DATA/cifar10" \
    --method "$method" --flops "$flops" $extra --out "$run" > /dev/null 2>&1
  python -c "
import json, sys
d = json.load(open(sys.argv[1] + '/result.json'))
print(json.dumps({'model': sys.argv[2], 'method': sys.argv[3], 'flops': float(sys.argv[4]), 'extra': sys.argv[5],
                  'estimate_mb': d.get('memory_estimate_mb'), 'peak_rss_mb': round(d['peak_rss_mb'], 1),
                  'accuracy': d['accuracy'], 'seconds': round(d['seconds'], 1),
                  'refit_kept': (d.get('refit') or {}).get('kept')}))" "$run" "$model" "$method" "$flops" "$extra"
done
