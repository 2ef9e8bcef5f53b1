#!/bin/bash
# The memory plan's estimate against the measured peak with the default re-fit (session 34), one
# process per row, launched from this shell so that the peak is the row's own. Prints a JSON line
# per row. ResNet-56 and MobileNetV1 have random weights here (no checkpoint): memory only.
#   PYTHONPATH=src PYTHON=/work/venv/bin/python bash benchmarks/memory_plan_refit_rows.sh ../shared/data runs/memory_rows
# PYTHON: the interpreter with torch and prunekit's requirements (default python3); a row that fails
# prints the last lines of its prune's output and stops the script (exit 1). OUT must not hold the
# rows' run folders already (prune refuses an existing --out).
set -euo pipefail
PYTHON=${PYTHON:-python3}
DATA=${1:?the shared data folder}; OUT=${2:?a folder for the run folders}
"$PYTHON" -c "import torch, prunekit" 2>/dev/null || {
    echo "$PYTHON cannot import torch and prunekit: set PYTHON=/path/to/venv/bin/python and PYTHONPATH=src" >&2; exit 2; }
[[ -d $DATA/cifar10 ]] || { echo "$DATA/cifar10: no such folder; pass the shared data folder" >&2; exit 2; }
CK=$DATA/checkpoints/resnet20_cifar10.pth.tar
mkdir -p "$OUT"
for row in "resnet20-b|--checkpoint $CK|falcon|0.6|" "resnet20-b|--checkpoint $CK|falcon++|0.6|" \
           "resnet56||falcon|0.5|--fisher-samples 20" "mobilenetv1-cifar||falcon|0.5|--fisher-samples 20"; do
  IFS='|' read -r model checkpoint method flops extra <<< "$row"
  run="$OUT/${model}_${method}_$flops"
  log="$OUT/${model}_${method}_$flops.log"
  # shellcheck disable=SC2086  # the checkpoint and extra flags are word lists
  if ! "$PYTHON" -m prunekit prune --model "$model" $checkpoint --data cifar10 --data-dir "$DATA/cifar10" \
      --method "$method" --flops "$flops" $extra --out "$run" > "$log" 2>&1; then
    echo "row $model $method $flops failed (its output: $log); last lines:" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
  "$PYTHON" -c "
import json, sys
d = json.load(open(sys.argv[1] + '/result.json'))
print(json.dumps({'model': sys.argv[2], 'method': sys.argv[3], 'flops': float(sys.argv[4]), 'extra': sys.argv[5],
                  'estimate_mb': d.get('memory_estimate_mb'), 'peak_rss_mb': round(d['peak_rss_mb'], 1),
                  'accuracy': d['accuracy'], 'seconds': round(d['seconds'], 1),
                  'refit_kept': (d.get('refit') or {}).get('kept')}))" "$run" "$model" "$method" "$flops" "$extra"
done
