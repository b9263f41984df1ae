"""Faults: SIGKILL at random moments of every training stage, a disk that fills during a save, and eight annotators
judging at once, each checked against what should have happened.

1. Kills. For each stage (classifier, generator, reward model, SFT, DPO, RL as PPO with a classifier and as GRPO
   with a length reward, and `loop` with a simulated annotator), on tiny settings that checkpoint every step or
   two: one uninterrupted reference run; then runs killed with SIGKILL once they have used a CPU time drawn
   (seeded) between 0 and the median CPU time of the stage's whole runs so far (the reference's, and those of
   runs that ended before their kill). CPU time rather than wall time, because this machine is shared: another
   job's load stretches a run's wall time several-fold and its CPU time much less. So kills land anywhere:
   starting up, between steps, mid-checkpoint-write, in the closing evaluation. Each run is then `--resume`d
   (half of the resumes are killed again, drawn the same way) until it ends. A resume that answers "already ran"
   (the kill came as the finished process was exiting) ends it too. A kill before the run folder held its config
   is recovered as a user would: the resume refuses in one line, and the run is started again in the same folder
   (counted apart, as `restarted`). As a random draw seldom lands in the short windows of these tiny runs, each
   stage but the loop also has a run killed at each of three chosen moments (TRIGGERS): just after its folder
   and config are made, while its first checkpoint is being written, and in its closing phase, after the last
   checkpoint and metrics rows but before results.json; these are counted apart from the random kills.
   Equal means, for the deterministic stages: the metrics rows (without the volatile `time/` and `memory/` keys),
   the same files, every safetensors file (weights, optimizer and RNG state, the earlier checkpoint kept) bit for
   bit, results.json and checkpoint/state.json without timings and memory, samples.md, and no resumes.jsonl (a
   resume that changed nothing). For `loop`, whose simulated annotator judges pairs that a background generator
   samples on a live page, a kill mid-labelling changes which pairs the round's labels are on, so equal means:
   the same rounds; each round's feedback.sqlite holding exactly --labels live judgements, none doubled (one per
   pair and annotator); cumulative label counts k * --labels; every round's reward model and policy finished;
   report.md with one row per round; and the rounds finished before a kill unchanged. Bit-for-bit equality with
   the reference is reported beside it, as information.
2. Disk full. For the classifier, DPO and RL: a run killed after its first checkpoint is resumed under
   RLIMIT_FSIZE (above the small files, below the weights), so its next save fails: it must exit 1 with one line,
   leave checkpoint/ at the same step, whole and loadable, with no new temporary folder; resumed without the
   limit, it must equal the reference.
3. Annotators. A real `minirlhf feedback serve` and 8 annotators, each a `simulate.Browser` (a cookie jar, as a
   browser), posting 50 judgements at once; every fifth is posted twice (a second tab), which must answer 409
   "Already judged". SQLite must then hold exactly 400 live judgements: none lost, none doubled.

Prints progress on stderr and one JSON object on stdout, also saved to --out (default benchmarks/results/faults.json).
Works under a fresh runs/bench-faults-TIME/: the references, the logs of every attempt, and the run folders of the
cases that were not equal (of every case with --keep-runs) stay there. With BENCH_LOCK=FILE, the reference runs
(whose wall time is reported) hold that flock.
Run from the repository root: `.venv/bin/python -m benchmarks.faults [--kills 56] [--seed 0] [--stages dpo,rl]
[--quick] [--keep-runs]`. The default run (74 kills: 56 at random moments, 18 at chosen ones) took 13 minutes on
2 cores nobody else was using, several times that while another job loads them; --quick (one kill a stage, at a
random moment; 8 x 10 judgements) about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import ROOT, cpu_lock, machine, new_run_dir, save_result

STAGES = ("classifier", "generator", "reward_model", "sft", "dpo", "rl", "loop")
SHARE = {"classifier": 8, "generator": 9, "reward_model": 8, "sft": 9, "dpo": 9, "rl": 8, "loop": 5}
"""each stage's share of the kills (the loop, several times slower a run, gets fewer)"""
VOLATILE_ROWS = ("time/", "memory/")
VOLATILE_KEY = re.compile(r"(^|[/_])(time|times|seconds|memory|peak_memory_mb|wall)([/_]|$)|_s$|^time")
"""results.json and state.json keys that measure the machine, not the run"""
RESUME_KILL_P = 0.5
"""share of resumes that are killed too (a resumed resume: more kills for the time)"""
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs and the stages' tiny settings
TINY_GENERATOR = ["train-generator", "--data.max_train=400", "--data.max_eval=100", "--train.epochs=3",
                  "--vocab.max_size=500", "--model.emb_dim=32", "--model.hidden_dim=32", "--save_every=1"]
TINY_CLASSIFIER = ["train-classifier", "--data.max_train=96", "--data.max_eval=32", "--train.epochs=1",
                   "--train.batch_size=16", "--model.max_length=32", "--save_every=1"]
COMMON = ["--device=cpu", "--seed=3"]


@dataclass
class Inputs:
    """What the stages read: the tiny generator and classifier (the reference runs of those stages when they ran,
    else made here), and small data files."""

    folder: Path
    refs: dict = field(default_factory=dict)

    def run(self, stage: str, args: list[str]) -> Path:
        if stage in self.refs:
            return self.refs[stage]
        out = self.folder / stage
        if not (out / "results.json").is_file():
            proc = subprocess.run([sys.executable, "-m", "minirlhf", *args, *COMMON, "--out", str(out)], cwd=ROOT,
                                  env=ENV, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"the input {stage} run failed: {proc.stderr[-2000:]}")
        return out

    generator = property(lambda self: self.run("generator", TINY_GENERATOR))
    classifier = property(lambda self: self.run("classifier", TINY_CLASSIFIER))

    def file(self, name: str, rows: list[dict]) -> Path:
        path = self.folder / name
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def length_pairs(self) -> Path:
        """Pairs in which the longer response wins: a taste a reward model picks up fast."""
        rng = random.Random(0)
        words = "good bad film movie great awful plot actor scene story love hate fun boring".split()
        text = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
        return self.file("length_pairs.jsonl", [{"prompt": f"Tell me about film {i}", "chosen": text(8, 14),
                                                 "rejected": text(1, 5)} for i in range(48)])

    def tweets(self) -> list[tuple[str, int]]:
        from minirlhf.config import DataConfig
        from minirlhf.data.sentiment import load_splits

        return load_splits(DataConfig(max_train=400, max_eval=10)).train

    def tweet_pairs(self) -> Path:
        """A positive tweet chosen over a negative one, after the first two words of a tweet."""
        texts, rng = self.tweets(), random.Random(0)
        pos, neg = [t for t, y in texts if y == 1], [t for t, y in texts if y == 0]
        return self.file("tweet_pairs.jsonl", [{"prompt": " ".join(rng.choice(texts)[0].split()[:2]) or "so",
                                                "chosen": rng.choice(pos), "rejected": rng.choice(neg)}
                                               for _ in range(48)])

    def sft_texts(self) -> Path:
        return self.file("sft_texts.jsonl", [{"text": t} for t, _ in self.tweets()[:200]])


def variants(stage: str, i: Inputs) -> list[tuple[str, list[str]]]:
    """The stage's tiny configurations, (name, arguments without --out); killed cases take them in turn."""
    if stage == "classifier":
        return [("classifier", TINY_CLASSIFIER)]
    if stage == "generator":
        return [("generator", TINY_GENERATOR)]
    if stage == "reward_model":
        return [("reward_model", ["train-reward-model", "--preferences", str(i.length_pairs()), "--model.max_length=32",
                                  "--eval_fraction=0.5", "--train.batch_size=8", "--train.epochs=3",
                                  "--train.log_every=1", "--save_every=1"])]
    policy = ["--policy", str(i.generator)]
    if stage == "sft":
        return [("sft", ["sft", *policy, "--data", str(i.sft_texts()), "--train.batch_size=8", "--max_train=160",
                         "--train.lr=1e-2", "--eval_every=2", "--samples=2", "--save_every=1"])]
    if stage == "dpo":
        return [("dpo", ["dpo", *policy, "--preferences", str(i.tweet_pairs()), "--train.steps=30",
                         "--train.batch_size=8", "--train.micro_batch_size=4", "--train.lr=1e-2",
                         "--max_response_tokens=30", "--eval_every=5", "--samples=2", "--save_every=2"])]
    rl = ["--prompts.max_eval=8", "--data.max_train=200", "--data.max_eval=50", "--save_every=1", "--batch_size=8",
          "--minibatch_size=4", "--response_len=8"]
    if stage == "rl":
        return [("ppo+classifier", ["ppo", *policy, "--reward", str(i.classifier), "--steps=16", *rl]),
                ("grpo+length", ["grpo", *policy, "--reward.classifier_weight=0", "--reward.length_weight=1",
                                 "--group_size=4", "--steps=16", *rl])]
    return [("loop", ["loop", *policy, "--rounds", "2", "--labels", str(LOOP_LABELS), "--annotator",
                      f"simulate:{i.classifier}", "--beta", "3", "--steps", "2", "--response_len", "10",
                      "--reward_model.max_length=32", "--reward_model_train.epochs=1",
                      "--reward_model_train.batch_size=4", "--data.max_train=400", "--data.max_eval=100",
                      "--prompts.max_eval=8", "--eval_batch_size=8",
                      "--policy_args=[--batch_size=8, --minibatch_size=4, --ppo_epochs=1]"])]


LOOP_LABELS = 8


# ---------------------------------------------------------------- one process, killed or not
@dataclass
class Attempt:
    kind: str  # start, resume, restart or overwrite
    rc: int | None = None
    killed_at_cpu_s: float | None = None  # None: not killed
    moment: dict | None = None  # what the run folder held at the kill
    error: str = ""  # the last line of stderr of a failed attempt
    cpu_s: float | None = None  # the CPU seconds of an attempt that ended by itself


def launch(args: list[str], logs: Path, kill_at: float | None, watch: Path, trigger=None) -> Attempt:
    """Run `minirlhf ARGS` to its end, or SIGKILL it once it has used `kill_at` seconds of CPU time (or once
    `trigger(watch)` is true), if it is still running; its output goes to LOGS.out / LOGS.err. CPU time, not wall
    time: on a machine that others share, a draw lands at much the same point of the work however busy it is."""
    kind = "resume" if "--resume" in args else "overwrite" if "--overwrite" in args else "start"
    t0 = time.monotonic()
    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "minirlhf", *args], cwd=ROOT, env=ENV, stdout=out, stderr=err)
        while (ended := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            used = cpu_seconds(proc.pid)
            if kill_at is not None and used >= kill_at or trigger is not None and trigger(watch):
                proc.send_signal(signal.SIGKILL)
                proc.returncode = os.waitstatus_to_exitcode(os.wait4(proc.pid, 0)[1])
                moment = {**snapshot(watch), "wall_s": round(time.monotonic() - t0, 2)}  # (the process is gone)
                return Attempt(kind, proc.returncode, round(used, 2), moment)
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(ended[1])
    lines = Path(f"{logs}.err").read_text(errors="replace").strip().splitlines()
    return Attempt(kind, proc.returncode, error=lines[-1][:300] if proc.returncode and lines else "",
                   cpu_s=ended[2].ru_utime + ended[2].ru_stime)


CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a running process has used so far (/proc/PID/stat's utime and stime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def snapshot(run: Path) -> dict:
    """Where a killed run was: its last checkpoint's step, whether a checkpoint was being written, which files of a
    starting run existed."""
    temps = [p.name for p in run.rglob(".*.tmp")] if run.is_dir() else []
    moment = {"checkpoint_step": step_of(run), "mid_save": any(".checkpoint." in t for t in temps),
              "temp_files": len(temps), "run_json": (run / "run.json").is_file(),
              "config_yaml": (run / "config.yaml").is_file(), "metrics_rows": len(read_lines(run / "metrics.jsonl"))}
    try:  # the loop's finished rounds, which the resumed run must keep as they are
        moment["rounds"] = json.loads((run / "checkpoint" / "state.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        pass
    return moment


def step_of(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def read_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


# ---------------------------------------------------------------- a killed case: killed, resumed until it ends
@dataclass
class Case:
    stage: str
    variant: str
    folder: Path
    attempts: list[Attempt] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    kills = property(lambda self: sum(a.killed_at_cpu_s is not None for a in self.attempts))
    restarted = property(lambda self: any(a.kind in ("restart", "overwrite") for a in self.attempts))
    @property
    def finished(self) -> bool:
        last = self.attempts[-1] if self.attempts else None
        return last is not None and (last.rc == 0 or last.kind == "resume" and bool(ALREADY_RAN.search(last.error)))


MAX_ATTEMPTS = 12


def killed_case(case: Case, args: list[str], cpu: float, rng: random.Random, budget: int, trigger=None) -> Case:
    """Start the run, SIGKILL it at a random moment of the CPU time `cpu` its whole run takes (or when `trigger`
    fires), then go on as a user would until it ends: --resume (half of them killed again, at a moment drawn the
    same way, while `budget` kills remain)."""
    out = case.folder / "run"
    case.folder.mkdir(parents=True, exist_ok=True)
    first = None if trigger is not None else rng.uniform(0, cpu)
    case.attempts.append(launch([*args, *COMMON, "--out", str(out)], case.folder / "attempt-1", first, out, trigger))
    while not case.finished and len(case.attempts) < MAX_ATTEMPTS:
        again = case.kills < budget and rng.random() < RESUME_KILL_P
        kill = rng.uniform(0, cpu) if again else None
        next_args, kind = go_on(args, out, case.attempts[-1])
        if next_args is None:
            break
        attempt = launch(next_args, case.folder / f"attempt-{len(case.attempts) + 1}", kill, out)
        attempt.kind = kind
        case.attempts.append(attempt)
    return case


def go_on(args: list[str], out: Path, last: Attempt) -> tuple[list[str] | None, str]:
    """What a user runs after `last`: --resume after a kill; after a resume that refused (a kill before the run's
    folder held its config), the run again in the same folder; when that is refused too (a folder the kill left
    half made), --overwrite. None when even that failed: a failure to report."""
    if last.killed_at_cpu_s is not None:
        return [args[0], "--resume", str(out)], "resume"
    if last.kind == "resume" and NO_RUN_YET.search(last.error):
        return [*args, *COMMON, "--out", str(out)], "restart"
    if last.kind == "restart" and HALF_MADE.search(last.error):
        return [*args, *COMMON, "--out", str(out), "--overwrite"], "overwrite"
    return None, ""


ALREADY_RAN = re.compile(r"already ran \d+ steps")
"""a resume's answer when the kill came after the run had finished, as the process was ending"""
NO_RUN_YET = re.compile(r"not a minirlhf run directory|config\.yaml is missing")
"""a resume's refusal of a folder that a kill left before the run was made (nothing else is started again)"""
HALF_MADE = re.compile(r"already holds .* run|is not empty and holds no minirlhf run")


def reference(stage: str, variant: str, args: list[str], folder: Path) -> tuple[Path, float, float]:
    """The uninterrupted run, its wall time and its CPU time (under BENCH_LOCK when set, so that the wall time is the
    machine's)."""
    out = folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    with cpu_lock(os.environ.get("BENCH_LOCK")):
        t0 = time.monotonic()
        attempt = launch([*args, *COMMON, "--out", str(out)], folder / "attempt-1", None, out)
        wall = time.monotonic() - t0
    if attempt.rc != 0:
        raise SystemExit(f"the reference {stage} run ({variant}) failed: {attempt.error}; see {folder}")
    say(f"{stage} ({variant}): reference run {wall:.0f} s ({attempt.cpu_s:.0f} CPU s), "
        f"{len(read_lines(out / 'metrics.jsonl'))} metrics rows")
    return out, wall, attempt.cpu_s


# ---------------------------------------------------------------- equal: deterministic stages
def rows(run: Path) -> list[dict]:
    """metrics.jsonl without the keys that measure the machine (as tests/test_scale.py compares runs)."""
    parsed = [json.loads(line) for line in read_lines(run / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE_ROWS)} for r in parsed]


def figures(obj):
    """A JSON value without the keys that measure the machine (timings, memory) at any depth."""
    if isinstance(obj, dict):
        return {k: figures(v) for k, v in obj.items() if not VOLATILE_KEY.search(k)}
    if isinstance(obj, list):
        return [figures(v) for v in obj]
    return obj


def file_names(run: Path) -> set[str]:
    """The run's files by relative path, but for the temporary ones a kill left, what a resume set aside, and
    SQLite's -wal and -shm files (there while a connection was open at the kill, or at the end)."""
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))
            and not any(part.startswith(".") or ".damaged" in part or ".replaced" in part
                        for part in p.relative_to(run).parts)}


def tensor_files(run: Path) -> dict[str, Path]:
    """Every safetensors file of the run (weights, optimizer and RNG state, kept checkpoints), by relative path;
    not the temporary folders a kill left, nor a damaged checkpoint set aside."""
    found = {}
    for path in run.rglob("*.safetensors"):
        rel = path.relative_to(run)
        if not any(part.startswith(".") or ".damaged" in part or ".replaced" in part for part in rel.parts):
            found[str(rel)] = path
    return found


def tensors_differ(a: Path, b: Path) -> list[str]:
    """Names of the tensors that are not bit for bit the same (all of them if the sets of names differ)."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return sorted(ta.keys() ^ tb.keys())
    return [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]


def first_difference(a, b, where: str) -> str:
    """Where two JSON values first differ, briefly."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            if json.dumps(a.get(k)) != json.dumps(b.get(k)):
                return first_difference(a.get(k), b.get(k), f"{where}.{k}")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            steps = lambda xs: [x.get("step") if isinstance(x, dict) else "?" for x in xs]  # (metrics rows)
            return f"{where}: {len(a)} items in the reference, {len(b)} resumed (steps {steps(a)}, resumed {steps(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            if json.dumps(x) != json.dumps(y):
                return first_difference(x, y, f"{where}[{i}]")
    return f"{where}: reference {json.dumps(a)[:160]}, resumed {json.dumps(b)[:160]}"


def here(value, run: Path):
    """A JSON value with the run's own folder written RUN: two runs in two folders name their own files."""
    return json.loads(json.dumps(value).replace(json.dumps(str(run))[1:-1], "RUN"))


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def differences(ref: Path, run: Path) -> list[str]:
    """What differs between the reference run and the resumed one; [] when they are equal."""
    out, ra, rb = [], here(rows(ref), ref), here(rows(run), run)
    if json.dumps(ra) != json.dumps(rb):  # (as text: a NaN equals a NaN)
        out.append(first_difference(ra, rb, "metrics.jsonl"))
    na, nb = file_names(ref), file_names(run)
    if na != nb:
        out.append(f"files: only in the reference {sorted(na - nb)[:5]}, only resumed {sorted(nb - na)[:5]}")
    fa, fb = tensor_files(ref), tensor_files(run)
    if fa.keys() != fb.keys():
        out.append(f"safetensors files: only in the reference {sorted(fa.keys() - fb.keys())}, only resumed "
                   f"{sorted(fb.keys() - fa.keys())}")
    for rel in sorted(fa.keys() & fb.keys()):
        if names := tensors_differ(fa[rel], fb[rel]):
            out.append(f"{rel}: {len(names)} tensor(s) differ, e.g. {names[:3]}")
    for name in ("results.json", "checkpoint/state.json"):
        a, b = here(figures(load(ref / name)), ref), here(figures(load(run / name)), run)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(first_difference(a, b, name))
    if (ref / "samples.md").is_file() and (ref / "samples.md").read_text() != (run / "samples.md").read_text():
        out.append("samples.md differs")
    if (run / "resumes.jsonl").is_file():
        out.append(f"resumes.jsonl: {(run / 'resumes.jsonl').read_text().strip()[:300]}")
    return out


def leftovers(run: Path) -> list[str]:
    """Temporary files and folders of interrupted writes still in a finished run."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*.tmp"))


# ---------------------------------------------------------------- equal: the loop
LOOP_EQUAL = ("the same rounds as the reference; each round's feedback.sqlite holds exactly --labels live A/B "
              "judgements, one per pair and annotator (none doubled); results.json's cumulative labels are "
              "k * --labels; each round's reward model and policy runs finished; report.md has one row per round; the "
              "rounds a kill left in the checkpoint are unchanged in the results. Bit-for-bit equality with the "
              "reference is not required (the pairs judged after a kill mid-labelling are new samples) and is "
              "reported as information.")


def loop_differences(ref: Path, run: Path, case: Case) -> list[str]:
    out, results, want = [], load(run / "results.json"), load(ref / "results.json")
    if results is None:
        return ["results.json is missing"]
    got = [r["round"] for r in results["rounds"]]
    if got != [r["round"] for r in want["rounds"]]:
        out.append(f"rounds {got}, the reference {[r['round'] for r in want['rounds']]}")
    if [r["labels"] for r in results["rounds"]] != [k * LOOP_LABELS for k in got]:
        out.append(f"cumulative labels {[r['labels'] for r in results['rounds']]}")
    report = (run / "report.md").read_text() if (run / "report.md").is_file() else ""
    for k in got:
        out += round_differences(run / f"round-{k}", k)
        if report.count(f"\n| {k} |") != 1:
            out.append(f"report.md has {report.count(f'| {k} |')} rows for round {k}")
    for attempt in case.attempts:
        kept = (attempt.moment or {}).get("rounds") or []
        if json.dumps(results["rounds"][:len(kept)]) != json.dumps(kept):
            out.append(first_difference(kept, results["rounds"][:len(kept)], "rounds kept at a kill"))
    case.info["differences_from_reference"] = differences(ref, run)[:3]
    return out


def round_differences(folder: Path, k: int) -> list[str]:
    out = []
    with sqlite3.connect(folder / "feedback.sqlite") as db:
        live, distinct, ab = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT pair_id || '-' || annotator_id), SUM(choice IN ('a', 'b')) "
            "FROM judgements WHERE undone IS NULL").fetchone()
    if ab != LOOP_LABELS or live != distinct:
        out.append(f"round {k}: {ab} live A/B judgements (want {LOOP_LABELS}), {live - distinct} doubled")
    for sub in ("reward_model", "policy"):
        if not (folder / sub / "results.json").is_file():
            out.append(f"round {k}: {sub}/ did not finish")
    return out


# ---------------------------------------------------------------- a disk that fills during a save
DISK_FULL = {"classifier": 2_000_000, "dpo": 100_000, "rl": 100_000}
"""RLIMIT_FSIZE by stage: above metrics.jsonl, config.yaml and state.json, below the weights (the tiny LSTM's are
133 KB, MiniLM's 90 MB)"""


def disk_full(stage: str, args: list[str], ref: Path, folder: Path, limit: int) -> dict:
    """Kill a run after its first checkpoint, resume it under RLIMIT_FSIZE so that its next save fails (exit 1,
    one line, checkpoint/ as it was, loadable), then resume it on a roomy disk: it must equal the reference."""
    out = folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    killed = kill_after_checkpoint([*args, *COMMON, "--out", str(out)], out, folder / "attempt-1")
    before, temps = checkpoint_digest(out), set(out.glob(".checkpoint*"))  # (a kill mid-save may leave one)
    with open(folder / "attempt-2.out", "w") as o, open(folder / "attempt-2.err", "w") as e:
        full = subprocess.run([sys.executable, "-m", "minirlhf", args[0], "--resume", str(out)], cwd=ROOT, env=ENV,
                              stdout=o, stderr=e, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                                        (limit, limit)))
    err = (folder / "attempt-2.err").read_text(errors="replace").strip().splitlines()
    after = checkpoint_digest(out)
    resumed = launch([args[0], "--resume", str(out)], folder / "attempt-3", None, out)
    checks = {
        "exit_code_1": full.returncode == 1,
        "one_line": bool(err) and err[-1].startswith("minirlhf: error:") and not any("Traceback" in x for x in err),
        "checkpoint_unchanged": before == after and before is not None,
        "checkpoint_loadable": loadable(out),
        "no_temporary_folder_left": set(out.glob(".checkpoint*")) <= temps,
        "resume_equals_reference": resumed.rc == 0 and not differences(ref, out),
    }
    return {"stage": stage, "limit_bytes": limit, "killed_at_step": killed, "error": err[-1][:300] if err else "",
            "ok": all(checks.values()), **checks,
            "differences": differences(ref, out) if resumed.rc == 0 else [f"resume failed: {resumed.error}"]}


def kill_after_checkpoint(args: list[str], out: Path, logs: Path) -> int:
    """Start the run and SIGKILL it as soon as its first checkpoint is there; the checkpoint's step."""
    with open(f"{logs}.out", "w") as o, open(f"{logs}.err", "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "minirlhf", *args], cwd=ROOT, env=ENV, stdout=o, stderr=e)
        while step_of(out) < 1 and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return step_of(out)


def checkpoint_digest(run: Path) -> dict | None:
    """checkpoint/'s files, each with its size and a hash of its bytes: equal digests, the same checkpoint."""
    import hashlib

    folder = run / "checkpoint"
    if not folder.is_dir():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def loadable(run: Path) -> bool:
    """Every safetensors file of checkpoint/ reads, and state.json parses with a step."""
    from safetensors.torch import load_file

    try:
        for path in (run / "checkpoint").rglob("*.safetensors"):
            load_file(str(path))
        return int(json.loads((run / "checkpoint" / "state.json").read_text())["step"]) >= 1
    except Exception:  # noqa: BLE001 (any failure to read is the answer)
        return False


# ---------------------------------------------------------------- eight annotators at once
@dataclass
class Annotator:
    """One annotator's session and what the page answered it."""

    name: str
    token: str
    choices: list[str]
    accepted: list[tuple[int, str]] = field(default_factory=list)  # (pair, choice) the page took
    refused: int = 0  # first posts the page refused (the pair had its labels meanwhile)
    repeats: int = 0  # second posts of a judgement, as a second tab sends
    repeats_already_judged: int = 0  # ... answered 409 "Already judged"
    error: str = ""


def annotate(base: str, who: Annotator, n: int, timeout_s: float) -> None:
    """Judge `n` pairs through the page as a browser does; every fifth judgement is posted twice."""
    from minirlhf.feedback.simulate import Browser

    try:
        browser, deadline = Browser(base, who.token), time.monotonic() + timeout_s
        while len(who.accepted) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(who.accepted)} of {n} judged in {timeout_s:.0f} s")
            shown = browser.next_pair()
            if shown is None:  # the "generating" page: wait as its refresh would
                time.sleep(0.2)
                continue
            choice = who.choices[len(who.accepted) % len(who.choices)]
            if not browser.judge(shown, choice):
                who.refused += 1
                continue
            who.accepted.append((shown.pair_id, choice))
            if len(who.accepted) % 5 == 1:
                page = browser.open("/judge", {"csrf": shown.csrf, "pair_id": str(shown.pair_id), "choice": choice},
                                    refused_ok=True)
                who.repeats += 1
                who.repeats_already_judged += browser.status == 409 and "Already judged" in page
    except Exception as e:  # noqa: BLE001 (reported in the JSON)
        who.error = f"{type(e).__name__}: {e}"[:300]


def serve(policy: Path, folder: Path) -> tuple[subprocess.Popen, list[str], str]:
    """`minirlhf feedback serve` on a free port: the process, its output lines (read on a thread), the admin link."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "minirlhf", "feedback", "serve", "--policy", str(policy), "--db",
                             str(folder / "feedback.sqlite"), "--port", "0", "--overlap", "0.3", "--max-new-tokens",
                             "12", "--ahead", "24"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if found := next((m.group(0) for x in list(lines) if (m := re.search(r"http://\S+/admin\?token=\S+", x))),
                         None):
            return proc, lines, found
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the feedback server printed no admin link:\n" + "".join(lines)[-2000:])


def annotators(policy: Path, folder: Path, n: int = 8, each: int = 50) -> dict:
    """n annotators posting `each` judgements at once on a real server; what SQLite holds afterwards."""
    from urllib.parse import parse_qs, urlsplit

    from minirlhf.feedback.simulate import Browser

    proc, lines, admin_link = serve(policy, folder)
    try:
        base, token = admin_link.split("/admin")[0], parse_qs(urlsplit(admin_link).query)["token"][0]
        admin = Browser(base, token)
        people = [Annotator(f"annotator {i}", admin.add_annotator(f"annotator {i}"),
                            ["a", "b"] if i % 2 else ["a", "b", "tie", "skip"]) for i in range(n)]
        threads = [threading.Thread(target=annotate, args=(base, who, each, 600)) for who in people]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {**count_judgements(folder / "feedback.sqlite", people, n * each), "seconds": round(seconds, 1),
            "server_said": [x.strip() for x in lines if "judgements" in x][-1:]}


def count_judgements(db_path: Path, people: list[Annotator], expected: int) -> dict:
    """Stored judgements against those the page accepted: lost (accepted, not stored) and doubled (stored twice, or
    stored without having been accepted: a repeat that counted)."""
    with sqlite3.connect(db_path) as db:
        stored_rows = db.execute("SELECT a.name, j.pair_id, j.choice FROM judgements j JOIN annotators a "
                                 "ON a.id = j.annotator_id WHERE j.undone IS NULL").fetchall()
        all_rows = db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
    stored = Counter(stored_rows)
    accepted = Counter((who.name, pair, choice) for who in people for pair, choice in who.accepted)
    per_pair = Counter((name, pair) for name, pair, _ in stored_rows)
    return {"expected": expected, "accepted": sum(accepted.values()), "stored": len(stored_rows),
            "lost": sum((accepted - stored).values()), "doubled": sum((stored - accepted).values()),
            "pairs_judged_twice_by_one_annotator": sum(c - 1 for c in per_pair.values() if c > 1),
            "rows_in_all": all_rows, "double_submits": sum(w.repeats for w in people),
            "double_submits_answered_already_judged": sum(w.repeats_already_judged for w in people),
            "refused_first_posts": sum(w.refused for w in people),
            "errors": [f"{w.name}: {w.error}" for w in people if w.error]}


# ---------------------------------------------------------------- the benchmark
def allocate(total: int, stages: list[str]) -> dict[str, int]:
    """`total` kills over `stages` by their SHARE (largest remainders), at least one each."""
    weights = {s: SHARE[s] for s in stages}
    exact = {s: total * w / sum(weights.values()) for s, w in weights.items()}
    kills = {s: max(1, int(x)) for s, x in exact.items()}
    for s in sorted(stages, key=lambda s: int(exact[s]) - exact[s])[:max(0, total - sum(kills.values()))]:
        kills[s] += 1
    return kills


def run_stage(stage: str, inputs: Inputs, target: int, rng: random.Random, work: Path, targeted: bool = True,
              keep: bool = False) -> tuple[list[Case], dict]:
    """The stage's references; killed cases (its variants in turn) until `target` kills have landed at random
    moments; then, with `targeted`, one case killed at each moment of TRIGGERS. The run folders of the cases found
    equal are deleted unless `keep`."""
    found = variants(stage, inputs)
    refs = {name: reference(stage, name, args, work / stage / f"reference-{name}") for name, args in found}
    if stage in ("generator", "classifier"):
        inputs.refs[stage] = refs[stage][0]  # the inputs of the later stages
    cases: list[Case] = []
    seen = {name: [cpu] for name, (_, _, cpu) in refs.items()}  # CPU seconds of whole uninterrupted runs
    while sum(c.kills for c in cases) < target and len(cases) < 3 * target + 2:
        name, args = found[len(cases) % len(found)]
        case = killed_case(Case(stage, name, work / stage / f"case-{len(cases) + 1}"), args,
                           statistics.median(seen[name]), rng, target - sum(c.kills for c in cases))
        close(case, refs[name][0], keep)
        cases.append(case)
        if not case.kills and case.attempts[0].cpu_s:  # a run that ended before its kill: the end is nearer
            seen[name].append(case.attempts[0].cpu_s)
    (name, args), ref = found[0], refs[found[0][0]][0]
    for moment, fires in (TRIGGERS.items() if targeted and stage != "loop" else ()):
        case = Case(stage, name, work / stage / f"case-{len(cases) + 1}", info={"targeted": moment})
        close(killed_case(case, args, seen[name][0], rng, 0, lambda run: fires(run, ref)), ref, keep)
        cases.append(case)
    return cases, {name: {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)} for name, (_, wall, cpu) in refs.items()}


TRIGGERS = {
    "the run folder made, no checkpoint yet": lambda run, ref: (run / "config.yaml").is_file(),
    "the first checkpoint being written": lambda run, ref: any(run.glob(".checkpoint*")),
    "closing: the last checkpoint and every metrics row written, results.json not yet": lambda run, ref: (
        step_of(run) >= step_of(ref) and not (run / "results.json").is_file()
        and len(read_lines(run / "metrics.jsonl")) >= len(read_lines(ref / "metrics.jsonl"))),
}
"""moments a random draw seldom hits on these short runs, each killed once a stage (but the loop)"""


def close(case: Case, ref: Path, keep: bool) -> None:
    """Compare the finished case with the reference, say how it went, and delete its run folder when it is equal."""
    case.differences, case.info["last_step"] = judge(case, ref), step_of(ref)
    if not case.differences and not keep:  # (a classifier run is 350 MB; its logs stay)
        shutil.rmtree(case.folder / "run", ignore_errors=True)
    say(f"{case.stage} ({case.variant}) {case.folder.name}"
        + (f" [{case.info['targeted']}]" if "targeted" in case.info else "")
        + f": {case.kills} kill(s) at {[a.killed_at_cpu_s for a in case.attempts if a.killed_at_cpu_s is not None]} "
        f"CPU s, {[a.kind for a in case.attempts]}, "
        + ("equal" if not case.differences else f"NOT EQUAL: {case.differences}"))


def judge(case: Case, ref: Path) -> list[str]:
    run = case.folder / "run"
    case.info["leftovers"] = leftovers(run) if run.is_dir() else []
    if not case.finished:
        return [f"did not finish after {len(case.attempts)} attempts: {case.attempts[-1].kind} exited "
                f"{case.attempts[-1].rc}: {case.attempts[-1].error}"]
    return loop_differences(ref, run, case) if case.stage == "loop" else differences(ref, run)


def detail(case: Case, args: list[str]) -> dict:
    """A case that was not equal, with what reproduces it."""
    return {"stage": case.stage, "variant": case.variant, "folder": str(case.folder.relative_to(ROOT)),
            "chosen_moment": case.info.get("targeted"),
            "command": ["minirlhf", *args, *COMMON], "differences": case.differences,
            "attempts": [{"kind": a.kind, "rc": a.rc, "killed_at_cpu_s": a.killed_at_cpu_s, "error": a.error,
                          **({"when": when(a.moment, case.info["last_step"])} if a.moment else {}),
                          **{k: v for k, v in (a.moment or {}).items() if k != "rounds"}} for a in case.attempts]}


def kill_summary(cases: list[Case], inputs: Inputs) -> dict:
    killed = [c for c in cases if c.kills]
    args = {(c.stage, c.variant): dict(variants(c.stage, inputs))[c.variant] for c in cases}
    left = [f"{c.folder.relative_to(ROOT)}/run/{x}" for c in cases for x in c.info.get("leftovers", [])]
    return {
        "kills": sum(c.kills for c in cases),
        "kills_by_stage": {s: sum(c.kills for c in cases if c.stage == s)
                           for s in dict.fromkeys(c.stage for c in cases)},
        "kills_at_random_moments": sum(c.kills for c in cases if "targeted" not in c.info),
        "kills_at_chosen_moments": {m: sum(c.kills for c in cases if c.info.get("targeted") == m) for m in TRIGGERS},
        "kills_when": dict(Counter(when(a.moment, c.info["last_step"]) for c in cases for a in c.attempts
                                   if a.moment is not None)),
        "resumes": len(killed), "resumes_equal": sum(not c.differences for c in killed),
        "resume_commands": sum(a.kind == "resume" for c in cases for a in c.attempts),
        "restarted": sum(c.restarted for c in cases),
        "runs_that_ended_before_their_kill": sum(not c.kills for c in cases),
        "not_equal": [detail(c, args[c.stage, c.variant]) for c in cases if c.differences],
        "loop_bit_for_bit_with_the_reference": [
            {"kills": [when(a.moment, c.info["last_step"]) for a in c.attempts if a.moment],
             "differences": c.info.get("differences_from_reference")} for c in cases if c.stage == "loop"],
        "leftover_temporary_files": {"count": len(left), "examples": left[:5]},
    }


def when(moment: dict, last_step: int) -> str:
    """Which part of the run a kill cut."""
    if not moment["config_yaml"]:
        return "starting, before the run folder held its config"
    if moment["mid_save"]:
        return "writing a checkpoint"
    if moment["checkpoint_step"] == 0:
        return "before the first checkpoint"
    if moment["checkpoint_step"] >= last_step:
        return "after the last checkpoint (closing evaluation, results, exit)"
    return "between checkpoints"


def cpu() -> dict:
    """The CPU, as the saved results have it (common.machine: lscpu)."""
    m = machine()
    return {"model": m["cpu"], "avx512_bf16": m["avx512_bf16"], "cores": m["cores"]}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=sum(SHARE.values()), help="SIGKILLs in all, over the stages")
    p.add_argument("--seed", type=int, default=0, help="seeds every kill moment and which resumes are killed")
    p.add_argument("--stages", default=",".join(STAGES), help=f"a comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="a smoke run: one kill a stage at a random moment (none "
                   "at chosen moments), disk full on RL only, 8 annotators x 10 judgements")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders of the cases found equal too "
                   "(by default only their logs stay)")
    p.add_argument("--out", type=Path, help="where the JSON goes too (default: benchmarks/results/faults.json, or "
                   "faults-quick.json with --quick)")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(args.stages) - set(STAGES):
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.quick and "--kills" not in " ".join(argv):
        args.kills = len(args.stages)
    args.out = args.out or ROOT / "benchmarks" / "results" / ("faults-quick.json" if args.quick else "faults.json")
    return args


def main(argv: list[str]) -> int:
    args, t0 = parse_args(argv), time.monotonic()
    work = new_run_dir("faults")
    inputs, cases, walls = Inputs(work / "inputs"), [], {}
    say(f"working in {work}; kills by stage {allocate(args.kills, args.stages)}")
    for stage, target in allocate(args.kills, args.stages).items():
        stage_cases, walls[stage] = run_stage(stage, inputs, target, random.Random(f"{args.seed}-{stage}"), work,
                                              not args.quick, args.keep_runs)
        cases += stage_cases
    full = [s for s in (["rl"] if args.quick else DISK_FULL) if s in args.stages]
    disk = []
    for stage in full:
        name, stage_args = variants(stage, inputs)[0]
        disk.append(disk_full(stage, stage_args, work / stage / f"reference-{name}" / "run", work / stage / "disk-full",
                              DISK_FULL[stage]))
        say(f"disk full, {stage}: " + ("ok" if disk[-1]["ok"] else f"NOT OK: {disk[-1]}"))
    say("8 annotators judging at once")
    judgements = annotators(inputs.generator, work / "annotators", 8, 10 if args.quick else 50)
    say(f"judgements: {judgements}")
    result = {**kill_summary(cases, inputs), "loop_equal_means": LOOP_EQUAL,
              "disk_full": {"ok": all(d["ok"] for d in disk), "stages": disk}, "judgements": judgements,
              "reference_seconds": walls, "seconds": round(time.monotonic() - t0), "cpu": cpu(),
              "command": " ".join([".venv/bin/python", "-m", "benchmarks.faults", *argv]), "seed": args.seed,
              "work": str(work.relative_to(ROOT))}
    save_result(args.out.name.removesuffix(".json"), result, argv, folder=args.out.parent)
    good = not result["not_equal"] and result["disk_full"]["ok"] and judgements["lost"] == 0 and \
        judgements["doubled"] == 0 and judgements["stored"] == judgements["expected"]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
