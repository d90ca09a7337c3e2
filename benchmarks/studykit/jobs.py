"""The records file and the jobs: which (seed, arm) to run, claimed across processes under a file lock."""

import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .design import PIXELS


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


ROUNDING = 1e-6  # float32 rounding of a fraction (older records hold float32 means); one image of 10,000 is 1e-4


def replace_record(records: list[dict], record: dict) -> str:
    """Put ``record`` in ``records`` in place of an earlier run of its arm and seed; say how they compare: which
    metrics differ by more than float32 rounding (``ROUNDING``), the corruption keys counted together."""
    key = (record["arm"], record["seed"])
    index = next((i for i, r in enumerate(records) if (r["arm"], r["seed"]) == key), None)
    if index is None:
        records.append(record)
        return "new"
    earlier, records[index] = records[index], record
    old, new = earlier["metrics"], record["metrics"]
    run = f"the earlier run (commit {earlier['commit']}, {earlier['device']})"
    if old == new:
        return f"reproduced exactly {run}"
    changed = sorted(
        k for k in old.keys() | new.keys() if k not in old or k not in new or abs(old[k] - new[k]) > ROUNDING
    )
    if not changed:
        return f"reproduced {run} to float32 rounding ({ROUNDING:g})"
    corruption = [k for k in changed if k.startswith("corruption/")]
    named = [k for k in changed if k not in corruption] + ([f"{len(corruption)} corruption keys"] if corruption else [])
    diff = max((abs(old[k] - new[k]) for k in old.keys() & new.keys()), default=math.nan)
    return f"differs from {run} in {', '.join(named)}: max |diff| {diff:.4g}"


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


def release(claims: Path, job: tuple[int, str]) -> None:
    """Drop this process's claim of ``job`` (seed, arm), once its record is written; call under the lock."""
    held = json.loads(claims.read_text())
    held.pop(f"{job[0]}/{job[1]}", None)
    claims.write_text(json.dumps(held))


def save(results: Path, lock: Path, claims: Path, job: tuple[int, str], record: dict, report) -> str:
    """Under the lock: ``record`` written into ``results`` (replacing an earlier run of ``job``), the job's claim
    dropped and ``report(records)`` rebuilt. Returns ``replace_record``'s verdict."""
    with locked(lock):
        records = read_records(results)
        verdict = replace_record(records, record)
        results.write_text(json.dumps(records, indent=1) + "\n")
        release(claims, job)
        report(records)
    return verdict


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@dataclass
class Budget:
    """A time budget of ``minutes`` (None: none) from its creation: it allows no job that could end after it,
    allowing for the longest job so far."""

    minutes: float | None
    begun: float = field(default_factory=time.perf_counter)
    longest: float = 0.0

    def allows(self) -> bool:
        return self.minutes is None or (time.perf_counter() - self.begun) / 60 + self.longest <= self.minutes

    def took(self, minutes: float) -> None:
        self.longest = max(self.longest, minutes)


def say_what_is_left(label: str, jobs: list[tuple[int, str]], budget: Budget) -> None:
    """The line that says how many ``jobs`` are left, when the ``budget`` stopped the run before they ran out."""
    if jobs and not budget.allows():
        print(f"[{label}] {budget.minutes} min budget: {len(jobs)} jobs left for a later run")


def run_jobs(label: str, jobs: list[tuple[int, str]], work: Path, results: Path, again: bool, budget: Budget, job,
             report, headline) -> None:  # fmt: skip
    """Run ``jobs`` ((seed, arm) pairs) one at a time while the ``budget`` allows, each claimed across processes
    (``claim``; recorded ones too when ``again``). ``job(seed, arm, records)`` runs one and returns its record (its
    ``minutes`` a dict of phases); the record replaces an earlier one in ``results`` and ``report(records)``
    rebuilds the report, both under the lock, before the next job starts; ``headline(record)`` is printed with how
    it compares to an earlier run of the job."""
    lock, claims = work / "records.lock", work / "claims.json"
    # the budget is asked first: a job claimed and then not run would stay claimed while this process lives
    while budget.allows() and (claimed := claim(claims, lock, results, jobs, again)) is not None:
        jobs.remove(claimed)
        seed, arm = claimed
        with locked(lock):
            records = read_records(results)
        record = job(seed, arm, records)
        minutes = sum(record["minutes"].values())
        budget.took(minutes)
        verdict = save(results, lock, claims, claimed, record, report)
        print(f"[{label}] {arm} seed {seed}: {headline(record)}, {minutes:.1f} min, {verdict}", flush=True)
    say_what_is_left(label, jobs, budget)
    print(f"[{label}] results: {results.with_suffix('.md')}")
