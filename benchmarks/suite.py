"""The whole test suite as CI runs it, timed on this machine: `.venv/bin/python -m benchmarks.suite [--avx2]`.

Runs `python -m pytest -q -n auto` (as `make test`) in a child process under CI=true (nothing may skip for want of a
tool), reads pytest's closing counts and saves them with the wall time and the child's peak memory as
benchmarks/results/suite.json.
With --avx2 oneDNN and ATen are held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2: what an AVX2-only CPU
runs, where bf16 matmuls are slow and there is no bf16 LSTM kernel, so `--dtype auto` must choose fp32), saved as
suite-avx2.json. The render tests are left out: docs/platforms.md shows this result, so they could not pass before
it exists. Exit code: pytest's. Extra arguments go to pytest (`-- -k name`); a run given any is not saved.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from benchmarks.common import ROOT, run_child, save_result

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
RENDER_TESTS = "tests/test_benchmarks_render.py"
"""left out: they check that the docs equal the render of the saved results, this run's own among them"""
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def counts(summary: str) -> dict[str, int]:
    """pytest's closing line (`= 700 passed, 2 skipped in 900.1s =`) as {"passed": 700, "skipped": 2}."""
    return {("error" if kind.startswith("error") else kind): int(n) for n, kind in COUNT.findall(summary)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    ap.add_argument("--avx2", action="store_true", help="hold oneDNN and ATen to AVX2, as an AVX2-only CPU runs")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --); a run given any is not saved")
    args = ap.parse_args(argv)
    env = {**os.environ, "CI": "true", **(AVX2 if args.avx2 else {})}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "auto", "--dist", "worksteal",  # as
           f"--ignore={RENDER_TESTS}", *args.pytest_args]  # `make test`, but for the render tests (see above)
    with tempfile.NamedTemporaryFile("w+") as log, open(log.name) as tail:
        def show() -> bool:  # pytest's progress as it comes (run_child polls this), never a reason to stop
            sys.stdout.write(tail.read())
            sys.stdout.flush()
            return False

        code, _, wall, peak_mb = run_child(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           until=show, poll_s=2.0)
        show()
        log.seek(0)
        lines = log.read().splitlines()
    summary = next((line for line in reversed(lines) if COUNT.search(line) and " in " in line), "")
    report = {"benchmark": "suite", "isa_limit": AVX2 if args.avx2 else None, "exit_code": code,
              "counts": counts(summary), "summary": summary.strip("= "), "wall_seconds": round(wall, 1),
              "peak_memory_mb": round(peak_mb)}
    if not args.pytest_args:
        save_result("suite-avx2" if args.avx2 else "suite", report, argv if argv is not None else sys.argv[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
