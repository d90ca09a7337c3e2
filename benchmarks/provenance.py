"""Where a benchmark figure comes from: the device it ran on and the commit it ran at."""

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device_info(device: torch.device) -> tuple[str, str]:
    """(device description, file-name slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, name.lower().replace(" ", "-")
    cores, cpu = os.cpu_count(), cpu_model() or platform.processor() or platform.machine()
    return f"CPU {cpu}, {cores} cores, torch threads: {torch.get_num_threads()}", f"cpu-{cores}core"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none): float results differ between CPU models,
    so a record says which one made it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def git_commit() -> tuple[str, bool | None]:
    """(short commit or 'unknown', whether tracked files differ from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    except OSError:
        return "unknown", None
    if commit.returncode:
        return "unknown", None
    return commit.stdout.strip(), bool(dirty.stdout.strip())
