"""benchmarks/throughput.py's configuration variants (activation checkpointing, FSDP2 on one device): names, and
which measured configuration each ratio divides by."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import throughput  # noqa: E402

sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize(
    ("name", "base", "sharded", "checkpointed"),
    [
        ("MAE", "MAE", False, False),
        ("MAE +ckpt", "MAE", False, True),
        ("MAE+AEMIM PGD-1 +fsdp2", "MAE+AEMIM PGD-1", True, False),
        ("MAE+AEMIM PGD-1 +fsdp2 +ckpt", "MAE+AEMIM PGD-1", True, True),
    ],
)
def test_a_name_splits_into_its_configuration_and_variants(name, base, sharded, checkpointed):
    assert throughput.base_config(name) == base
    assert throughput.has_variant(name, throughput.SHARDED) is sharded
    assert throughput.has_variant(name, throughput.CHECKPOINTED) is checkpointed


def test_each_ratio_divides_by_the_configuration_without_that_variant_or_host():
    # ms per step and peak MiB, distinct primes so that every quotient names its pair
    measured = {
        "MAE": (2.0, 3.0),
        "MAE +fsdp2": (5.0, 7.0),
        "MAE+AEMIM PGD-1": (11.0, 13.0),
        "MAE+AEMIM PGD-1 +fsdp2": (17.0, 19.0),
        "MAE+AEMIM PGD-1 +fsdp2 +ckpt": (23.0, 29.0),
    }
    results = {
        name: {"ms_per_step": ms, "peak_mem_mib": mib, "gflop_per_step": 1.0} for name, (ms, mib) in measured.items()
    }
    throughput.add_ratios(results)
    both = results["MAE+AEMIM PGD-1 +fsdp2 +ckpt"]
    assert both["ckpt_time_ratio"] == 23.0 / 17.0 and both["ckpt_mem_ratio"] == 29.0 / 19.0
    assert both["fsdp2_time_ratio"] is None  # "MAE+AEMIM PGD-1 +ckpt" was not measured
    assert both["time_ratio"] is None  # nor "MAE +fsdp2 +ckpt"
    sharded = results["MAE+AEMIM PGD-1 +fsdp2"]
    assert sharded["fsdp2_time_ratio"] == 17.0 / 11.0 and sharded["fsdp2_mem_ratio"] == 19.0 / 13.0
    assert sharded["time_ratio"] == 17.0 / 5.0 and sharded["mem_ratio"] == 19.0 / 7.0  # host under FSDP2 too
    assert results["MAE +fsdp2"]["fsdp2_time_ratio"] == 5.0 / 2.0
    assert results["MAE"]["fsdp2_time_ratio"] is None and results["MAE"]["ckpt_time_ratio"] is None
    results["MAE"]["peak_mem_mib"] = None  # a missing figure gives a missing ratio, not a number
    throughput.add_ratios(results)
    assert results["MAE +fsdp2"]["fsdp2_mem_ratio"] is None and results["MAE +fsdp2"]["fsdp2_time_ratio"] == 2.5
