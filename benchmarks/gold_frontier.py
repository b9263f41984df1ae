"""Over-optimisation against a gold judge, on 2 CPU cores: does a learned reward model's policy peak and fall on
the gold reward, does an ensemble prevent it, does the guard see it coming, and do online labels beat one shot?

- prompts: the first 6 words of IMDB reviews (../shared/data/imdb: train openings train, test openings evaluate);
- gold judge: a MiniLM sentiment classifier trained on 4,000 IMDB train reviews (cached under runs/bench-cache/);
  its positive logit of the opening and continuation is the gold reward; it stands in for people;
- policy: SmolLM2-135M-Instruct (4-bit-rounded weights) after `sft` on IMDB reviews (cached), top 6 blocks train;
- labels: `minirlhf loop --annotator simulate:GOLD` on the running feedback page, two simulated annotators whose
  beta gives ~75% agreement with the gold judge; few labels (N), so that the reward model can be exploited;
- per seed (gold_steps.py): offline loop (one round: N labels, a K-member ensemble, T PPO steps on its first
  member alone, the others watched by the over-optimisation guard), PPO against the ensemble (wco or uwo), the
  oracle (PPO on the gold judge, the ensemble watched at weight 0), online loop (R rounds of N/R labels, T/R
  steps each), DPO a pass at a time on the offline labels; best-of-n from 64 SFT samples per held-out opening.
  Every PPO step logs the gold judge's score of its own samples (`--reward.monitor`): gold against KL per step.

Resumable: every part writes parts/NAME.json in the work folder (default runs/bench-gold-frontier) and a rerun
skips finished parts; `--report` rebuilds result.json, the plot and the README's tables (gold_report.py) from the
part files alone. Prints the result JSON. Heavy variants behind flags: `--active-seeds 3` (random against
active pair choice, gold_labels.py), `--seeds`, `--dpo-seeds`.
Run from the repository root: `.venv/bin/python -m benchmarks.gold_frontier [--quick] [--report]`.
"""

import argparse
import contextlib
import json
import random
import re
import sys
import time
from pathlib import Path

from benchmarks import gold_steps as steps
from benchmarks.common import ROOT, commit
from benchmarks.gold_report import report

from minirlhf.stages import classifier, sft
from minirlhf.checkpoint import atomic_write_text
from minirlhf.config import load_config
from minirlhf.data.prompts import read_prompts
from minirlhf.feedback.simulate import beta_for_agreement
from minirlhf.models.judge import load_judge
from minirlhf.rundir import RunDir
from minirlhf.runtime import configure_process

SHARED = ROOT.parent / "shared" / "data" / "imdb"
CACHE = ROOT / "runs" / "bench-cache"
SETTINGS = ("labels", "rounds", "steps", "kl", "lr", "members", "ensemble_mode", "uwo_lambda", "response_len",
            "eval_prompts_n", "eval_samples", "agreement", "gold_train", "sft_examples", "dpo_beta", "dpo_lr",
            "dpo_passes", "rm_model")
LEGACY = {"rm_model": "minilm"}
"""settings added since a work folder was made: what its runs used"""
RM_OPTIONS = {"minilm": [], "smollm2": ["--reward_model.name=smollm2", "--reward_model.freeze_layers=26"]}
"""the reward models' base: MiniLM, as the gold judge (they share its features), or SmolLM2 (top 4 of 30 blocks)"""


def say(*what) -> None:
    print(*what, file=sys.stderr, flush=True)


def reviews(name: str, n: int, skip: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (SHARED / name).read_text().split("\n") if line.strip()]
    random.Random(f"gold-frontier-{name}").shuffle(rows)
    return rows[skip: skip + n]


def clean(text: str) -> str:
    return " ".join(re.sub(r"<br\s*/?>", " ", text).split())


def opening(text: str, words: int = 6) -> str:
    return " ".join(clean(text).split()[:words])


def write_jsonl(path: Path, rows: list[dict]) -> str:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def cached(name: str, make) -> str:
    path = CACHE / name
    found = RunDir.find(path)
    if found is None or not found.results.is_file():
        say(f"training {name} (once; cached in {path})")
        CACHE.mkdir(parents=True, exist_ok=True)
        make(path)
    return str(path)


def gold_judge(n_train: int) -> str:
    def make(path: Path) -> None:
        data = write_jsonl(CACHE / "imdb-gold-train.jsonl", [{"text": clean(r["text"]), "label": r["label"]}
                                                             for r in reviews("train.jsonl", n_train)])
        classifier.train(load_config(classifier.ClassifierConfig, overrides=[
            f"--data.source={data}", "--data.max_eval=500", "--train.epochs=1", "--model.max_length=128",
            f"--out={path}", "--device=cpu"]))
    return cached(f"gold-imdb-{n_train}", make)


def sft_policy(examples: int) -> str:
    """SmolLM2 fine-tuned for one pass over `examples` IMDB train reviews: opening -> the next 34 words."""
    def make(path: Path) -> None:
        rows = [{"prompt": opening(r["text"]), "response": " " + " ".join(clean(r["text"]).split()[6:40])}
                for r in reviews("train.jsonl", examples + 64, skip=6000)]
        data = write_jsonl(CACHE / "imdb-sft.jsonl", rows)
        sft.train(load_config(sft.SFTConfig, overrides=[
            f"--data={data}", *steps.LM, "--train.batch_size=8", "--max_response_tokens=48",
            f"--max_train={examples}", "--eval_every=0", "--max_eval=64", "--samples=0", f"--out={path}",
            "--device=cpu"]))
    return cached(f"sft-imdb-smollm2-{examples}", make)


class Parts:
    """parts/NAME.json under the work folder: a finished part is read back, never run again."""

    def __init__(self, work: Path, commit: str = ""):
        self.folder, self.commit = work / "parts", commit
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, make) -> dict:
        path = self.folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        say(f"--- part {name}")
        t0 = time.time()
        out = make() | {"seconds": round(time.time() - t0, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "commit": self.commit}
        atomic_write_text(path, json.dumps(out))
        return out

    def get(self, name: str) -> dict:
        return json.loads((self.folder / f"{name}.json").read_text())

    def all(self) -> dict:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))}


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", type=int, default=120, help="N: simulated labels per seed (few, so the RM is hackable)")
    p.add_argument("--rounds", type=int, default=2, help="R: the online loop's rounds of N/R labels")
    p.add_argument("--steps", type=int, default=48, help="T: PPO steps of 16 responses per run")
    p.add_argument("--kl", type=float, default=0.01, help="kl_coef of every PPO run (little, to let it over-optimise)")
    p.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate")
    p.add_argument("--members", type=int, default=4, help="K: reward-model ensemble members (seed and bootstrap)")
    p.add_argument("--ensemble-mode", choices=["wco", "uwo"], default="wco")
    p.add_argument("--uwo-lambda", type=float, default=1.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dpo-seeds", type=int, default=1, help="seeds of DPO over passes")
    p.add_argument("--dpo-passes", type=int, default=4)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--dpo-lr", type=float, default=2e-4)
    p.add_argument("--response-len", type=int, default=24)
    p.add_argument("--eval-prompts", dest="eval_prompts_n", type=int, default=48)
    p.add_argument("--eval-samples", type=int, default=2, help="responses per held-out opening (DPO's scores)")
    p.add_argument("--heldout-pairs", type=int, default=200, help="pairs the reward models are measured on")
    p.add_argument("--agreement", type=float, default=0.75, help="the simulated annotators' agreement with the gold")
    p.add_argument("--gold-train", type=int, default=4000, help="IMDB train reviews the gold judge learns from")
    p.add_argument("--sft-examples", type=int, default=480)
    p.add_argument("--rm-model", choices=list(RM_OPTIONS), default="minilm",
                   help="the reward models' base (smollm2: features the MiniLM gold judge does not share)")
    p.add_argument("--parts", default="offline,ensemble,oracle,online,best-of-n",
                   help="which per-seed runs and shared parts to run (DPO: --dpo-seeds)")
    p.add_argument("--more-steps", type=int, default=0, help="continue each seed's runs this many steps further")
    p.add_argument("--more-arms", default="offline,ensemble,oracle", help="which runs --more-steps continues")
    p.add_argument("--active-seeds", type=int, default=0, help="seeds of random against active choice (0: not run)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one seed")
    p.add_argument("--report", action="store_true", help="rebuild result.json and the figures from the part files")
    p.add_argument("--out", help="work folder (default: runs/bench-gold-frontier, or ...-quick)")
    args = p.parse_args()
    if args.quick:
        args.__dict__.update(labels=16, steps=4, eval_prompts_n=4, eval_samples=1, heldout_pairs=16, gold_train=300,
                             sft_examples=32, response_len=8, seeds=1, dpo_passes=1, members=2)
    name = "bench-gold-frontier" + f"-{args.rm_model}" * (args.rm_model != "minilm") + "-quick" * args.quick
    args.work = Path(args.out) if args.out else ROOT / "runs" / name
    args.rm_options, args.parts = RM_OPTIONS[args.rm_model], args.parts.split(",")
    return args


def check_settings(args) -> None:
    """A work folder's parts are only comparable under one set of settings: refuse to mix."""
    path, mine = args.work / "settings.json", {k: getattr(args, k) for k in SETTINGS}
    if path.is_file():
        theirs = LEGACY | json.loads(path.read_text())
        changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if changed:
            k, (old, new) = next(iter(changed.items()))
            sys.exit(f"error: {args.work} was run with {k}={old}, not {new}; pass the same settings or another --out")
    atomic_write_text(path, json.dumps(mine, indent=1))


def setup(parts: Parts, args) -> None:
    """The gold judge, the SFT policy, the openings and the held-out pairs: shared by every seed."""
    args.gold = parts("gold", lambda: {"path": gold_judge(args.gold_train)})["path"]
    args.sft = parts("sft", lambda: {"path": sft_policy(args.sft_examples)})["path"]
    train = [opening(r["text"]) for r in reviews("train.jsonl", 512, skip=10000)]
    held = [opening(r["text"]) for r in reviews("test.jsonl", args.eval_prompts_n)]
    args.train_prompts = write_jsonl(args.work / "train_prompts.jsonl", [{"prompt": p} for p in train])
    args.eval_prompts = write_jsonl(args.work / "eval_prompts.jsonl", [{"prompt": p} for p in held])

    def heldout() -> dict:
        from benchmarks.gold_labels import gold_heldout

        prompts = [opening(r["text"]) for r in reviews("test.jsonl", args.heldout_pairs, skip=5000)]
        ns = argparse.Namespace(seed=0, response_len=args.response_len)
        path, differences = gold_heldout(args.work, Path(args.sft), prompts, load_judge(args.gold), ns)
        return {"path": str(path), "beta": beta_for_agreement(differences, args.agreement)}
    found = parts("heldout", heldout)
    args.heldout, args.beta = found["path"], found["beta"]


def run_seed(parts: Parts, seed: int, args) -> None:
    work = args.work
    offline = parts(f"offline-s{seed}", lambda: steps.loop_run(work, f"offline-s{seed}", 1, seed, args))
    rm = offline["reward_model"]
    parts(f"rm-s{seed}", lambda: steps.reward_model_accuracy(rm, args.heldout))
    mode = [f"--reward.ensemble={args.ensemble_mode}", f"--reward.uwo_lambda={args.uwo_lambda}"]
    if "ensemble" in args.parts:
        parts(f"ensemble-s{seed}", lambda: steps.rl_run(work, f"ensemble-s{seed}", [f"--reward.reward_model={rm}",
                                                                                 *mode], seed, args))
    if "oracle" in args.parts:
        parts(f"oracle-s{seed}", lambda: steps.rl_run(work, f"oracle-s{seed}", [
            f"--reward.classifier={args.gold}", f"--reward.reward_model={rm}", "--reward.reward_model_weight=0",
            "--reward.ensemble=single"], seed, args))
    if "online" in args.parts:
        parts(f"online-s{seed}", lambda: steps.loop_run(work, f"online-s{seed}", args.rounds, seed, args))


def run_more(parts: Parts, seed: int, args) -> None:
    """`--more-steps`: the offline, ensemble and oracle runs of a seed continued from where they ended (a fresh
    optimizer, the SFT policy still the reference), to follow the gold reward further out in KL."""
    rm = parts.get(f"offline-s{seed}")["reward_model"]
    rewards = {"offline": [f"--reward.reward_model={rm}", "--reward.ensemble=single"],
               "ensemble": [f"--reward.reward_model={rm}", f"--reward.ensemble={args.ensemble_mode}",
                            f"--reward.uwo_lambda={args.uwo_lambda}"],
               "oracle": [f"--reward.classifier={args.gold}", f"--reward.reward_model={rm}",
                          "--reward.reward_model_weight=0", "--reward.ensemble=single"]}
    for arm in args.more_arms.split(","):
        run = parts.get(f"{arm}-s{seed}")["run"]
        start = str(Path(run) / "round-1" / "policy") if arm == "offline" else run
        parts(f"more-{arm}-s{seed}", lambda: steps.rl_run(args.work, f"more-{arm}-s{seed}", rewards[arm],
                                                          1000 + seed, args, start=start))


def measure(args) -> dict:
    parts = Parts(args.work, args.commit)
    check_settings(args)
    setup(parts, args)
    for seed in range(args.seeds):
        run_seed(parts, seed, args)
    for seed in range(args.seeds if args.more_steps else 0):
        run_more(parts, seed, args)
    samples = parts("samples-best-of-n", lambda: steps.bon_samples(args, 0)) if "best-of-n" in args.parts else None
    for seed in range(args.seeds if samples else 0):
        rm = parts.get(f"offline-s{seed}")["reward_model"]
        parts(f"bon-s{seed}", lambda: steps.bon_curves(samples, rm, ("single", args.ensemble_mode)))
    for seed in range(args.dpo_seeds):
        labels = parts.get(f"offline-s{seed}")["labels"]
        parts(f"dpo-s{seed}", lambda: steps.dpo_passes(args.work, f"dpo-s{seed}", labels, seed, args))
    if args.active_seeds:
        parts("active", lambda: active_choice(args))
    return report(parts.all(), args)


def active_choice(args) -> dict:
    """Random against active pair choice (gold_labels.py) on 400 labels over `args.active_seeds` seeds."""
    from benchmarks.gold_labels import collect_labels

    ns = argparse.Namespace(labels=400, pool=4, active_seeds=args.active_seeds, active_select="ensemble",
                            agreement=args.agreement, response_len=args.response_len, seed=0)
    train = read_prompts(args.train_prompts)
    heldout = [opening(r["text"]) for r in reviews("test.jsonl", args.heldout_pairs, skip=5000)]
    out = collect_labels(args.work / "active", {"sft": Path(args.sft), "train_prompt_list": train}, Path(args.gold),
                         heldout, ns, say)
    return {k: out[k] for k in ("curves", "random_curve", "active_curve", "active_label_ratio")}


def main() -> None:
    args = arguments()
    configure_process()
    args.commit = commit()
    with contextlib.redirect_stdout(sys.stderr):  # the stages' own lines: stdout is the JSON alone
        if args.report:
            out = report(Parts(args.work).all(), args)
        else:
            (args.work / "active").mkdir(parents=True, exist_ok=True)
            out = measure(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
