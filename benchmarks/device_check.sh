#!/usr/bin/env bash
# The GPU questions in one short run on one GPU, fitted to 4 minutes from a bare machine, install included. Each
# part's budget and how it was estimated: benchmarks/README.md ("GPU checks"). Ordered by value, so that a run cut
# short still answers the first questions; every part runs under its own timeout:
#   0. install: the wheels in $WHEELS, then this project (benchmarks/device_setup.sh)
#   1. bf16 AEMIM quickstart (quickstart_adv.yaml + trainer/gpu.yaml, 2 epochs): a falling loss and no NaN
#   2. MAE and MAE+AEMIM images/s, eager, ViT-B/16 at 224 px, batch 256 (benchmarks/throughput.py)
#   3. FSDP on the one GPU with the plug-in (mae_adv.yaml + trainer/fsdp.yaml, FSDP1 or FSDP2, whichever the config
#      is), activation checkpointing off and on: peak memory of each
#   4. MAE and MAE+AEMIM images/s compiled: a cold Inductor compile takes minutes, so it comes after FSDP and gets
#      the time that is left
#   5. MAE and MAE+AEMIM images/s, eager, at the progressive-resolution sizes below 224 (PROGRESSIVE_SIZES, default
#      160,192), when the library has progressive resolution (advmim_pl/data/resolution.py); else skipped, said so
#   6. NCCL DDP: impossible on one GPU, said so (on two or more it runs the quickstart with trainer/ddp.yaml)
# At the end, one table: part, status, key figure, seconds; also OUT/device_check.{md,json,log} and
# OUT/device_check_throughput.tar (throughput.py's JSON and Markdown files): four files.
#
#   OUT=/tmp/out [WHEELS=.whl] [PYTHON=python3] [DEVICE_CHECK_SECONDS=240] bash benchmarks/device_check.sh
#   OUT=/tmp/out bash benchmarks/device_check.sh --smoke   # every part at toy size on a CPU, about a minute
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
device_smoke device_check.sh "$@"
OUT=${OUT:-benchmarks/results/device_check}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")}
BUDGET=${DEVICE_CHECK_SECONDS:-$([[ ${#SMOKE[@]} -gt 0 ]] && echo 600 || echo 240)}
RESERVE=8  # seconds kept for parts 5 and 6 and the summary
mkdir -p "$OUT" "$WORK"
: >"$WORK/times.tsv"
BEGUN=$(date +%s.%N)

now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$BEGUN" 'BEGIN { printf "%.1f", a - b }'; }
# the smaller of a part's own limit and what the budget leaves it (RESERVE kept for the end), whole seconds
limit() {
  awk -v own="$1" -v budget="$BUDGET" -v used="$(elapsed)" -v keep="$RESERVE" \
    'BEGIN { l = budget - used - keep; if (own < l) l = own; printf "%d", l }'
}
# part N LIMIT COMMAND...: run COMMAND under `timeout LIMIT` (clamped to the budget), log it, time it
part() {
  local n=$1 seconds start code
  seconds=$(limit "$2")
  shift 2
  if ((seconds < 5)); then
    echo -e "$n\t124\t0" >>"$WORK/times.tsv"
    echo "[device check] part $n: no time left in the ${BUDGET} s budget"
    return 124
  fi
  start=$(now)
  { echo "== part $n (limit ${seconds} s): $*"; timeout -k 5 "$seconds" "$@"; } 2>&1 | tee -a "$WORK/part$n.log"
  code=${PIPESTATUS[0]}
  echo -e "$n\t$code\t$(awk -v a="$(now)" -v b="$start" 'BEGIN { printf "%.1f", a - b }')" >>"$WORK/times.tsv"
  return "$code"
}
note() {  # note N STATUS KEY: a part that runs nothing
  printf '{"status": "%s", "key": "%s"}\n' "$2" "$3" >"$WORK/part$1.json"
  echo -e "$1\t0\t0" >>"$WORK/times.tsv"
  echo "[device check] part $1: $2: $3"
}

if ((${#SMOKE[@]})); then  # toy sizes, fp32 (no bf16 units on most CPUs), one thread; compile disabled in part 4
  THROUGHPUT=(--model vit_tiny_patch16_224 --depth 2 --patch-size 4 --batch-size 8 --steps 2 --warmup 1
              --precision 32-true --threads 1)
  FULL=32 SIZES=${PROGRESSIVE_SIZES:-16}
  COMPILE_ENV=(env TORCH_COMPILE_DISABLE=1)
  # one configuration: on a CPU throughput.py starts a process per configuration, and the smoke run tests the
  # script's commands, not the speeds
  CONFIGS="MAE"
else
  THROUGHPUT=(--model vit_base_patch16_224 --patch-size 16 --batch-size 256 --steps 10 --warmup 3)
  FULL=224 SIZES=${PROGRESSIVE_SIZES:-160,192}
  COMPILE_ENV=(env)
  CONFIGS="MAE,MAE+AEMIM PGD-1"
fi
RESULTS=$WORK/throughput  # throughput.py's files, packed into OUT/device_check_throughput.tar at the end
PROGRESSIVE=0
[[ -f advmim_pl/data/resolution.py ]] && PROGRESSIVE=1

# 0. install
part 0 90 bash -c 'source benchmarks/device_setup.sh && device_install'
said=$(tail -n 1 "$WORK/part0.log")
[[ $(tail -n 1 "$WORK/times.tsv" | cut -f2) == 0 ]] && status=ok || status=fail
printf '{"status": "%s", "key": "%s"}\n' "$status" "${said//\"/\'}" >"$WORK/part0.json"

# 1. bf16 AEMIM quickstart
part 1 60 "$PY" benchmarks/device_check.py quickstart --work "$WORK" "${SMOKE[@]}"

# 2. eager images/s
part 2 75 "$PY" benchmarks/throughput.py "${THROUGHPUT[@]}" --img-size "$FULL" --configs "$CONFIGS" --out "$RESULTS"
"$PY" benchmarks/device_check.py throughput --results "$RESULTS" --log "$WORK/part2.log" --work "$WORK" --part 2

# 3. FSDP on one device, checkpointing off, then on (one fresh process each: a peak per configuration)
part 3a 45 "$PY" benchmarks/device_check.py fsdp --checkpointing false --work "$WORK" "${SMOKE[@]}"
part 3b 45 "$PY" benchmarks/device_check.py fsdp --checkpointing true --work "$WORK" "${SMOKE[@]}"

# 4. compiled images/s: what is left, less part 5's share when it runs
((PROGRESSIVE)) && RESERVE=45
part 4 600 "${COMPILE_ENV[@]}" "$PY" benchmarks/throughput.py "${THROUGHPUT[@]}" --img-size "$FULL" --compile \
  --configs "$CONFIGS" --out "$RESULTS"
"$PY" benchmarks/device_check.py throughput --results "$RESULTS" --log "$WORK/part4.log" --work "$WORK" --part 4 \
  --compile
RESERVE=8

# 5. eager images/s at the progressive-resolution sizes below the full one (PROGRESSIVE_SIZES), when it exists
if ((PROGRESSIVE)); then
  for size in ${SIZES//,/ }; do
    part "5-$size" 40 "$PY" benchmarks/throughput.py "${THROUGHPUT[@]}" --img-size "$size" --configs "$CONFIGS" \
      --out "$RESULTS"
  done
  "$PY" benchmarks/device_check.py throughput --results "$RESULTS" --img-size "$SIZES" --work "$WORK" --part 5
else
  note 5 skip "not in this version: advmim_pl has no progressive-resolution option"
fi

# 6. NCCL DDP
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if ((GPUS >= 2)); then
  part 6 60 "$PY" -m advmim_pl.cli fit -c quickstart_adv.yaml -c trainer/ddp.yaml --trainer.devices 2 \
    --trainer.max_steps 20 --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$WORK"
  [[ $(tail -n 1 "$WORK/times.tsv" | cut -f2) == 0 ]] && status=ok || status=fail
  printf '{"status": "%s", "key": "20 steps on %s GPUs"}\n' "$status" "$GPUS" >"$WORK/part6.json"
else
  note 6 skip "impossible on ${GPUS} GPU(s): DDP over NCCL needs two ranks on two GPUs"
fi

# the parts' times: 3a and 3b together as part 3
awk -F'\t' '{p = substr($1, 1, 1); c[p] = (c[p] && c[p] != 0) ? c[p] : $2; s[p] += $3} END {for (p in s) print p "\t" c[p] "\t" s[p]}' \
  "$WORK/times.tsv" >"$WORK/times_by_part.tsv" && mv "$WORK/times_by_part.tsv" "$WORK/times.tsv"
cat "$WORK"/part*.log >"$OUT/device_check.log"
[[ -d "$RESULTS" ]] && tar -C "$RESULTS" -cf "$OUT/device_check_throughput.tar" .
echo
"$PY" benchmarks/device_check.py summary --out "$OUT" --work "$WORK"
echo "[device check] $(elapsed) s of the ${BUDGET} s budget; results in $OUT"
! grep -q '"status": "fail' "$OUT/device_check.json"
