"""The benchmarks' memory figures: the largest batch within a budget from two peaks, and the CPU peak meter."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from peak_memory import largest_batch  # noqa: E402


def test_largest_batch_solves_the_line_through_two_peaks():
    # 100 MiB fixed + 3 MiB per image: 64 images -> 292, 128 -> 484; a 1,000 MiB budget holds 300 images
    assert largest_batch((64, 128), (292.0, 484.0), 1000.0) == 300
    assert largest_batch((64, 128), (292.0, 484.0), 1000.0 - 0.5) == 299  # just under: one image fewer
    assert largest_batch((64, 128), (292.0, 484.0), 50.0) == 0  # the fixed part alone does not fit


def test_largest_batch_is_missing_without_two_growing_figures():
    assert largest_batch((64, 128), (None, 484.0), 1000.0) is None
    assert largest_batch((64, 64), (292.0, 292.0), 1000.0) is None
    assert largest_batch((64, 128), (300.0, 290.0), 1000.0) is None  # a peak that fell: noise, not a line


METER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from peak_memory import PeakMeter
meter = PeakMeter(torch.device("cpu"))
block = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, written, so its pages are resident
del block
print(meter.read())
"""


def test_the_cpu_meter_sees_a_freed_tensor_the_size_it_was():
    # in a fresh process: the peak resident set is process-wide, and a test worker's may be anything already
    done = subprocess.run([sys.executable, "-c", METER, str(BENCHMARKS)], capture_output=True, text=True, check=True)
    assert 60 <= float(done.stdout) <= 80, done.stdout
