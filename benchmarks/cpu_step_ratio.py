"""AEMIM / host-method training-step time ratio on the CPU, measured in one run.

Goes through the real PretrainModule, AdversarialTargetCallback and Lightning Trainer, on a fixed
in-memory batch (no data-loading cost). Default: ViT-Tiny (192-d, 12 blocks), 32 px, patch 4, batch 64.

    python benchmarks/cpu_step_ratio.py [--steps 12] [--precision bf16-mixed] [--out benchmarks/results]
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from advmim_pl.adversarial import AdversarialTargetCallback
from advmim_pl.mim import MAE, SimMIM
from advmim_pl.modules import PretrainModule


class StepTimer(L.Callback):
    """Wall time of each optimizer step (forward, attack, backward, update)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def build(method, args, adversarial: bool) -> PretrainModule:
    torch.manual_seed(0)
    return PretrainModule(
        method=method,
        encoder="vit_tiny_patch16_224",
        img_size=args.img_size,
        patch_size=args.patch_size,
        in_chans=3,
        batch_size=args.batch_size,
        warmup_epochs=0,
        adversarial=adversarial,
    )


def time_config(name: str, method, steps: int, warmup: int, args) -> float:
    """Median seconds per training step of one configuration."""
    attack_steps = {"": None, "+AEMIM PGD-1": 1, "+AEMIM PGD-3": 3}[name.split(" ", 1)[1] if " " in name else ""]
    module = build(method, args, adversarial=attack_steps is not None)
    timer = StepTimer()
    callbacks = [timer]
    if attack_steps is not None:
        callbacks.append(AdversarialTargetCallback(steps=attack_steps, log_images_every_n_steps=0))
    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size)
    data = DataLoader(TensorDataset(images, torch.zeros(args.batch_size, dtype=torch.long)), batch_size=args.batch_size)
    trainer = L.Trainer(
        max_steps=steps + warmup,
        max_epochs=-1,
        accelerator="cpu",
        precision=args.precision,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    trainer.fit(module, data)
    return statistics.median(timer.times[warmup:])


def time_encoder_pass(method, repeats: int, args) -> float:
    """Median seconds of one no-grad clean encoder pass under the step's mask: what a design that crafts
    x_a in the callback *before* the step would pay on top of ours (it cannot reuse the step's encoding)."""
    module = build(method, args, adversarial=False)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size)
    mask = method.sample_mask(module.encoder, args.batch_size, x.device)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(repeats):
            start = time.perf_counter()
            method.encode(module.encoder, x, mask)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--out", default=None, help="folder for a JSON copy of the figures")
    args = parser.parse_args()
    mae = MAE(decoder_dim=128, decoder_depth=2, decoder_heads=4)
    simmim = SimMIM(mask_patch_size=args.patch_size * 2)
    configs = {
        "MAE": mae,
        "MAE +AEMIM PGD-1": mae,
        "MAE +AEMIM PGD-3": mae,
        "SimMIM": simmim,
        "SimMIM +AEMIM PGD-1": simmim,
    }
    # two rounds, configurations interleaved, best median kept: slow drifts of a shared machine hit all alike
    rounds = [{name: time_config(name, m, args.steps, args.warmup, args) for name, m in configs.items()} for _ in "ab"]
    seconds = {name: min(r[name] for r in rounds) for name in configs}
    encoder_pass = time_encoder_pass(mae, args.steps, args)
    print(
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"ViT-Tiny {args.img_size}px patch {args.patch_size}, batch {args.batch_size}, {args.precision}"
    )
    print(f"{'configuration':<22}{'ms/step':>10}{'img/s':>10}{'ratio':>8}")
    for name, s in seconds.items():
        base = seconds[name.split(" ")[0]]
        print(f"{name:<22}{1000 * s:>10.1f}{args.batch_size / s:>10.1f}{s / base:>8.2f}")
    aemim = seconds["MAE +AEMIM PGD-1"]
    print(
        f"callback-before-step design: +{1000 * encoder_pass:.1f} ms (one no-grad encoder pass), "
        f"ratio {(aemim + encoder_pass) / seconds['MAE']:.2f} instead of {aemim / seconds['MAE']:.2f}"
    )
    if args.out:
        out = Path(args.out) / "cpu_step_ratio.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"args": vars(args), "seconds_per_step": seconds, "encoder_pass": encoder_pass}, indent=2)
        )
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
