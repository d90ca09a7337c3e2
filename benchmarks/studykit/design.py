"""Study v2's design: the arms, the comparisons and the decision rule's pair, the metrics, and the presets."""

from dataclasses import dataclass

from advmim_pl.eval.probes import ProbeSettings


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
    robust_images=8,
    mnist_folds=2,
    eval_batch=100,
    limit_train=300,
    limit_test=100,
    limit_mnist=400,
    extra=("--trainer.limit_train_batches=2", "--data.init_args.batch_size=32", "--trainer.log_every_n_steps=1"),
)
# the same for the gpu configs, in fp32: bf16 autocast makes each step several times slower on a CPU without bf16
# units, and the smoke runs test the configs and the job list, not the precision
SMOKE_GPU_SIZES = SMOKE_SIZES | dict(extra=(*SMOKE_SIZES["extra"], "--trainer.precision=32-true"))

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
        arms=("MAE", "MAE+AEMIM", "MAE compute-matched", "SimMIM+AEMIM"),  # SimMIM+AEMIM runs the SimMIM config
        screen=("MAE+AEMIM eps 8",),
        **SMOKE_GPU_SIZES,
    ),
}

CONTINUE = (
    "cpu-continue",
    "smoke-continue",
    "gpu-continue",
    "smoke-gpu-continue",
)  # the continuation study's presets (continuation.py)
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
