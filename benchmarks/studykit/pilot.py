"""Study v2's pilot: MAE after each pilot epoch count against the random encoder, and the step-time ratio."""

import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
from torch import Tensor

from advmim_pl.cli import run
from advmim_pl.report import ReportTable

from .commands import pretrain, pretrain_command
from .design import Preset
from .evaluate import EvalData, encoder_features, evaluate
from .report import pct


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
    result["random encoder"] = evaluate(encoder_features(cli.model.encoder), data, preset, full=False)
    cli = pretrain(preset, "MAE", 0, work / "pilot", max(preset.pilot_epochs), data_args, [here + "EncoderSnapshots"])
    snapshots = callback_of(cli, EncoderSnapshots).states
    for epochs in preset.pilot_epochs:
        cli.model.encoder.load_state_dict(snapshots[epochs])
        result["MAE"][str(epochs)] = evaluate(encoder_features(cli.model.encoder), data, preset, full=False)
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
        *ReportTable(["encoder", "epochs", "probe", "kNN", "probe gain", "kNN gain"], rows).markdown(),
        "",
        f"Seconds per training step: MAE {steps['MAE']:.3f}, MAE+AEMIM {steps['MAE+AEMIM']:.3f}; time ratio "
        f"{pilot['time_ratio']:.2f} (the compute-matched arm trains round(E x ratio) epochs).",
        "",
        verdict,
        "",
        f"{pilot['device']}, commit {pilot['commit']}, {pilot['date']}, {pilot['minutes']:.1f} min.",
    ]
    return "\n".join(lines) + "\n"
