#!/usr/bin/env bash
# All GPU checks in one short run on one GPU:
#   throughput at the speed targets (ViT-B/16 224 px batch 256 bf16, eager and compiled; ViT-Tiny
#   32 px end to end on GPU-resident Fashion-MNIST), an FSDP fit on one GPU with the plug-in, and a bf16
#   AEMIM quickstart, and the input-pipeline benchmark on the GPU machine's CPU cores (ImageFolder decode pil / fast
#   against torchvision's reference, 1 to 8 workers; it builds its JPEGs from scikit-image's and foolbox's bundled
#   photographs, so both must be installed there: pip install -e '.[bench]'). Results (JSON/Markdown named with the
#   device) go to benchmarks/results/ and to $OUT.
# Usage on a GPU machine with torch, timm and lightning, after `pip install --no-deps -e .` and jsonargparse:
#   OUT=/tmp/out bash benchmarks/device_check.sh
set -euo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run() { echo "== $*"; "$@" 2>&1 | tail -n 25; }

# 1. Speed targets: MAE >= 5,000 img/s, AEMIM PGD-1 >= 2,200 img/s, time ratio <= 2.3, memory ratio <= 1.7
run python benchmarks/throughput.py --model vit_base_patch16_224 --img-size 224 --patch-size 16 \
  --batch-size 256 --steps 10 --warmup 5
run python benchmarks/throughput.py --model vit_base_patch16_224 --img-size 224 --patch-size 16 \
  --batch-size 256 --steps 10 --warmup 5 --compile
run python benchmarks/throughput.py --model vit_tiny_patch16_224 --img-size 32 --patch-size 4 \
  --batch-size 1024 --steps 20 --warmup 5 --compile

# 2. ViT-Tiny MAE end to end through Lightning on GPU-resident Fashion-MNIST (target >= 30,000 img/s)
run python -m advmim_pl.cli fit -c quickstart.yaml -c trainer/gpu.yaml \
  --data.init_args.device_resident true \
  --data.init_args.batch_size 1024 --model.init_args.compile true --trainer.max_epochs 20 \
  --trainer.limit_val_batches 0 --trainer.enable_progress_bar false --trainer.logger false

# 3. FSDP on one GPU with the plug-in: the attack through sharded blocks, a few steps, finite loss
run python -m advmim_pl.cli fit -c quickstart_adv.yaml -c trainer/fsdp.yaml --trainer.devices 1 \
  --trainer.max_steps 20 --trainer.limit_val_batches 2 --trainer.enable_progress_bar false

# 4. bf16 AEMIM quickstart on the GPU (falling loss, no NaN)
run python -m advmim_pl.cli fit -c quickstart_adv.yaml -c trainer/gpu.yaml --trainer.max_epochs 2 \
  --trainer.enable_progress_bar false

# 5. Input pipeline on this machine's cores: images/s per worker of each data path, and the cores to feed one GPU
run python benchmarks/input_pipeline.py --workers 1,2,4,8 --rounds 2

cp benchmarks/results/throughput_*.{json,md} benchmarks/results/input_pipeline_*.{json,md} "$OUT"/ 2>/dev/null || true
echo "device checks done"
