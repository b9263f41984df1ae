"""The README's tables of the multi-turn benchmark, from its saved JSON, so no figure is typed by hand: the run of
configs/smollm2_constraints.yaml (benchmarks/results/multiturn.json) and, with `--kl`, one row per KL weight tried
(multiturn.json and multiturn-kl*.json). `.venv/bin/python -m benchmarks.multiturn_table [--kl | FILE.json]`."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def met(bar) -> str:
    return "**met**" if bar[1] else "**not met**"


def table(r: dict) -> str:
    b, kb, ka = r["bars"], r["kinds_before"], r["kinds_after"]
    kinds = sorted(ka, key=lambda k: ka[k] - kb.get(k, 0), reverse=True)
    per = lambda xs, f=".3f": " / ".join(format(x, f) for x in xs)  # noqa: E731
    rows = [
        "| | before | after | bar |", "| --- | --- | --- | --- |",
        f"| episodes with every instruction held at every turn | {r['all_turns_before']:.3f} | {r['all_turns_after']:.3f} "
        f"| rise ≥ 0.20: {met(b['all_turns_rise'])} ({b['all_turns_rise'][0]:+.3f}) |",
        f"| every instruction held at turn 3 (three instructions) | {r['turn3_before']:.3f} | {r['turn3_after']:.3f} "
        f"| rise ≥ 0.15: {met(b['turn3_rise'])} ({b['turn3_rise'][0]:+.3f}) |",
        f"| every instruction held at turns 1 / 2 | {per(r['all_held_per_turn_before'][:2])} | "
        f"{per(r['all_held_per_turn_after'][:2])} | |",
        f"| mean episode reward (share of instructions kept) | {r['reward_before']:.3f} | {r['reward_after']:.3f} | "
        f"win rate {r['win_rate']:.2f} |",
        f"| kinds kept: {' / '.join(kinds)} | {per([kb.get(k, 0) for k in kinds], '.2f')} | "
        f"{per([ka[k] for k in kinds], '.2f')} | |",
        f"| reply tokens per turn | {per(r['tokens_per_turn_before'], '.0f')} | {per(r['tokens_per_turn_after'], '.0f')} | |",
        f"| KL per episode (turns 1 / 2 / 3), nats | | {r['kl']:.1f} ({per(r['kl_per_turn'], '.1f')}) | |",
        f"| replies' perplexity under the reference | {r['ppl_before']:.1f} | {r['ppl_after']:.1f} | ratio ≤ 1.5: "
        f"{met(b['ppl_ratio'])} ({r['ppl_ratio']:.2f}) |",
        f"| training time (sampling {r['sample_seconds']:,.0f} s) | | {r['train_seconds']:,.0f} s | ≤ 30 min: "
        f"{met(b['train_seconds'])} |",
        f"| peak memory of the process (training and evaluation) | | {r['peak_mb']:,.0f} MB | ≤ 4 GB: {met(b['peak_mb'])} |",
    ]
    return "\n".join(rows)


def kl_coef(r: dict) -> float:
    """The run's kl_coef as its JSON records it (runs before it did: their command's flag, else the file's name)."""
    if "kl_coef" in r:
        return r["kl_coef"]
    flag = [a for a in r["command"].split() if a.startswith("--kl_coef=")]
    return float(flag[-1].split("=")[1]) if flag else float(r["file"].removeprefix("multiturn-kl").removesuffix(".json"))


def kl_table(results: list[dict]) -> str:
    rows = ["| kl_coef | every-turn rise | turn-3 rise | perplexity ratio | KL per episode, nats | training s | peak MB "
            "| commit |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=kl_coef):
        b = r["bars"]
        cell = lambda bar, f: f"{bar[0]:{f}}" + ("" if bar[1] else " (not met)")  # noqa: E731
        rows.append(f"| {kl_coef(r):g} | {cell(b['all_turns_rise'], '+.3f')} | {cell(b['turn3_rise'], '+.3f')} | "
                    f"{cell(b['ppl_ratio'], '.2f')} | {r['kl']:.1f} | {r['train_seconds']:,.0f} | "
                    f"{cell(b['peak_mb'], ',.0f')} | {r['commit']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    results = ROOT / "benchmarks" / "results"
    if sys.argv[1:] == ["--kl"]:
        print(kl_table([json.loads(f.read_text()) | {"file": f.name} for f in sorted(results.glob("multiturn*.json"))]))
    else:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else results / "multiturn.json"
        print(table(json.loads(path.read_text())))
