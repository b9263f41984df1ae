"""The labelling half of the gold-frontier benchmark: candidate pairs made by the feedback page's own generator,
judged on the running page by simulated annotators, and the comparison of random against active pair choice.

Each arm of the comparison labels N of the same candidates in quarters, training a reward model after each; the
active arm serves each quarter after the first most-uncertain-first under the reward model(s) of the labels before
it. Every arm runs with several seeds (a seed sets the random order of the candidates, the annotators' draws and
the reward model's initialisation), and the comparison reads the curves averaged over seeds: one curve's points
are ~0.03 apart by chance alone.
"""

import random
import sqlite3
import time
from pathlib import Path

import torch

from minirlhf.stages import reward_model
from minirlhf.checkpoint import load_json
from minirlhf.config import load_config
from minirlhf.data.preferences import Pair
from minirlhf.feedback.app import Page
from minirlhf.feedback.loop import write_pairs
from minirlhf.feedback.pairs import PairPool, Sampling, Source, uncertainty
from minirlhf.feedback.simulate import beta_for_agreement, judge_agreement, simulate
from minirlhf.models.judge import load_judge
from minirlhf.feedback.store import Store, export_jsonl
from minirlhf.models.load import load_policy
from minirlhf.models.reward_model import RewardModel
from minirlhf.rundir import RunDir

ENSEMBLE = 3  # reward models per round when the active arm asks an ensemble (the first on all labels)


def page_for(store: Store, sft_run: Path, prompts: list[str], args, ahead: int) -> Page:
    source = Source(str(sft_run), None, prompts, options={"chat_template": False})
    pool = PairPool(store, source, Sampling(args.response_len, 1.0, seed=args.seed), ahead, overlap=0.0,
                    batch_size=16)
    return Page(store, pool)


def make_candidates(work: Path, sft_run: Path, prompts: list[str], n: int, args) -> Path:
    """`n` pairs sampled by the page's own generator into a store, then copied for each arm of the comparison."""
    db = work / "candidates.sqlite"
    store = Store(db)
    page = page_for(store, sft_run, prompts, args, ahead=n)
    page.start()
    try:
        deadline = time.time() + 3600
        while store.counts()["pairs"] < n:
            if page.pool.error is not None:
                raise page.pool.error
            if time.time() > deadline:
                raise RuntimeError("the page's generator made too few pairs in an hour")
            time.sleep(1.0)
    finally:
        page.stop()
    return db


def copy_store(db: Path, to: Path) -> Store:
    with sqlite3.connect(db) as src, sqlite3.connect(to) as dst:
        src.backup(dst)
    return Store(to)


def label(page: Page, judge, n: int, beta: float, seed: int) -> float:
    """`n` labels by two simulated annotators on a running page (no new pairs: the candidates are in its store);
    their agreement with the judge."""
    tally = simulate(page.url, page.admin_token, judge, n, beta, annotators=2, seed=seed, timeout_s=600,
                     show_progress=False)
    return tally.agreement


def train_rm(work: Path, name: str, train_pairs: Path, heldout: Path, seed: int = 0) -> tuple[Path, float]:
    run = reward_model.train(load_config(reward_model.RewardModelConfig, overrides=[
        f"--preferences={train_pairs}", f"--eval_file={heldout}", "--model.max_length=96", "--train.epochs=3",
        "--train.batch_size=16", "--train.lr=1e-4", f"--seed={seed}", f"--out={work / name}", "--device=cpu"]))
    return run, load_json(RunDir(run).results)["eval_accuracy"]


def gold_heldout(work: Path, sft_run: Path, prompts: list[str], gold_judge, args) -> tuple[Path, list[float]]:
    """Pairs of two SFT samples on held-out openings, the gold judge's preferred one as `chosen`: reward-model
    accuracy on them is agreement with the gold judge. Also the judge's score differences (to set beta)."""
    policy = load_policy(str(sft_run), "cpu", value_head=False, chat_template=False)
    gen = torch.Generator().manual_seed(args.seed + 1)
    pairs, differences = [], []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i: i + 16]
        a, b = (policy.sample(chunk, args.response_len, gen).texts for _ in range(2))
        sa, sb = gold_judge(chunk, a).tolist(), gold_judge(chunk, b).tolist()
        differences += [x - y for x, y in zip(sa, sb)]
        pairs += [Pair(p, x, y) if s >= t else Pair(p, y, x) for p, x, y, s, t in zip(chunk, a, b, sa, sb) if s != t]
    path = work / "gold_heldout.jsonl"
    write_pairs(path, pairs)
    return path, differences


def bootstrap(path: Path, to: Path, seed: int) -> Path:
    """A resample with replacement of a pairs file: an ensemble member's training set."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    to.write_text("".join(rng.choice(lines) + "\n" for _ in lines))
    return to


def rank_by_uncertainty(store: Store, runs: list[Path]) -> None:
    fresh = store.unjudged()
    scores = uncertainty([RewardModel.from_run(r) for r in runs], [r["prompt"] for r in fresh],
                         [r["response_a"] for r in fresh], [r["response_b"] for r in fresh])
    store.set_priorities({r["id"]: s for r, s in zip(fresh, scores)})


def arm(work: Path, candidates: Path, sft_run: Path, judge, beta: float, heldout: Path, args, select: str,
        seed: int) -> tuple[list, Path, Path]:
    """One arm with one seed: (labels, reward-model accuracy) after each quarter of N labels; its labels file and
    reward model at N. `select`: random, uncertain (one reward model) or ensemble (their disagreement)."""
    store = copy_store(candidates, work / f"{select}-{seed}.sqlite")
    rng = random.Random(f"order-{seed}")
    store.set_priorities({r["id"]: rng.random() for r in store.unjudged()})  # this seed's random order
    page = page_for(store, sft_run, ["unused"], args, ahead=0)  # one page for the arm: it reads priorities live
    page.start()
    try:
        curve, labels, runs = quarters(work, page, judge, beta, heldout, args, select, seed)
    finally:
        page.stop()
    return curve, labels, runs[0]


def quarters(work: Path, page: Page, judge, beta: float, heldout: Path, args, select: str, seed: int) -> tuple:
    """The arm's four quarters on its page: (curve, the labels file at N, the last reward model(s))."""
    name, store, n, curve, runs = f"{select}-{seed}", page.store, args.labels, [], []
    for q in range(1, 5):
        if runs and select != "random":
            rank_by_uncertainty(store, runs)
        label(page, judge, q * n // 4 - (q - 1) * n // 4, beta, seed=1000 * seed + q)
        labels = work / f"{name}-{q}.jsonl"
        export_jsonl(store.path, labels)
        run, accuracy = train_rm(work, f"rm-{name}-{q}", labels, heldout, seed)
        runs = [run]
        if select == "ensemble" and q < 4:  # members on resamples of the same labels: their disagreement
            runs += [train_rm(work, f"rm-{name}-{q}-b{k}", bootstrap(labels, work / f"{name}-{q}-b{k}.jsonl",
                                                                    100 * seed + k), heldout, seed + k)[0]
                     for k in range(1, ENSEMBLE)]
        curve.append((q * n // 4, round(accuracy, 4)))
    return curve, labels, runs


def mean_curve(curves: list[list]) -> list:
    return [(points[0][0], round(sum(acc for _, acc in points) / len(points), 4)) for points in zip(*curves)]


def labels_to_reach(curve: list, target: float) -> float | None:
    """The label count where the (labels, accuracy) curve first reaches `target`, interpolated; None if never."""
    previous = (0, 0.5)
    for n, acc in curve:
        if acc >= target:
            (n0, a0) = previous
            return n0 + (n - n0) * (target - a0) / (acc - a0) if acc > a0 else n
        previous = (n, acc)
    return None


def collect_labels(work: Path, files: dict, gold: Path, heldout_prompts: list[str], args, say) -> dict:
    """The page, the simulated annotators, and random against active choice over `args.active_seeds` seeds; the
    labels and reward model that the methods use are the first seed's random N."""
    judge = load_judge(str(gold))
    heldout, differences = gold_heldout(work, files["sft"], heldout_prompts, judge, args)
    beta = beta_for_agreement(differences, args.agreement)
    say(f"beta {beta:.3f} gives {args.agreement} expected agreement with the gold judge")
    candidates = make_candidates(work, files["sft"], files["train_prompt_list"], args.pool * args.labels, args)
    curves, first = {"random": [], args.active_select: []}, None
    for seed in range(args.active_seeds):
        for select in curves:
            curve, labels, rm = arm(work, candidates, files["sft"], judge, beta, heldout, args, select, seed)
            curves[select].append(curve)
            say(f"seed {seed}, {select} choice: " + ", ".join(f"{n} labels -> {a:.3f}" for n, a in curve))
            first = first or (labels, rm, work / f"{select}-{seed}.sqlite")
    random_mean, active_mean = mean_curve(curves["random"]), mean_curve(curves[args.active_select])
    needed = labels_to_reach(active_mean, random_mean[-1][1])
    agreement = judge_agreement(Store(first[2]), judge)
    (work / "labels.jsonl").write_text(first[0].read_text())
    return {"beta": beta, "agreement": agreement, "labels": work / "labels.jsonl", "rm": first[1],
            "rm_accuracy": curves["random"][0][-1][1], "curves": curves, "random_curve": random_mean,
            "active_curve": active_mean, "active_label_ratio": None if needed is None else needed / args.labels}

