#!/usr/bin/env bash
# The decisive sweep (kava/presets/sweeps/decisive.yaml: 6 variants x 3 seeds, 2,000 KaVa steps) on a lent machine
# with one GPU and 16 cores, inside one 10-minute command. 14 single-thread workers share the GPU (the demo
# model is tiny, so one process leaves the GPU mostly idle). The sweep is resumable: if the time box ends first,
# the finished runs are kept under OUT and the same command continues them on the next machine.
#
# Usage: bash experiments/gpu_sweep.sh OUT [--workers N] [--seconds S]
#   OUT/sweep/            the sweep directory (runs, report_valid.{md,json,png} once every run is done)
#   OUT/gpu_sweep.log     the log; OUT/progress.txt the runs finished when the time box ended
# Quick CPU smoke test of this script: SPEC=<a small spec> bash experiments/gpu_sweep.sh /tmp/x --seconds 60
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: gpu_sweep.sh OUT [--workers N] [--seconds S]}"; shift
WORKERS=14
SECONDS_BOX=540
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) WORKERS="$2"; shift ;;
    --seconds) SECONDS_BOX="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
SPEC="${SPEC:-kava/presets/sweeps/decisive.yaml}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi: CPU only"
  nproc
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/gpu_sweep.log" 2>&1
timeout --signal=TERM --kill-after=30 "$SECONDS_BOX" \
  "$PY" -m kava sweep "$SPEC" --output "$OUT/sweep" --workers "$WORKERS" --threads 1 >> "$OUT/gpu_sweep.log" 2>&1
rc=$?
echo "sweep exit code $rc (124: the time box ended; run the same command again to continue)" >> "$OUT/gpu_sweep.log"
# What finished, run by run (the report needs every run).
find "$OUT/sweep" -name 'result_valid.json' | sort > "$OUT/progress.txt"
for f in $(cat "$OUT/progress.txt"); do
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); m=r['modes'][r['primary_mode']]; print(r['variant'], r['seed'], m['accuracy'], m['n'])" "$f"
done >> "$OUT/progress.txt"
grep -v '^train:' "$OUT/gpu_sweep.log" | tail -40
exit $rc
