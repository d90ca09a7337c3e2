"""Runs of several processes, with a deadline instead of a hang: launcher commands (torchrun, ``advmim fit``) with
their output in files, processes spawned by the test process itself, and a callback for runs started by a launcher
(torchrun): what each process saw, written to a file per rank."""

import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from filelock import FileLock

FAILED_GRACE = 30  # s that the other processes have to end once one failed


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_processes(commands: list[list[str]], logs: list[Path], timeout: float, **popen) -> list[int]:
    """Run the commands at once, each with its stdout and stderr in its log file (a file: an unread pipe would stop
    a process that writes more than its buffer), and wait for all of them. Returns their exit statuses.

    They have ``timeout`` seconds in all, and 30 s after one of them failed (the others may wait for it forever).
    Past that, every process they started (torchrun's workers run in sessions of their own) gets SIGABRT, whose
    faulthandler (``PYTHONFAULTHANDLER``, set here) writes each Python thread's stack to the log, then SIGKILL; and
    the test fails with the last lines of every log."""
    env = {**popen.pop("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    processes = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, **popen))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in processes):
            deadline = min(deadline, time.monotonic() + FAILED_GRACE)
        time.sleep(0.2)
    if any(p.poll() is None for p in processes):
        tree = descendants([p.pid for p in processes])
        signal_all(tree, signal.SIGABRT)
        time.sleep(3)  # the stacks reach the logs
        signal_all(tree, signal.SIGKILL)
        for process in processes:
            process.wait()
        ends = [f"--- {log} (exit {p.returncode}):\n{tail(log)}" for p, log in zip(processes, logs, strict=True)]
        pytest.fail(f"no result after {timeout:.0f} s, or {FAILED_GRACE} s after a failure:\n" + "\n".join(ends))
    return [process.returncode for process in processes]


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (Linux: the parent links in /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # the process ended
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # it ended


class DeadlinePassed(BaseException):
    """Raised by ``deadline`` from its SIGALRM handler; a BaseException, so that no ``except Exception`` on the way
    (a launcher's join loop, Lightning's) takes it for an error of its own."""


@contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Fail the test after ``seconds`` instead of hanging on processes the test process spawned (``ddp_spawn``,
    ``torch.multiprocessing.spawn``): SIGALRM interrupts the wait, the children are killed, and the test fails; the
    ranks' output (inherited file descriptors) is in the test's captured output. Main thread only."""

    def expire(signum, frame):
        raise DeadlinePassed  # not a TimeoutError: that is an OSError, which multiprocessing's join swallows

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    except DeadlinePassed:
        for child in multiprocessing.active_children():
            child.kill()
        pytest.fail(f"{what}: no result after {seconds} s; the ranks were killed (their output: captured stderr)")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def computed_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``make(folder)`` fills once per test run, shared by the pytest-xdist workers: the
    first to ask fills it under a file lock, the others wait for it. A ``make`` that fails leaves it to the next."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder all workers of this run share
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


def sample_ids(images: torch.Tensor) -> list[int]:
    """The sample index each image (float in [0, 1]) shows in its red level, 8 + 6 x index of 255: the flat-colour
    images the two-node test writes."""
    return ((images[:, 0].mean(dim=(1, 2)) * 255 - 8) / 6).round().long().tolist()


class RecordRank(L.Callback):
    """Saves ``out_dir / f"rank{global_rank}.pt"`` at the end of training: num_nodes, node_rank, world_size,
    global_rank, the torchrun restart that ran it (``TORCHELASTIC_RESTART_COUNT``), the step it started at (0, or
    the resumed checkpoint's), the sample indices of every training batch it trained and the final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.ids: list[int] = []
        self.start_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)  # two processes on two cores

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids += sample_ids(batch[0])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = dict(
            num_nodes=trainer.num_nodes,
            node_rank=trainer.node_rank,
            world_size=trainer.world_size,
            global_rank=trainer.global_rank,
            restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            start_step=self.start_step,
            ids=self.ids,
            weights={name: value.detach().clone() for name, value in pl_module.state_dict().items()},
        )
        torch.save(record, Path(self.out_dir, f"rank{trainer.global_rank}.pt"))
