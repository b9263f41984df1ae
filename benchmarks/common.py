"""What every benchmark shares: a child process run, timed, with its own peak memory (`run_child`, `run_minirlhf`);
the machine and the commit a figure came from (`machine`, `commit`); and the result saved with them (`save_result`)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import IO, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""the CPU flags that decide which kernels (and bf16 or not) a run gets"""

# Why a launcher: a child's ru_maxrss is at least the peak of the memory it had before its exec, which for a child
# that subprocess starts (vfork, or fork) is its parent's: a benchmark that has loaded a model would read its own
# peak into every child's. The launcher (a bare interpreter, a few MiB) forks the command, so the command starts
# from the launcher's small memory; it reaps it with os.wait4 and writes "STATUS MAXRSS_KIB" to the pipe it was
# given. SIGTERM to the launcher SIGKILLs the command (through a pidfd: never a process that took its pid later).
_LAUNCHER = """
import os, signal, sys
report = int(sys.argv[1])
os.set_inheritable(report, False)
pid = os.fork()
if pid == 0:
    for name in ("SIGPIPE", "SIGXFSZ"):  # Python ignores these; a command starts with the defaults, as subprocess's
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        os.write(2, f"cannot run {sys.argv[2]}: {e}\\n".encode())
    os._exit(127)
try:
    pidfd = os.pidfd_open(pid)  # names this process, never another that takes its pid once it is reaped
    kill = lambda: signal.pidfd_send_signal(pidfd, signal.SIGKILL)
except (AttributeError, OSError):
    kill = lambda: alive and os.kill(pid, signal.SIGKILL)
alive = True

def stop(*_):
    try:
        kill()
    except ProcessLookupError:
        pass

signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the command itself (one process group)
signal.signal(signal.SIGTERM, stop)
os.write(report, b"started\\n")
_, status, usage = os.wait4(pid, 0)
alive = False
os.write(report, f"{status} {usage.ru_maxrss}\\n".encode())
"""


def run_child(cmd: list[str], cwd: Path | str = ROOT, env: dict | None = None,
              stdout: int | IO | None = subprocess.PIPE, stderr: int | IO | None = None,
              until: Callable[[], bool] | None = None, poll_s: float = 0.5,
              timeout_s: float | None = None) -> tuple[int, str | None, float, float]:
    """Run `cmd` to its end: (exit code, its stdout as text with stdout=PIPE else None, wall seconds, the peak
    resident MiB of this child alone, from os.wait4: not this process's, nor other children's).

    stdout: PIPE (captured, returned), a file, or None (this process's); stderr: a file, subprocess.STDOUT or None.
    With `until`, it is called every `poll_s` seconds while the child runs; once it is true the child is killed
    (SIGKILL) and counted as done: exit code 0, its peak so far. Past `timeout_s` the child is killed with exit
    code 124 (as timeout(1)). A command that cannot start exits 127. The command runs as the child of a bare
    launcher process (_LAUNCHER, which says why), which reaps it with os.wait4 and reports its exit and peak."""
    if stderr == subprocess.PIPE:
        raise ValueError("run_child: stderr=PIPE is not supported; give a file or subprocess.STDOUT")
    read_end, write_end = os.pipe()
    with contextlib.ExitStack() as stack:
        report = stack.enter_context(os.fdopen(read_end, "rb", buffering=0))  # reads no further than a line
        captured = stack.enter_context(tempfile.TemporaryFile()) if stdout == subprocess.PIPE else None
        t0 = time.time()
        try:
            proc = subprocess.Popen([sys.executable, "-E", "-S", "-c", _LAUNCHER, str(write_end), *map(str, cmd)],
                                    cwd=cwd, env=env, stdout=stdout if captured is None else captured, stderr=stderr,
                                    pass_fds=[write_end])
        finally:
            os.close(write_end)
        try:
            code, peak_kib = _wait(proc, report, until, poll_s, None if timeout_s is None else t0 + timeout_s)
        except BaseException:  # interrupted here (^C, an error in `until`): no child is left behind
            proc.send_signal(signal.SIGTERM)
            _reap(proc)
            raise
        wall = time.time() - t0
        _reap(proc)
        code = proc.returncode if code is None else code  # the launcher itself failed: its exit code
        text = None
        if captured is not None:
            captured.seek(0)
            text = captured.read().decode(errors="replace")
    return code, text, wall, peak_kib / 1024


def _wait(proc: subprocess.Popen, report: IO[bytes], until, poll_s: float,
          deadline: float | None) -> tuple[int | None, int]:
    """(exit code, peak KiB) from the launcher's report, the child stopped by `until` or at the deadline; (None, 0)
    where the launcher itself failed (killed from outside)."""
    if report.readline() != b"started\n":  # the launcher's SIGTERM handler is in place from here on
        return None, 0
    stopped = None
    while stopped is None and (until is not None or deadline is not None):
        if select.select([report], [], [], poll_s)[0]:
            break  # it ended: its report is there
        if until is not None and until():
            stopped = 0
        elif deadline is not None and time.time() > deadline:
            stopped = 124
        if stopped is not None:
            proc.send_signal(signal.SIGTERM)
    line = report.readline().split()
    if len(line) != 2:
        return None, 0
    status, peak_kib = int(line[0]), int(line[1])
    return (os.waitstatus_to_exitcode(status) if stopped is None else stopped), peak_kib


def _reap(proc: subprocess.Popen) -> None:
    """Reap the launcher with os.wait4 (Popen then knows it has ended and does not wait for it again)."""
    if proc.returncode is None:
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)


def run_minirlhf(args: list[str], cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, float, float]:
    """(finished process with its stdout and stderr, wall seconds, peak resident MiB of the child)."""
    cmd = [sys.executable, "-m", "minirlhf", *args]
    with tempfile.TemporaryFile() as err:
        code, out, wall, peak = run_child(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out, err.read().decode(errors="replace"))
    return proc, wall, peak


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


def machine() -> dict:
    """The machine a figure came from: the CPU's model name, its cores and the flags that matter (lscpu; None where
    lscpu is missing), and the torch and Python versions."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    except OSError:
        text = ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    flags = set(fields.get("Flags", "").split())
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"cpu": fields.get("Model name") or platform.processor() or None,
            "cores": int(fields["CPU(s)"]) if fields.get("CPU(s)", "").isdigit() else os.cpu_count(),
            **{flag: (flag in flags) if text else None for flag in FLAGS},
            "torch": torch_version, "python": platform.python_version()}


def commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files differ from it (the run's code was not that commit's); saved
    results, which benchmarks run one after another rewrite, do not count."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    head = git("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results") else "") if head else "unknown"


def _module() -> str:
    """The benchmark this process runs, as `-m` names it (benchmarks.NAME)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("benchmarks.") else ""


def save_result(name: str, report: dict, argv: list[str] | None = None, folder: Path | str | None = None,
                show: bool = True) -> dict:
    """Add a "meta" object to `report` (machine, commit, the command that made it with its arguments, UTC date;
    one the caller made is kept), print the JSON (unless `show` is false) and save it as FOLDER/NAME.json
    (default benchmarks/results/NAME.json), atomically. Returns the report."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = f".venv/bin/python -m {_module() or 'benchmarks.' + name}"
    report.setdefault("meta", {"machine": machine(), "commit": commit(),
                               "command": " ".join([command, shlex.join(argv)]).strip(),
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    text = json.dumps(report, indent=2, ensure_ascii=False, default=str)
    if show:
        print(text, flush=True)
    folder = Path(folder) if folder is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")  # the same folder: os.replace is atomic
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as a plain open() would make it (mkstemp's is 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{name}.json")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return report
