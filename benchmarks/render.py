"""The pages of docs/ that show measurements, from the saved results: `.venv/bin/python -m benchmarks.render
[--check] [--figures]`.

Each page docs/NAME.md is benchmarks/templates/NAME.md with every figure taken from benchmarks/results/*.json, so
none is typed by hand and a rerun of a benchmark changes the pages only through its result:
- `{{NAME:a.b.0.c:FMT}}` is the value at that path of NAME.json (a number indexes a list, `*` takes every item of
  one, joined by ", "), formatted by FMT (Python's format spec; none: as it stands);
- `{{>BLOCK ARGS}}` is a table or passage that a function of BLOCKS below writes from the results.
A missing result or key stops the render, naming it. `--check` compares instead of writing (exit 1 when the page
differs); `--figures` also redraws the plots the pages show from the same results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import gold_plot, multiturn_table, sentiment_table
from benchmarks.common import RESULTS, ROOT

from minirlhf.report import table

TEMPLATES = ROOT / "benchmarks" / "templates"
PAGES = {template: ROOT / "docs" / template.name for template in sorted(TEMPLATES.glob("*.md"))}
"""template -> the page it renders to"""
VALUE = re.compile(r"\{\{([\w.-]+):([^:}]+)(?::([^}]*))?\}\}")
BLOCK = re.compile(r"\{\{>(\w+)((?: [^}]+)?)\}\}")


class Missing(KeyError):
    """A result file or key the template names is not there."""


def result(name: str, folder: Path = RESULTS) -> dict:
    path = folder / f"{name}.json"
    if not path.is_file():
        raise Missing(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} is missing; run its benchmark")
    return json.loads(path.read_text())


def lookup(data, path: list[str], where: str):
    """The value at `path` ("*": every item of a list, as a list)."""
    for i, key in enumerate(path):
        if key == "*":
            return [lookup(item, path[i + 1:], where) for item in data]
        try:
            data = data[int(key)] if isinstance(data, list) else data[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise Missing(f"{where}: no {'.'.join(path[: i + 1])}") from None
    return data


def fmt(value, spec: str | None) -> str:
    if isinstance(value, list):
        return ", ".join(fmt(v, spec) for v in value)
    if value is None:
        return "n/a"
    return format(value, spec) if spec else str(value)


def value(m: re.Match, folder: Path) -> str:
    name, path, spec = m.group(1), m.group(2), m.group(3)
    return fmt(lookup(result(name, folder), path.split("."), f"{name}.json"), spec)


# ---------------------------------------------------------------------------- blocks


def multiturn_sample(folder: Path) -> str:
    """The first held-out episode before and after training, as a quoted conversation."""
    r = result("multiturn", folder)
    lines, before, after = [], r["sample_before"], r["sample_after"]
    for i, m in enumerate(before):
        if m["role"] == "user":
            lines.append(f"> **user**: {m['content']}  ")
        else:
            lines.append(f"> **before**: {m['content']}  ")
            lines.append(f"> **after**: {after[i]['content']}  ")
    return "\n".join(lines)


def multiturn_kl(folder: Path) -> str:
    files = sorted(folder.glob("multiturn*.json"))
    return multiturn_table.kl_table([json.loads(f.read_text()) | {"file": f.name} for f in files])


def runs_table(folder: Path) -> str:
    """One row per single-run benchmark: what it measured, its time, its peak memory, its bars and its source."""
    rows = [[what, measured, time, f"{r['peak_memory_mb'] / 1024:.1f} GB", _bars(r), _source(r)]
            for name, (what, measured, time) in _single_runs(folder).items() for r in [result(name, folder)]]
    return "\n".join(table(["benchmark", "result", "time", "peak memory", "bars", "command, commit"], rows))


def _single_runs(folder: Path) -> dict[str, tuple[str, str, str]]:
    """result name -> (what ran, what it measured, how long it took), from the saved results."""
    c, g, d = result("classifier_imdb", folder), result("generator_tweets", folder), result("rlhf_demo", folder)
    s, p = result("smollm2_sentiment", folder), result("dpo_hh", folder)
    acc, margin = p["held_out"]["rewards/accuracy"], p["held_out"]["logps/margin"]
    return {
        "classifier_imdb": (
            f"classifier on IMDB (`configs/imdb_classifier.yaml`: {c['train_examples']:,} reviews, MiniLM, "
            f"{c['trainable_params']:,} of {c['total_params']:,} parameters trained)",
            f"test accuracy **{c['test_accuracy']:.3f}**, F1 {c['test_f1']:.3f} on {c['test_examples']:,} test reviews",
            f"{c['wall_seconds']:,.0f} s ({c['train_seconds']:,.0f} s training)"),
        "generator_tweets": (
            f"LSTM generator on tweets (defaults: {g['params'] / 1e6:.1f}M parameters, {g['vocab_size']:,} words)",
            f"validation perplexity {g['val_perplexity']:.1f} vs unigram {g['unigram_perplexity']:.1f} "
            f"({g['ratio_to_unigram']:.2f}x)", f"{g['wall_seconds']:,.0f} s ({g['train_seconds']:,.0f} s training)"),
        "rlhf_demo": (
            "the whole demo (`make demo`: classifier, generator, 30 PPO steps on the LSTM)",
            f"{d['held_out_prompts']} held-out prompts: reward {d['reward_reference']:+.2f} (reference) -> "
            f"{d['reward_policy']:+.2f} (policy), win rate {d['win_rate']:.2f}, KL {d['kl_nats']:.2f} nats; distinct-2 "
            f"{d['distinct_2']['reference']:.2f} -> {d['distinct_2']['policy']:.2f}; classifier test accuracy "
            f"{d['classifier_test_accuracy']:.3f}", f"{d['wall_seconds']:,.0f} s"),
        "smollm2_sentiment": (
            f"PPO on SmolLM2-135M-Instruct (`configs/smollm2_sentiment.yaml` in a fresh folder: the classifier trained "
            f"first, {s['ppo_steps']} steps)",
            f"{s['held_out_prompts']} held-out prompts: reward {s['reward_reference']:.2f} -> {s['reward_policy']:.2f} "
            f"({s['reward_rise']:+.2f}), win rate {s['win_rate']:.2f}, KL {s['kl_nats']:.1f} nats, distinct-2 "
            f"{s['distinct_2']['reference']:.2f} -> {s['distinct_2']['policy']:.2f}, perplexity under the reference "
            f"{s['ref_perplexity']['reference']:.1f} -> {s['ref_perplexity']['policy']:.1f}",
            f"{s['wall_seconds']:,.0f} s ({s['classifier_seconds']:,.0f} s classifier, {s['seconds_per_step']:.1f} "
            "s/step)"),
        "dpo_hh": (
            f"DPO on SmolLM2-135M-Instruct with HH-RLHF pairs (../shared; {p['pairs_train']} training pairs, "
            f"{p['steps']} steps)",
            f"held-out implicit-reward accuracy {acc['final']:.3f} on {p['pairs_eval']} pairs (chance 0.5; "
            f"longer-response baseline {p['length_baseline']:.3f}); log-prob margin {margin['step_0']:.2f} -> "
            f"{margin['final']:.2f} nats",
            f"{p['reference_seconds']:,.0f} s reference log-probs + {p['train_seconds']:,.0f} s training"),
    }


def model_size_table(folder: Path) -> str:
    """One row per size and mode of benchmarks.model_size: what trains, memory by kind, peak, seconds per step."""
    rows = []
    for name, c in result("model_size", folder)["cells"].items():
        trained = f"{c['params'] / 1e6:,.0f}M ({c['trainable_params'] / 1e6:,.1f}M)"
        if "skipped" in c or "error" in c:
            rows.append([name, trained, f"not run: {(c.get('skipped') or c['error']).split(':')[0]}", "", ""])
            continue
        m = c.get("memory_mb", {})
        memory = " / ".join(f"{m[k]:,}" for k in ("params", "grads", "optimizer")) if m else "not recorded"
        rows.append([name, trained, memory, f"{c['peak_mb'] / 1024:.1f} GB",
                     f"{c['step_s']:.1f} ({c['rollout_s']:.1f} + {c['update_s']:.1f})"])
    return "\n".join(table(["model, mode", "parameters (trained)", "weights / gradients / Adam, MB", "peak resident",
                            "s/step (rollout + update)"], rows))


def _bars(r: dict) -> str:
    """Each bar of the result, met or not, as the benchmark judged it."""
    return "; ".join(f"{name}: {'met' if ok else '**not met**'}" for name, ok in r.get("bar", {}).items())


def _source(r: dict) -> str:
    meta = r.get("meta", {})
    return f"`{meta.get('command', 'not recorded')}`, {meta.get('commit', 'not recorded')}"


def machines(folder: Path) -> str:
    """Which CPU each saved result came from."""
    rows = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        meta = r.get("meta") or {"machine": r.get("cpu", {}), "commit": r.get("commit"), "command": r.get("command")}
        m = meta.get("machine") or {}
        bf16 = m.get("avx512_bf16")
        command = clean_command(meta.get("command") or "not recorded")
        rows.append([f"`{f.name}`", m.get("cpu") or m.get("model") or "not recorded", m.get("cores", "?"),
                     "yes" if bf16 else "no" if bf16 is False else "?", meta.get("commit") or "not recorded",
                     f"`{command}`"])
    return "\n".join(table(["result", "CPU", "cores", "AVX-512 BF16", "commit", "command"], rows))


def clean_command(command: str) -> str:
    """A recorded command as it reads from the repository root, wherever that was (`/a/b/configs/x` -> `configs/x`),
    so the page does not depend on the folder the benchmark ran in; `|` escaped for a table cell."""
    return re.sub(r"/\S*?/(?=(?:configs|runs|benchmarks)/)", "", command).replace("|", "\\|")


BLOCKS = {
    "multiturn_table": lambda folder: multiturn_table.table(result("multiturn", folder)),
    "multiturn_kl_table": multiturn_kl,
    "multiturn_sample": multiturn_sample,
    "runs_table": runs_table,
    "gold_tables": lambda folder, name: gold_plot.tables(result(name, folder), f"benchmarks/results/{name}.json"),
    "machines": machines,
    "model_size_table": model_size_table,
    "trl_systems_table": lambda folder: sentiment_table.systems_table(result("sentiment_rlhf", folder)),
    "trl_sampler_table": lambda folder: sentiment_table.sampler_table(result("sentiment_rlhf", folder)),
    "trl_precision": lambda folder: sentiment_table.precision_text(result("sentiment_rlhf", folder)),
    "trl_bars": lambda folder: sentiment_table.bars_text(result("sentiment_rlhf", folder)),
}
"""block name -> function(results folder, *its arguments) -> markdown"""


def render(template: str, folder: Path = RESULTS) -> str:
    def block(m: re.Match) -> str:
        return BLOCKS[m.group(1)](folder, *m.group(2).split())

    return VALUE.sub(lambda m: value(m, folder), BLOCK.sub(block, template))


def figures(folder: Path = RESULTS) -> list[Path]:
    """Redraw the plots the page shows from their results."""
    made = []
    for name, png in (("gold_frontier", "gold_frontier.png"), ("gold_frontier-smollm2", "gold_frontier-smollm2.png")):
        gold_plot.plot(result(name, folder), ROOT / "docs" / png)
        made.append(ROOT / "docs" / png)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the pages in docs/ instead of writing them")
    ap.add_argument("--figures", action="store_true", help="also redraw the figures from the results")
    args = ap.parse_args(argv)
    try:
        pages = {page: render(template.read_text()) for template, page in PAGES.items()}
    except Missing as e:
        print(f"render: {e.args[0]}", file=sys.stderr)
        return 2
    if args.check:
        stale = [page for page, text in pages.items() if not page.is_file() or page.read_text() != text]
        for page in pages:
            print(f"{page.relative_to(ROOT)} is " + ("stale: run python -m benchmarks.render" if page in stale
                                                    else "up to date"))
        return 1 if stale else 0
    for page, text in pages.items():
        page.write_text(text)
    made = list(pages) + (figures() if args.figures else [])
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
