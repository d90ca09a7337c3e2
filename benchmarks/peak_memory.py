"""Peak memory of a training configuration, and the largest batch that fits a memory budget.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` (the allocator's peak, reset before each fit). A CPU has
no allocator peak: there the figure is the process's peak resident set size (``ru_maxrss``) above its resident size
before the first fit (interpreter, torch and the libraries), so each configuration runs in a fresh process of its own.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

MIB = 2**20


def status_mib(field: str) -> float:
    """A memory field of this process's ``/proc/self/status`` (Linux), e.g. ``VmRSS`` (resident now) or ``VmHWM``
    (peak resident), in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def peak_resident_mib() -> float:
    """This process's peak resident set size since the last ``PeakMeter`` on the CPU reset it, in MiB."""
    return status_mib("VmHWM")


class PeakMeter:
    """Peak memory of the fits that run between ``start`` and ``read``, in MiB, on ``device``.

    On the CPU the meter resets the process's peak resident set when it is made (``/proc/self/clear_refs``), so that
    the transient peaks of importing torch do not count, and reads the peak above the resident size at that moment.
    Memory freed by one fit may stay resident for the next (the C allocator keeps it), so a CPU meter is not reset
    between fits: successive fits must grow (a smaller batch first), and each configuration needs a fresh process.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.idle = 0.0
        if device.type == "cpu":
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.idle = status_mib("VmRSS")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return peak_resident_mib() - self.idle


def largest_batch(batches: tuple[int, int], peaks: tuple[float, float], budget_mib: float) -> int | None:
    """The largest batch whose peak memory stays within ``budget_mib``, from the peaks at two batch sizes and a
    straight line through them (fixed memory plus a per-image share); None when a figure is missing or the line
    does not grow with the batch."""
    (b1, b2), (m1, m2) = batches, peaks
    if None in (m1, m2) or b1 == b2 or m2 <= m1:
        return None
    per_image = (m2 - m1) / (b2 - b1)
    fixed = m1 - per_image * b1
    return max(0, math.floor((budget_mib - fixed) / per_image))


def default_budget_mib(device: torch.device) -> float:
    """The device's memory: the GPU's total, or the machine's physical memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / MIB
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["MemTotal"].split()[0]) / 1024  # kB


def in_fresh_process(script: Path, argv: list[str]) -> dict:
    """Run ``script argv`` in a new interpreter and return the JSON object on its last output line; a failure
    raises with the child's last lines."""
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(f"{script.name} {' '.join(argv)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(lines[-1])
