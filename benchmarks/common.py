"""What every benchmark does: run one minirlhf command in a child process, timed, with its peak memory."""

import contextlib
import fcntl
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_minirlhf(args: list[str], cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, float, float]:
    """(finished process with its stdout, wall seconds, peak resident MiB of the child)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "minirlhf", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    return proc, time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def failed(proc: subprocess.CompletedProcess) -> bool:
    """Print the error JSON of a failed run; True when it failed."""
    if proc.returncode != 0:
        print(json.dumps({"error": f"{' '.join(proc.args[2:4])} exited {proc.returncode}", "output": proc.stdout[-2000:],
                          "stderr": proc.stderr[-1000:]}))
    return proc.returncode != 0


def new_run_dir(name: str) -> Path:
    return ROOT / "runs" / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def cpu_lock(path: str | None):
    """An exclusive flock(2) on `path`, as `flock PATH CMD` takes it, shared with other jobs on this machine, so
    that none runs beside a timed part; nothing without a path."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_result(name: str, report: dict) -> None:
    """Print a benchmark's JSON and save it as benchmarks/results/NAME.json."""
    text = json.dumps(report, indent=2)
    print(text)
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(text + "\n")
