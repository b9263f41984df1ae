"""The benchmarks' harness (benchmarks/common.py): a child's own peak memory, a child stopped when asked, and a
result saved with the machine, commit and command that made it. No model, no ../shared: a few seconds."""

import importlib
import json
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    with pytest.MonkeyPatch.context() as mp:  # `benchmarks` is a package of the repository root, not installed
        mp.syspath_prepend(str(ROOT))
        yield importlib.import_module("benchmarks.common")


def test_run_child_reports_each_childs_own_peak_not_an_earlier_childs_nor_this_process(common):
    big = bytearray(200 * 2**20)  # this process's peak: a child that inherited it would report 200+ MiB
    code, out, wall, first = common.run_child([sys.executable, "-c", "x = bytearray(300 * 2**20); print('ok')"])
    assert (code, out) == (0, "ok\n") and wall > 0
    code, out, _, second = common.run_child([sys.executable, "-c", "x = bytearray(50 * 2**20)"], stdout=None)
    assert code == 0 and out is None
    assert first >= 300 and 50 <= second <= 80, (first, second)
    del big


def test_run_child_stops_the_child_once_until_is_true_and_at_the_timeout(common):
    t0 = time.time()
    code, _, wall, peak = common.run_child([sys.executable, "-c", "x = bytearray(60 * 2**20); import time; "
                                            "time.sleep(60)"], until=lambda: time.time() - t0 > 1, poll_s=0.1)
    assert code == 0 and 1 < wall < 10 and peak >= 60  # stopped as asked: counted as done, its peak so far
    code, _, wall, _ = common.run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5,
                                        poll_s=0.1)
    assert code == 124 and wall < 10
    code, out, _, _ = common.run_child([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"])
    assert (code, out) == (3, "x\n")


def test_save_result_adds_meta_with_commit_and_command_and_keeps_the_report(common, tmp_path):
    report = common.save_result("toy", {"benchmark": "toy", "x": 1}, ["--steps=3", "two words"], folder=tmp_path,
                                show=False)
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved == report and {k: saved[k] for k in ("benchmark", "x")} == {"benchmark": "toy", "x": 1}
    meta = saved["meta"]
    assert meta["command"] == ".venv/bin/python -m benchmarks.toy --steps=3 'two words'"
    assert meta["commit"] == common.commit() and re.fullmatch(r"[0-9a-f]{4,}(\+dirty)?|unknown", meta["commit"])
    assert {"cpu", "cores", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "torch", "python"} <= set(meta["machine"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["date"])
    assert [p.name for p in tmp_path.iterdir()] == ["toy.json"]  # no temporary file left
    common.save_result("toy", {"meta": {"mine": True}}, [], folder=tmp_path, show=False)
    assert json.loads((tmp_path / "toy.json").read_text()) == {"meta": {"mine": True}}  # the caller's meta is kept


def test_the_suite_benchmark_reads_pytests_closing_counts():
    from benchmarks.suite import counts

    assert counts("=== 712 passed, 3 skipped, 1 deselected in 901.25s (0:15:01) ===") == \
        {"passed": 712, "skipped": 3, "deselected": 1}
    assert counts("= 1 failed, 10 passed, 2 errors in 5.00s =") == {"failed": 1, "passed": 10, "error": 2}
