#!/usr/bin/env bash
# One prepared GPU session (#22): run it through the device tool from the repository root, e.g.
#   run(command="bash benchmarks/device_run.sh", timeout_s=580)
# The device image has python3 with torch, transformers, peft, accelerate and safetensors (../.library/device/KINDS.md);
# offsite runs from src/ (no install, nothing fetched). Wheels for anything missing go in wheels/ (carry it).
# Figures go to $OUT (throughput-<shape>.json, device.txt); each step is bounded so the whole stays inside one call.
# CPU smoke test here: OUT=/tmp/out DEVICE_RUN_TINY=1 bash benchmarks/device_run.sh
# Not here: the frontier grid. It needs SmolLM2's real weights (the smallest form that ships, the package's
# Q4_1 GGUF, is 98 MB), and at most 64 MiB of working tree travels to the device, which cannot download.
set -uo pipefail
OUT=${OUT:-/tmp/offsite-device-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-index --find-links wheels wheels/*.whl >"$OUT/pip.txt" 2>&1 || echo "wheel install failed (see pip.txt)"
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  $PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"; } >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
if [ -n "${DEVICE_RUN_TINY:-}" ]; then
  shapes="smollm2 opt-tiny"; extra="--tiny --steps 1"; limit=300
else
  shapes="opt-1.3b llama-1b"; extra="--steps 10 --batch 1 --seq 512"; limit=240
fi
for shape in $shapes; do
  echo "=== throughput $shape"
  THROUGHPUT_SHAPE=$shape timeout "$limit" $PY benchmarks/throughput.py $extra --out "$OUT/throughput-$shape.json" 2>&1 | tail -20
done
ls -la "$OUT"
