"""Training-step throughput of MAE, SimMIM and their AEMIM variants (every attack view, PGD-1 and PGD-3), in one run.

Every configuration trains through the real PretrainModule, AEMIM plug-in and Lightning
Trainer on one synthetic batch already in device memory (yielded again for every step: no loading,
no collation, no host-device copy). Per configuration it reports images/s, ms/step, peak memory
(``peak_memory.py``: the allocator's peak on CUDA, the peak resident set above the idle process on the CPU, where
each configuration runs in a fresh process), the largest batch that fits a memory budget (a line through the peaks
at the batch and at half of it), the FLOPs of one training step (forward + attack + backward, counted with
FlopCounterMode on a separate one-step fit) and the achieved TFLOP/s, plus AEMIM / host-method ratios of time,
memory and FLOPs. Suffixes on a configuration name add variants, each with its time and memory ratios to the same
configuration without it: `` +ckpt`` runs activation checkpointing (``PretrainModule(activation_checkpointing=
True)``), `` +fsdp2`` runs FSDP2 on the one device (``FSDP2Strategy``, world size 1: every block a ``fully_shard``
unit; on CUDA a bf16 ``--precision`` runs as FSDP2's bf16 policy with the trainer at 32-true). Both can be
combined (``MAE+AEMIM PGD-1 +fsdp2 +ckpt``).
Results go to benchmarks/results/throughput_<device>_<model>_<img>px_bs<batch>[_compile][_<precision>].{json,md}.

    python benchmarks/throughput.py --model vit_base_patch16_224 --img-size 224 --patch-size 16 \\
        --batch-size 256 [--compile] [--precision bf16-mixed] [--steps 20] [--warmup 5]
    python benchmarks/throughput.py --model vit_tiny_patch16_224 --img-size 32 --patch-size 4 \\
        --batch-size 64 --steps 5 --warmup 2   # CPU smoke run, a few minutes on 2 cores
    python benchmarks/throughput.py ... --configs "MAE,MAE +ckpt,MAE+AEMIM PGD-1,MAE+AEMIM PGD-1 +ckpt"
    python benchmarks/throughput.py ... --configs "MAE+AEMIM PGD-1,MAE+AEMIM PGD-1 +fsdp2,MAE+AEMIM PGD-1 +fsdp2 +ckpt"
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import timm
import torch
from peak_memory import PeakMeter, default_budget_mib, in_fresh_process, largest_batch, peak_resident_mib
from provenance import device_info, git_commit
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from advmim_pl.adversarial import AEMIM, Attacker
from advmim_pl.mim import MAE, Data2Vec2, SimMIM
from advmim_pl.modules import PretrainModule
from advmim_pl.report import ReportTable, write_report
from advmim_pl.sharding import FSDP2Strategy

REPO = Path(__file__).resolve().parents[1]
# name: (host method, PGD steps of the AEMIM plug-in or None, attack_mask, baseline for the ratios)
CONFIGS = {
    "MAE": ("mae", None, None, None),
    "MAE+AEMIM PGD-1": ("mae", 1, "none", "MAE"),
    "MAE+AEMIM PGD-1 complement": ("mae", 1, "complement", "MAE"),
    "MAE+AEMIM PGD-1 same": ("mae", 1, "same", "MAE"),
    "MAE+AEMIM PGD-1 independent": ("mae", 1, "independent", "MAE"),
    "MAE+AEMIM PGD-3": ("mae", 3, "none", "MAE"),
    "SimMIM": ("simmim", None, None, None),
    "SimMIM+AEMIM PGD-1": ("simmim", 1, "none", "SimMIM"),
    "SimMIM+AEMIM PGD-1 complement": ("simmim", 1, "complement", "SimMIM"),
    "SimMIM+AEMIM PGD-1 same": ("simmim", 1, "same", "SimMIM"),
    "data2vec 2.0": ("data2vec2", None, None, None),
    "data2vec 2.0+AEMIM PGD-1": ("data2vec2", 1, "none", "data2vec 2.0"),
}
CHECKPOINTED = " +ckpt"  # suffix of a configuration name: the same with activation checkpointing
SHARDED = " +fsdp2"  # suffix of a configuration name: the same under FSDP2 on the one device
VARIANTS = (SHARDED, CHECKPOINTED)  # in the order they are written after the configuration
RATIOS = {"time_ratio": "ms_per_step", "mem_ratio": "peak_mem_mib", "flop_ratio": "gflop_per_step"}
VARIANT_RATIOS = {  # ratio field: (variant, measured field); the configuration over the same without the variant
    "ckpt_time_ratio": (CHECKPOINTED, "ms_per_step"),
    "ckpt_mem_ratio": (CHECKPOINTED, "peak_mem_mib"),
    "fsdp2_time_ratio": (SHARDED, "ms_per_step"),
    "fsdp2_mem_ratio": (SHARDED, "peak_mem_mib"),
}


def base_config(name: str) -> str:
    """The ``CONFIGS`` entry behind a configuration name (without its variant suffixes)."""
    for suffix in reversed(VARIANTS):
        name = name.removesuffix(suffix)
    return name


def has_variant(name: str, suffix: str) -> bool:
    """Whether configuration ``name`` carries the variant ``suffix`` (``CHECKPOINTED`` or ``SHARDED``)."""
    return suffix in name[len(base_config(name)) :]


def without_variant(name: str, suffix: str) -> str:
    """Configuration ``name`` without the variant ``suffix``."""
    base = base_config(name)
    return base + name[len(base) :].replace(suffix, "")


# FlopCounterMode knows the CUDA attention kernels but not the CPU one timm's attention runs on.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, out_shape=None, **__: (
        sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *_, out_shape=None, **__: (
        sdpa_backward_flop_count(g, q, k, v)
    ),
}


class StepClock(L.Callback):
    """Timestamp at the start of every training batch, after synchronising the device.

    The interval between two starts is one whole loop iteration: forward, attack, backward, optimizer
    and scheduler step, Lightning's hooks, and fetching the next (device-resident) batch.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())


class RepeatedBatch:
    """One (images, labels) batch in device memory, yielded ``length`` times per epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int) -> None:
        self.batch, self.length = (images, labels), length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decoder_choice(args: argparse.Namespace) -> dict:
    """MAE decoder size: the reference 512-d, 8 blocks, 16 heads for ViT-B and wider encoders, else 128/2/4."""
    with torch.device("meta"):
        vit = timm.create_model(
            args.model,
            pretrained=False,
            num_classes=0,
            img_size=args.img_size,
            patch_size=args.patch_size,
            **encoder_kwargs(args),
        )
    reference = vit.embed_dim >= 768
    dim, depth, heads = (512, 8, 16) if reference else (128, 2, 4)
    choice = {
        "dim": args.decoder_dim or dim,
        "depth": args.decoder_depth if args.decoder_depth is not None else depth,
        "heads": args.decoder_heads or heads,
        "encoder_embed_dim": vit.embed_dim,
    }
    automatic = (choice["dim"], choice["depth"], choice["heads"]) == (dim, depth, heads)
    choice["why"] = (
        ("MAE reference decoder (ViT-B and up)" if reference else "small decoder for an encoder narrower than ViT-B")
        if automatic
        else "set on the command line"
    )
    return choice


def encoder_kwargs(args: argparse.Namespace) -> dict:
    """timm create-model overrides of the encoder: ``--depth``."""
    return {"depth": args.depth} if args.depth else {}


def make_method(kind: str, args: argparse.Namespace, decoder: dict):
    """The host of a configuration. data2vec 2.0 has its released ViT-B settings (16 masks per image, top 10 blocks,
    6 convolutions) with the MAE decoder's width for the encoder (``decoder_choice``)."""
    if kind == "mae":
        return MAE(decoder_dim=decoder["dim"], decoder_depth=decoder["depth"], decoder_heads=decoder["heads"])
    if kind == "data2vec2":
        return Data2Vec2(top_k=min(10, args.depth or 12), decoder_dim=decoder["dim"])  # timm's ViTs: 12 blocks and up
    return SimMIM(mask_patch_size=simmim_mask_patch(args))


def simmim_mask_patch(args: argparse.Namespace) -> int:
    """SimMIM mask squares of 2x2 patches (32 px at patch 16, as in the paper) when they tile the image."""
    return 2 * args.patch_size if args.img_size % (2 * args.patch_size) == 0 else args.patch_size


def make_trainer(
    args: argparse.Namespace, max_steps: int, callbacks: list[L.Callback], sharded: bool = False
) -> L.Trainer:
    """A one-device trainer; ``sharded``: under ``FSDP2Strategy``. On CUDA a bf16 ``--precision`` becomes FSDP2's
    policy (bf16 parameters and compute, fp32 reduction) with the trainer at 32-true, as configs/trainer/fsdp.yaml
    has it; elsewhere the policy does not apply and the trainer keeps ``--precision``."""
    precision, strategy = args.precision, "auto"
    if sharded:
        on_cuda = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if on_cuda and args.precision.startswith("bf16"):
            precision = "32-true"
        strategy = FSDP2Strategy(param_dtype="bf16", save_distributed_checkpoint=False)
    return L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        strategy=strategy,
        precision=precision,
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # past the last step: no periodic metric syncs nor the module's logging-step objective passes
        log_every_n_steps=max_steps + 1,
    )


def run_fit(
    name: str,
    args: argparse.Namespace,
    decoder: dict,
    max_steps: int,
    compile: bool,
    clock=None,
    batch_size: int | None = None,
) -> None:
    """Fit a fresh, identically initialised module of configuration ``name`` for ``max_steps`` steps, on batches of
    ``batch_size`` images (default ``args.batch_size``)."""
    kind, attack_steps, attack_mask, _ = CONFIGS[base_config(name)]
    batch_size = batch_size or args.batch_size
    torch.manual_seed(0)
    module = PretrainModule(
        method=make_method(kind, args, decoder),
        encoder=args.model,
        encoder_kwargs=encoder_kwargs(args),
        img_size=args.img_size,
        patch_size=args.patch_size,
        in_chans=3,
        batch_size=batch_size,
        warmup_epochs=0,
        plugin=None if attack_steps is None else AEMIM(Attacker(steps=attack_steps), attack_mask=attack_mask),
        compile=compile,
        activation_checkpointing=has_variant(name, CHECKPOINTED),
    )
    trainer = make_trainer(args, max_steps, [clock] if clock is not None else [], has_variant(name, SHARDED))
    device = trainer.strategy.root_device
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch_size, 3, args.img_size, args.img_size, generator=g, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    trainer.fit(module, RepeatedBatch(images, labels, max_steps))


class GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks on module inputs make
    ``torch.autograd.grad`` with respect to a leaf input (the attack's x_adv) fail; counts go to 'Global'."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def count_flops(name: str, args: argparse.Namespace, decoder: dict) -> int:
    """FLOPs of one training step (matmuls, convolutions, attention; forward, attack and backward)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    counter.mod_tracker = GlobalOnly()
    with counter:
        run_fit(name, args, decoder, max_steps=1, compile=False)
    return counter.get_total_flops()


def release(device: torch.device) -> None:
    """Free the previous fit's memory, restart the peak-memory count and forget compiled graphs (each fit
    compiles fresh modules; without the reset their recompilations pile up against dynamo's cache limit)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(name: str, args: argparse.Namespace, decoder: dict, device: torch.device) -> dict:
    meter, half = PeakMeter(device), max(1, args.batch_size // 2)
    half_peak = None
    if not args.compile:  # a compiled half batch would recompile: its line would mix two graphs
        meter.start()
        run_fit(name, args, decoder, 2, compile=False, batch_size=half)  # smaller first: a CPU peak only grows
        half_peak = meter.read()
    flops = count_flops(name, args, decoder)
    release(device)
    meter.start()
    clock = StepClock(device)
    run_fit(name, args, decoder, args.warmup + args.steps + 1, args.compile, clock)
    peak = meter.read()
    intervals = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    seconds = statistics.median(intervals)
    result = {
        "ms_per_step": 1000 * seconds,
        "ms_per_step_mean": 1000 * statistics.mean(intervals),
        "ms_per_step_all": [1000 * s for s in intervals],
        "images_per_s": args.batch_size / seconds,
        "gflop_per_step": flops / 1e9,
        "gflop_per_image": flops / 1e9 / args.batch_size,
        "tflop_per_s": flops / seconds / 1e12,
        # on the CPU a peak is only per configuration in a process of its own (main() starts one per configuration)
        "peak_mem_mib": peak if device.type == "cuda" or args.child else None,
        "half_batch_peak_mib": half_peak if device.type == "cuda" or args.child else None,
        "process_peak_rss_mib": peak_resident_mib(),  # the whole process, since the meter was made
        "load_avg_1min": os.getloadavg()[0],  # other processes on the machine distort timings
    }
    budget = args.memory_budget_mib or default_budget_mib(device)
    result["memory_budget_mib"] = budget
    result["max_batch_in_budget"] = largest_batch(
        (half, args.batch_size), (result["half_batch_peak_mib"], result["peak_mem_mib"]), budget
    )
    release(device)
    return result


def ratio(result: dict, base: dict | None, field: str) -> float | None:
    """``result[field] / base[field]``; None where either is missing."""
    return result[field] / base[field] if base is not None and result[field] is not None and base[field] else None


def add_ratios(results: dict) -> None:
    """time / memory / FLOP ratios of each AEMIM configuration to its host method (with the same variants), and of
    each configuration with a variant (checkpointing, FSDP2) to the same one without that variant."""
    for name, result in results.items():
        suffixes = name[len(base_config(name)) :]
        host = CONFIGS[base_config(name)][3]
        for key, field in RATIOS.items():
            result[key] = ratio(result, results.get(f"{host}{suffixes}") if host else None, field)
        for key, (suffix, field) in VARIANT_RATIOS.items():
            plain = results.get(without_variant(name, suffix)) if has_variant(name, suffix) else None
            result[key] = ratio(result, plain, field)


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def write_markdown(folder: str, stem: str, report: dict) -> None:
    """Print the results table and write ``<stem>.md`` and ``<stem>.json`` (``report``) to ``folder``."""
    setup, decoder = report["setup"], report["setup"]["mae_decoder"]
    loads = [r["load_avg_1min"] for r in report["results"].values()]
    load = (min(loads), max(loads))
    blocks = f" ({setup['depth']} blocks)" if setup["depth"] else ""
    heading = (
        f"Training-step throughput: {setup['model']}{blocks}, {setup['img_size']} px, patch {setup['patch_size']}, "
        f"batch {setup['batch_size']}"
    )
    lines = [
        f"- device: {report['device']}; torch {report['torch']}, lightning {report['lightning']}, "
        f"timm {report['timm']}; commit {report['commit']}{' (+ local changes)' if report['dirty'] else ''}",
        f"- precision {setup['precision']}, compile {setup['compile']}, {setup['steps']} timed steps after "
        f"{setup['warmup']} warm-up steps; median step",
        f"- MAE decoder {decoder['dim']}-d, {decoder['depth']} blocks, {decoder['heads']} heads ({decoder['why']}; "
        f"encoder {decoder['encoder_embed_dim']}-d); mask ratio 0.75. SimMIM mask squares "
        f"{setup['simmim_mask_patch']} px, ratio 0.6",
        "- AEMIM: the plug-in's defaults (eps 4/255, random start) with the attack view named in the "
        "configuration (none = the whole image, the default), separate aux decoder, branch norms",
        f"- machine load (1-min average after each timed fit): {load[0]:.1f} to {load[1]:.1f} "
        "(above the number of cores, other processes distort the timings)",
    ]
    columns = ["configuration", "images/s", "ms/step", "peak mem (MiB)", "GFLOP/img", "TFLOP/s", "time x", "mem x"]
    columns += ["FLOP x", "time x / FLOP x", "max batch in budget", "ckpt time x", "ckpt mem x"]
    columns += ["fsdp2 time x", "fsdp2 mem x"]
    rows = [
        [
            name,
            f"{r['images_per_s']:,.1f}",
            f"{r['ms_per_step']:.1f}",
            fmt(r["peak_mem_mib"], ",.0f"),
            f"{r['gflop_per_image']:.3f}",
            f"{r['tflop_per_s']:.3f}",
            fmt(r["time_ratio"], ".2f"),
            fmt(r["mem_ratio"], ".2f"),
            fmt(r["flop_ratio"], ".2f"),
            fmt(r["time_ratio"] / r["flop_ratio"] if r["flop_ratio"] else None, ".2f"),
            fmt(r["max_batch_in_budget"], ","),
            fmt(r["ckpt_time_ratio"], ".2f"),
            fmt(r["ckpt_mem_ratio"], ".2f"),
            fmt(r["fsdp2_time_ratio"], ".2f"),
            fmt(r["fsdp2_mem_ratio"], ".2f"),
        ]
        for name, r in report["results"].items()
    ]
    table = ReportTable(columns, rows, align="l" + "r" * (len(columns) - 1))
    path = write_report(folder, stem, [table], report, heading=heading, lines=lines, notes=report["notes"])
    print(f"wrote {path} and .json")


NOTES = [
    "ms/step: median interval between the starts of consecutive training batches, device synchronised at "
    "each (whole loop iteration: forward, attack, backward, AdamW + scheduler step, hooks, next batch).",
    "GFLOP/img and TFLOP/s: FlopCounterMode over one real training step of the same (uncompiled) module "
    "in a separate one-step fit; counts matmuls, convolutions and attention (2 FLOPs per multiply-add), "
    "not element-wise ops or the optimizer.",
    "time x, mem x, FLOP x: ratio to the host method (MAE, or SimMIM); FLOP x is the arithmetic floor of "
    "the time ratio, and time x / FLOP x the overhead above it.",
    "peak mem: torch.cuda.max_memory_allocated over the timed fit on CUDA; on the CPU the peak resident set of a "
    "fresh process per configuration above its size before the first fit (interpreter, torch, libraries).",
    "max batch in budget: the largest batch whose peak stays within the budget, on a straight line through the "
    "peaks at half the batch (a 2-step eager fit) and at the batch; n/a with --compile or a missing figure.",
    "ckpt time x, ckpt mem x: a configuration with activation checkpointing (' +ckpt') over the same without.",
    "fsdp2 time x, fsdp2 mem x: a configuration under FSDP2 on the one device (' +fsdp2': FSDP2Strategy, world size "
    "1, one fully_shard unit per block; on CUDA a bf16 --precision runs as FSDP2's bf16 policy at 32-true, the CPU "
    "keeps --precision) over the same without: the cost of the per-block all-gather and reshard machinery with "
    "nothing to shard.",
    "log_every_n_steps is past the last step, so the module's logging-step extras (objective of clean and "
    "adversarial images and a random-sign example, 3 no-grad encoder passes every log_every_n_steps steps) "
    "are not timed.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name")
    parser.add_argument("--depth", type=int, default=None, help="encoder blocks (default: the model's)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--compile", action="store_true", help="PretrainModule(compile=True)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--decoder-dim", type=int, default=None, help="MAE decoder width (default: by encoder)")
    parser.add_argument("--decoder-depth", type=int, default=None)
    parser.add_argument("--decoder-heads", type=int, default=None)
    parser.add_argument(
        "--memory-budget-mib", type=float, default=None, help="for the max-batch column (default: the device's memory)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default="", help="appended to the file name (_<tag>), so a run keeps an earlier one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one configuration, JSON out
    args = parser.parse_args()
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if base_config(name) not in CONFIGS]
    if unknown:
        parser.error(
            f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}, each optionally followed by "
            f"{SHARDED!r} (FSDP2 on the one device) and/or {CHECKPOINTED!r} (activation checkpointing), in that order"
        )
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = make_trainer(args, 1, []).strategy.root_device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    decoder = decoder_choice(args)
    if args.child:
        print(json.dumps(measure(names[0], args, decoder, device)))
        return
    results = {}
    for name in names:
        if device.type == "cpu":  # a process's peak resident set only grows: one process per configuration
            results[name] = in_fresh_process(Path(__file__), [*sys.argv[1:], "--configs", name, "--child"])
        else:
            results[name] = measure(name, args, decoder, device)
        print(f"{name}: {results[name]['ms_per_step']:.1f} ms/step", flush=True)
    add_ratios(results)

    description, slug = device_info(device)
    commit, dirty = git_commit()
    left_out = ("out", "tag", "configs", "decoder_dim", "decoder_depth", "decoder_heads", "child")
    setup = {k: v for k, v in vars(args).items() if k not in left_out}
    setup.update(mae_decoder=decoder, simmim_mask_patch=simmim_mask_patch(args))
    report = {
        "device": description,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "timm": timm.__version__,
        "commit": commit,
        "dirty": dirty,
        "setup": setup,
        "memory": "torch.cuda.max_memory_allocated per timed fit (reset between configurations)"
        if device.type == "cuda"
        else "peak resident set of a fresh process per configuration, above its size before the first fit",
        "results": results,
        "notes": NOTES,
    }
    suffix = ("_compile" if args.compile else "") + ("" if args.precision == "bf16-mixed" else f"_{args.precision}")
    depth = f"_depth{args.depth}" if args.depth else ""
    tag = f"_{args.tag}" if args.tag else ""
    stem = f"throughput_{slug}_{args.model}{depth}_{args.img_size}px_bs{args.batch_size}{suffix}{tag}"
    write_markdown(args.out, stem, report)


if __name__ == "__main__":
    main()
