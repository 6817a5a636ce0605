#!/usr/bin/env bash
# One prepared run of the GPU path on an H100/H200-class machine, under 8 minutes:
#   1. install the cuda12 extra (pip install -e ".[cuda12]"),
#   2. python -m cbs.doctor (JAX sees the GPU, float64, matmul rate, NQM smoke test),
#   3. the NQM quickstart end to end (cold: empty compilation cache),
#   4. benchmarks/train_speed.py at sizes that fill the card (cells/s, % of the measured
#      matmul peak, ratio against the strong one-program baseline; naive baseline skipped),
#   5. benchmarks/nqm_speed.py --quick,
#   6. configs/train_mnist1d_mlp.yaml (full-size MLP, 9 batch sizes) cut to ~3 minutes
#      (one seed, no K-FAC, 3,000 steps, no adaptive rounds),
# and writes a summary table (markdown) of every step: status, wall seconds and the figures
# of its RESULT line. Each step has its own time limit, so the whole stays under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# --dry-run: the same steps on the CPU with tiny sizes and no install, to check the script
# itself (tests/test_gpu_check.py runs it in the test suite). Predicted GPU figures and the
# roofline they come from: benchmarks/README.md, "gpu_check.sh".
set -u -o pipefail

DRY=0
OUT="gpu_check_out"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (allowed: --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

HERE="$(cd "$(dirname "$0")/.." && pwd)"
cd "$HERE" || exit 2
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.md"
PY="${PYTHON:-python}"
export CBS_JAX_CACHE="$OUT/jax_cache"   # cold figures: a cache folder that starts empty
rm -rf "$CBS_JAX_CACHE"
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  DOCTOR_S=0.1
  QUICK_ARGS=(--no-analysis grid.batch_sizes=[4,1024] grid.learning_rates.num=20 "grid.optimizers=[{kind: sgd, name: sgd_p0, hparams: {precond_power: 0.0}}]")
  TRAIN_SPEED_ARGS=(--size 4,16,100 --skip-naive)
  NQM_SPEED_ARGS=(--quick --sample 1 --sim-steps 5 --skip-cold)
  TRAIN_ARGS=(--no-analysis grid.batch_sizes=[16] grid.seeds=[0] budget.max_steps=20 budget.eval_every=10
    "grid.optimizers=[{kind: sgd}]" grid.learning_rates.num=2 grid.adaptive.enabled=false
    train.width=16)
  LIMITS=(300 300 300 300 300)  # a shared CI machine may be slow; the 8-minute budget is the GPU's
else
  DOCTOR_S=1
  QUICK_ARGS=()
  # 256 cells x width 1024: each step is 256 matmul chains of (64 x 40)(40 x 1024)(1024 x 1024)
  # (1024 x 10), enough batched work to fill an H100/H200 (see the roofline in README).
  TRAIN_SPEED_ARGS=(--size 256,1024,1000 --skip-naive)
  NQM_SPEED_ARGS=(--quick)
  TRAIN_ARGS=(grid.seeds=[0] budget.max_steps=3000 grid.adaptive.enabled=false
    "grid.optimizers=[{kind: sgd}, {kind: momentum, hparams: {momentum: [0.9, 0.99]}, learning_rates: {log10_min: -3.5, log10_max: -0.5, num: 10}}, {kind: adam, hparams: {b2: [0.99, 0.999]}, learning_rates: {log10_min: -4, log10_max: -1, num: 10}}]")
  # doctor, quickstart, train_speed, nqm_speed, train config: caps summing with the install's
  # 60 s to 470 s, so the script ends inside 8 minutes whatever happens
  LIMITS=(30 45 120 45 170)
fi

echo "| step | status | wall s | figures |" > "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"

# step NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs to $OUT/NAME.log and
# adds a summary row with its RESULT line (or the log's last line).
step() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc status figures
  t0=$(date +%s%N)
  echo "== $name: $*" | tee "$OUT/$name.log"
  timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  local wall  # seconds with one decimal, from nanoseconds (no bc on minimal images)
  wall=$(( ($(date +%s%N) - t0) / 100000000 ))
  wall="$((wall / 10)).$((wall % 10))"
  case $rc in
    0) status=ok ;;
    124) status="timed out (${limit} s)" ;;
    *) status="failed (rc $rc)" ;;
  esac
  figures=$(grep -a '^RESULT' "$OUT/$name.log" | tail -1 | sed 's/^RESULT //')
  [ -z "$figures" ] && figures=$(grep -av '^==' "$OUT/$name.log" | tail -1)
  printf '| %s | %s | %s | %s |\n' "$name" "$status" "$wall" "${figures//|//}" >> "$SUMMARY"
  echo "   $status in ${wall} s"
}

if [ "$DRY" = 1 ]; then
  echo "dry run: CPU, tiny sizes, no install" | tee "$OUT/install.log"
else
  # Skipped when JAX already sees a GPU (an offline machine with the extra preinstalled).
  if "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    echo "| install | ok (JAX already sees a GPU; nothing installed) | 0 | |" >> "$SUMMARY"
  else
    step install 60 "$PY" -m pip install -q -e ".[cuda12]"
  fi
fi
step doctor "${LIMITS[0]}" "$PY" -m cbs.doctor --seconds "$DOCTOR_S"
step quickstart "${LIMITS[1]}" "$PY" -m cbs.sweep configs/nqm_quickstart.yaml --no-progress \
  "output.dir=$OUT/quickstart" "${QUICK_ARGS[@]}"
step train_speed "${LIMITS[2]}" "$PY" benchmarks/train_speed.py "${TRAIN_SPEED_ARGS[@]}"
step nqm_speed "${LIMITS[3]}" "$PY" benchmarks/nqm_speed.py "${NQM_SPEED_ARGS[@]}"
step train_mnist1d_mlp "${LIMITS[4]}" "$PY" -m cbs.sweep configs/train_mnist1d_mlp.yaml \
  --no-progress "output.dir=$OUT/train_mnist1d_mlp" "${TRAIN_ARGS[@]}"

TOTAL=$(( $(date +%s) - START ))
{
  echo
  echo "total ${TOTAL} s; device: $("$PY" -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind, len(jax.devices()))' 2>/dev/null); $(uptime)"
} >> "$SUMMARY"
cat "$SUMMARY"
# exit status: 0 when every step passed
! grep -q '| failed\|| timed out' "$SUMMARY"
