#!/usr/bin/env bash
# The one prepared device check (issues #3, #4, #6 and #7), for a lent CUDA machine. Installs nothing:
# the device image has torch, torchvision, typer, rich, pillow, safetensors and numpy; byolcli
# runs from the checkout. Prints: the plan byol picks on this GPU, training images/s and
# data-wait % at that plan, that no out-of-memory occurred, and embedding images/s against
# the plain torchvision way with the share of time spent decoding; on a machine with several
# GPUs, data-parallel scaling (images/s on all GPUs over one, issue #6); and issue #7's
# throughput targets (ResNet-18 at 32 px, ResNet-50 at 224 px, with data wait). About 9
# minutes (12 with several GPUs).
#
#   bash benchmarks/gpu_check.sh [IMAGE_FOLDER]     (default: 20,000 generated 533x400 JPEGs)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" BYOL_CACHE_DIR=/tmp/byol-cache
PY=${PYTHON:-python3}
DATA=${1:-/tmp/gpu-check-images}
[ -d "$DATA" ] || $PY benchmarks/make_images.py "$DATA" --count 20000
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== byol train: automatic plan, 2-minute budget"
rm -rf /tmp/gpu-run
set +e
$PY -m byolcli train "$DATA" --time 2m --out /tmp/gpu-run 2>&1 | tee /tmp/gpu-train.log
status=${PIPESTATUS[0]}
set -e
grep -qi "out of memory" /tmp/gpu-train.log && echo "OUT OF MEMORY seen" || echo "no out-of-memory (exit code $status)"
$PY - <<'PY'
import json, statistics
plan = json.load(open("/tmp/gpu-run/plan.json"))
rows = [json.loads(line) for line in open("/tmp/gpu-run/metrics.jsonl")][2:]  # skip start-up
print(f"plan: {plan['backbone']} {plan['image_size']}px batch {plan['batch_size']}x{plan['accumulation']} "
      f"{plan['precision']} workers {plan['workers']} steps {plan['total_steps']}")
print(f"training: median {statistics.median(r['images_per_s'] for r in rows):.0f} images/s, "
      f"median data wait {statistics.median(r['data_wait'] for r in rows):.0%}")
PY

echo "== issue #7 targets: ResNet-18 at 32 px >= 5,000 and ResNet-50 at 224 px >= 1,400 samples/s, data wait < 5%"
for setting in "resnet18 32 90s" "resnet50 224 2m"; do
  set -- $setting
  rm -rf "/tmp/gpu-target-$1"
  $PY -m byolcli -q train "$DATA" --backbone "$1" --image-size "$2" --time "$3" --out "/tmp/gpu-target-$1"
  $PY - "$1" "$2" <<'PY'
import json, statistics, sys
name, size = sys.argv[1], sys.argv[2]
plan = json.load(open(f"/tmp/gpu-target-{name}/plan.json"))
rows = [json.loads(line) for line in open(f"/tmp/gpu-target-{name}/metrics.jsonl")][2:]
print(f"{name} at {size} px: batch {plan['batch_size']}, in memory {plan['in_memory']}, augment on {plan['augment_on']}: "
      f"median {statistics.median(r['images_per_s'] for r in rows):.0f} samples/s, "
      f"median data wait {statistics.median(r['data_wait'] for r in rows):.1%}")
PY
done

echo "== embedding: byolcli vs plain torchvision, same model, size and workers"
$PY benchmarks/embed_throughput.py "$DATA" --model /tmp/gpu-run/encoder.safetensors --rounds 2

GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -gt 1 ]; then
  echo "== scaling: byol train --gpus 1 vs --gpus $GPUS (ResNet-18, 64 px, 256 images per GPU)"
  for n in 1 "$GPUS"; do
    rm -rf "/tmp/gpu-scale-$n"
    $PY -m byolcli -q train "$DATA" --gpus "$n" --time 90s --image-size 64 --batch-size 256 --out "/tmp/gpu-scale-$n"
  done
  $PY - "$GPUS" <<'PY'
import json, statistics, sys
n = int(sys.argv[1])
speed = {k: statistics.median(json.loads(line)["images_per_s"] for line in list(open(f"/tmp/gpu-scale-{k}/metrics.jsonl"))[2:])
         for k in (1, n)}
print(f"scaling: 1 GPU {speed[1]:.0f} images/s, {n} GPUs {speed[n]:.0f} images/s = {speed[n] / speed[1]:.2f}x "
      f"({speed[n] / speed[1] / n:.0%} of linear)")
PY
fi
