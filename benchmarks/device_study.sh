#!/usr/bin/env bash
# The study's question on one GPU in one 7-minute window, install included: MAE, MAE+AEMIM and MAE+sign, 3 paired
# seeds, ViT-Tiny width on GPU-resident Fashion-MNIST (60,000 images), read out on the GPU by a converged
# logistic-regression probe, kNN and a fine-tune with 10% of the labels. The design, the rule that decides and the
# sizing were written in benchmarks/README.md ("device_study.sh") before any run. Seed-major: a seed starts only
# when it can end within the budget, so a run cut short leaves complete seeds.
#
#   OUT=/tmp/out FASHION_MNIST=.data/fashion-mnist [WHEELS=.whl] [PYTHON=python3] [DEVICE_STUDY_SECONDS=420] \
#     bash benchmarks/device_study.sh
#   OUT=/tmp/out bash benchmarks/device_study.sh --smoke   # every job of two seeds at toy size on a CPU, about a minute
#
# FASHION_MNIST: the folder of the four IDX files, .gz or not (Debian's dataset-fashion-mnist installs them in
# /usr/share/datasets/fashion-mnist, the default; 30 MiB gzipped, so they can travel with the code). Out: OUT/
# device_study.{json,md,log} and the encoders, OUT/device_study_encoders_<k>.tar (two per file of at most 15 MiB).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
device_smoke device_study.sh "$@"
OUT=${OUT:-benchmarks/results/device_study}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/device_study.XXXXXX")}
BUDGET=${DEVICE_STUDY_SECONDS:-$([[ ${#SMOKE[@]} -gt 0 ]] && echo 600 || echo 420)}
DATA=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT" "$WORK/fashion-mnist"
BEGUN=$(date +%s.%N)
elapsed() { awk -v a="$(date +%s.%N)" -v b="$BEGUN" 'BEGIN { printf "%.1f", a - b }'; }

timeout -k 5 90 bash -c 'source benchmarks/device_setup.sh && device_install' || exit 1
echo "[device study] install: $(elapsed) s"

# the IDX files uncompressed once, so that each of the study's fits reads them without gunzip
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [[ -f "$DATA/$name.gz" ]]; then
    gunzip -c "$DATA/$name.gz" >"$WORK/fashion-mnist/$name" || exit 1
  elif [[ -f "$DATA/$name" ]]; then
    cp "$DATA/$name" "$WORK/fashion-mnist/$name"
  else
    echo "FASHION_MNIST=$DATA has no $name(.gz): give the folder of the four Fashion-MNIST IDX files"
    exit 2
  fi
done

# the study stops starting seeds MARGIN seconds before the budget (its start-up and the last report); the timeout
# ends it at the budget whatever happens
MARGIN=20
LEFT=$(awk -v b="$BUDGET" -v e="$(elapsed)" 'BEGIN { printf "%d", b - e }')
if ((LEFT < MARGIN + 30)); then
  echo "[device study] $LEFT s left of the $BUDGET s budget after the install: too little for one seed"
  exit 124
fi
MINUTES=$(awk -v l="$LEFT" -v m="$MARGIN" 'BEGIN { printf "%.2f", (l - m) / 60 }')
echo "[device study] $LEFT s left of $BUDGET: seeds start while they fit in $MINUTES min"
timeout -k 5 "$LEFT" "$PY" benchmarks/device_study.py "${SMOKE[@]}" --fashion-mnist-root "$WORK/fashion-mnist" \
  --out "$OUT" --workdir "$WORK/runs" --minutes "$MINUTES" 2>&1 | tee "$OUT/device_study.log"
code=${PIPESTATUS[0]}
echo "[device study] $(elapsed) s of the $BUDGET s budget (exit $code); results in $OUT"
exit "$code"
