"""`minirlhf evaluate RUN_DIR`: the trained policy against its reference on held-out prompts (or episodes).

Both answer every prompt (same seed); the reward model scores both. Reported: mean reward of each, the
policy's win rate, KL(policy || reference) per response, distinct-1/2 (lexical diversity), and the
perplexity of the responses under the reference (how far from the reference's language they drift).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from minirlhf import RunError, ops
from minirlhf.rl import registry
from minirlhf.checkpoint import load_json, save_json
from minirlhf.config import load_saved
from minirlhf.data.prompts import load_prompts
from minirlhf.data.vocab import tokenize
from minirlhf.envs.base import env_factory, env_prompts
from minirlhf.models.episodes import sample_episodes
from minirlhf.models.load import load_policy, load_reference
from minirlhf.models.rewards import TERMS, Reward
from minirlhf.ops import response_kl, token_kl, turn_index, turn_sums
from minirlhf.registry import noun
from minirlhf.report import before_after, md_cell, plot_links, section, table, write_report
from minirlhf.rundir import RunDir
from minirlhf.runtime import pick_device


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over all texts, by words (Li et al., 2016).

    Counted over the whole batch, not averaged per text: an n-gram that two responses share counts once in the
    numerator and twice in the denominator. Words are `tokenize`'s (lower-cased, punctuation split off); a text
    shorter than n words adds no n-grams; no n-grams at all gives 0.
    """
    grams = [tuple(w[i: i + n]) for w in map(tokenize, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(policy_reward: torch.Tensor, reference_reward: torch.Tensor) -> float:
    """Share of prompts on which the policy's response out-scores the reference's, a tie counting half. (N,), (N,)."""
    return ops.win_rate(ops.win_outcomes(policy_reward, reference_reward))


def response_nll(ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each response under the reference, real tokens only: (B, T) -> (B,)."""
    return -torch.where(mask.bool(), ref_logprobs, 0.0).sum(1)


def perplexity(nll: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp(sum nll / sum tokens): exp of the mean NLL per real token over all responses, so a long response weighs
    more than a short one (corpus perplexity, not a mean of per-response perplexities). nll, tokens (N,); no
    tokens at all gives 1."""
    return torch.exp(nll.sum() / tokens.sum().clamp(min=1)).item()


@torch.no_grad()
def _answer(policy, ref, reward, prompts: list[str], response_len: int, gen) -> dict:
    """Sample from `policy`; score the responses; their log-probs under the reference."""
    rollout = policy.sample(prompts, response_len, gen)
    total, _ = reward(policy, rollout)
    ref_logprobs, _, _ = ref(rollout, entropy=False)
    mask = rollout.response_mask
    return {"texts": rollout.texts, "reward": total.cpu(), "tokens": mask.sum(1).cpu(),
            "kl": response_kl(rollout.logprobs, ref_logprobs, mask).cpu(),
            "ref_nll": response_nll(ref_logprobs, mask).cpu()}


def _gather(chunks: list[dict]) -> dict:
    return {k: sum((c[k] for c in chunks), []) if isinstance(chunks[0][k], list) else torch.cat([c[k] for c in chunks])
            for k in chunks[0]}


def _summary(side: dict) -> dict:
    return {"reward": side["reward"].mean().item(), "distinct_1": distinct_n(side["texts"], 1),
            "distinct_2": distinct_n(side["texts"], 2), "mean_tokens": side["tokens"].float().mean().item(),
            "ref_perplexity": perplexity(side["ref_nll"], side["tokens"])}


@torch.no_grad()
def held_out_reward(policy, reward, prompts: list[str], cfg, seed: int = 0) -> float:
    """Mean reward of one sampled response per held-out prompt: the quick check `eval_every` logs."""
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    totals = [reward(policy, policy.sample(prompts[i: i + cfg.batch_size], cfg.response_len, gen))[0]
              for i in range(0, len(prompts), cfg.batch_size)]
    return torch.cat(totals).mean().item()


def evaluate_policy(policy, ref, reward, prompts: list[str], cfg, seed: int = 0, n_samples: int = 8) -> dict:
    """Policy vs reference on `prompts`, in batches of cfg.batch_size; a dict of figures plus samples."""
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ours, theirs = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start: start + cfg.batch_size]
        ours.append(_answer(policy, ref, reward, chunk, cfg.response_len, gen))
        theirs.append(_answer(ref, ref, reward, chunk, cfg.response_len, gen))
    ours, theirs = _gather(ours), _gather(theirs)
    policy_side, reference_side = _summary(ours), _summary(theirs)
    return {"prompts": len(prompts), "reward_policy": policy_side["reward"], "reward_reference": reference_side["reward"],
            "win_rate": win_rate(ours["reward"], theirs["reward"]), "kl": ours["kl"].mean().item(),
            "policy": policy_side, "reference": reference_side,
            "samples": [{"prompt": p, "reference": t, "reference_reward": round(tr, 3), "policy": o,
                         "policy_reward": round(orew, 3)}
                        for p, t, tr, o, orew in zip(prompts, theirs["texts"], theirs["reward"].tolist(),
                                                     ours["texts"], ours["reward"].tolist())][:n_samples]}


HEALTH_CHECKS = ("responses ending", "group reward variance", "KL", "response length", "distinct-2",
                 "reward vs reference perplexity")
"""what the RL training guards watch, named in report.md when none of them fired"""


def health_section(health: list[dict] | None) -> list[str]:
    """report.md's `## Health` lines from results["health"] (a list of {"step", "guard", "message"}): a bullet per
    guard that fired, or one line saying none did; no section without the key (`minirlhf evaluate` alone)."""
    if health is None:
        return []
    if not health:
        return section("Health", [f"No health check fired during training (checked: {', '.join(HEALTH_CHECKS)})."])
    return section("Health", [f"- step {h['step']} - {h['guard']}: {' '.join(str(h['message']).split())}"
                              for h in health])


def sample_table(step: int, rollout, terms: dict, n: int = 6) -> str:
    """A Markdown table of the step's first n prompts, responses and rewards, for samples.md."""
    rows = [[md_cell(p), md_cell(r), f"{s:+.2f}"]
            for p, r, s in zip(rollout.prompts[:n], rollout.texts[:n], terms["total"][:n].tolist())]
    return "\n".join([f"\n## step {step}\n", *table(["prompt", "response", "reward"], rows)]) + "\n"


def training_plots(metrics, run_dir, critic: bool) -> None:
    """The PNGs report.md shows: reward, KL, policy diagnostics, and the critic's where there is one."""
    run = RunDir(run_dir)
    metrics.plot(run.plot("reward"), ["reward/mean"], "mean reward of the sampled responses")
    metrics.plot(run.plot("kl"), ["objective/kl"], "KL(policy || reference) per response, nats")
    metrics.plot(run.plot("policy"), ["policy/approx_kl", "policy/clipfrac", "objective/entropy"], "policy diagnostics")
    if critic:
        metrics.plot(run.plot("value"), ["value/loss", "value/explained_var"], "value head")


def rl_report(run_dir, results: dict, cfg) -> Path:
    """report.md of an RL run: the figures, the training plots, and samples before (reference) and after (policy)."""
    p, r = results["policy"], results["reference"]
    figures = before_after([
        ("mean reward", f"{r['reward']:+.3f}", f"{p['reward']:+.3f}"),
        ("win rate of the policy", "", f"{results['win_rate']:.3f}"),
        ("KL(policy \\|\\| reference) per response, nats", "0", f"{results['kl']:.3f}"),
        ("distinct-1 / distinct-2", f"{r['distinct_1']:.3f} / {r['distinct_2']:.3f}",
         f"{p['distinct_1']:.3f} / {p['distinct_2']:.3f}"),
        ("perplexity under the reference", f"{r['ref_perplexity']:.2f}", f"{p['ref_perplexity']:.2f}"),
        ("mean response tokens", f"{r['mean_tokens']:.1f}", f"{p['mean_tokens']:.1f}")],
        "reference (before)", "policy (after)")
    memory = results.get("memory")  # written by training (evaluate alone does not train)
    memory = ["Memory, MiB: " + ", ".join(f"{k.split('/')[1].replace('_mb', '')} {v:,.1f}" for k, v in memory.items())
              + " (parameters shared by policy, reference and critic counted once)"] if memory else []
    samples = table(["prompt", "reference (before)", "reward", "policy (after)", "reward"],
                    [[md_cell(s["prompt"]), md_cell(s["reference"]), f"{s['reference_reward']:+.2f}",
                      md_cell(s["policy"]), f"{s['policy_reward']:+.2f}"] for s in results["samples"]])
    return write_report(run_dir, f"{cfg.algorithm.upper()} run `{run_dir}`",
                        f"Policy `{cfg.policy}`, reward: {_reward_text(cfg)}; {results['prompts']} held-out prompts.",
                        figures, memory, health_section(results.get("health")),
                        plot_links(run_dir, ("reward", "kl", "policy", "value")), section("Samples", samples))


def in_minibatches(fn, rollout, size: int) -> torch.Tensor:
    """fn(rollout) (B, T) computed `size` rows at a time."""
    n = len(rollout.prompts)
    if n <= size:
        return fn(rollout)
    return torch.cat([fn(rollout.select(list(range(i, min(i + size, n))))) for i in range(0, n, size)])


@torch.no_grad()
def _side(policy, ref, make_env, cfg, seeds: list[int], seed: int) -> dict:
    """One policy's episodes of `seeds` (in batches), with their log-probs under the reference."""
    out = {"episodes": [], "kl": [], "nll": [], "tokens": []}
    K, size = cfg.env.turns, cfg.batch_size
    for start in range(0, len(seeds), size):
        chunk = seeds[start: start + size]
        gens = [torch.Generator(device=next(policy.parameters()).device).manual_seed(seed * 1_000_003 + s)
                for s in chunk]
        episodes = sample_episodes(policy, [make_env() for _ in chunk], chunk, K, cfg.response_len, gens)
        r = episodes.rollout
        ref_logprobs = in_minibatches(lambda x: ref(x, entropy=False)[0], r, 4)  # the logits are the peak memory
        turns = turn_index(r.response_mask, r.turn_ids)
        kl = token_kl(r.logprobs, ref_logprobs, r.response_mask)  # (B, T)
        r.frozen_hidden = None  # (B, P+T, H), kept by a split trunk's sampler for the pass above: not kept 128 times
        out["episodes"].append(episodes)
        out["kl"].append(turn_sums(kl, turns, K).cpu())
        out["nll"].append(turn_sums(-torch.where(r.response_mask.bool(), ref_logprobs, 0.0), turns, K).cpu())
        out["tokens"].append(turn_sums(r.response_mask.float(), turns, K).cpu())
    return out


def _figures(side: dict, how: str) -> dict:
    """Per-turn reward, KL and perplexity under the reference; for `constraints`, compliance per turn and kind."""
    eps = side["episodes"]
    rewards, reached = torch.cat([e.rewards for e in eps]), torch.cat([e.reached for e in eps]).float()
    infos = [i for e in eps for i in e.infos]
    nll, tokens, kl = (torch.cat(side[k]) for k in ("nll", "tokens", "kl"))
    per_turn = lambda x: [(x[:, k] * reached[:, k]).sum().item() / max(reached[:, k].sum().item(), 1)  # noqa: E731
                          for k in range(x.size(1))]
    out = {"reward": torch.cat([e.episode_reward(how) for e in eps]).mean().item(),
           "reward_per_turn": per_turn(rewards), "kl_per_turn": per_turn(kl), "kl": kl.sum(1).mean().item(),
           "ref_perplexity": perplexity(nll.sum(1), tokens.sum(1)),
           "ref_perplexity_per_turn": [perplexity(nll[:, k], tokens[:, k]) for k in range(nll.size(1))],
           "mean_tokens_per_turn": per_turn(tokens)}
    if infos and all("all" in i for turn in infos for i in turn):
        out["all_turns"] = sum(all(i["all"] for i in turn) for turn in infos) / len(infos)
        out["all_held_per_turn"] = [sum(t[k]["all"] for t in infos if len(t) > k) / max(1, sum(len(t) > k for t in infos))
                                    for k in range(rewards.size(1))]
        kinds: dict[str, list[bool]] = {}
        for turn in infos:
            for info in turn:
                for kind, ok in info.get("satisfied", {}).items():
                    kinds.setdefault(kind, []).append(bool(ok))
        out["kinds"] = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    return out


def evaluate_episodes(policy, ref, make_env, cfg, n: int, seed: int = 0, n_samples: int = 4) -> dict:
    """Policy and reference play the same `n` held-out episodes (seeds 0..n-1, the same sampling seeds) of fresh
    environments from `make_env`: per-turn reward, KL and perplexity under the reference; for `constraints`, the
    share of replies keeping each instruction kind and of episodes keeping every instruction at every turn."""
    seeds = list(range(n))
    ours, theirs = _side(policy, ref, make_env, cfg, seeds, seed), _side(ref, ref, make_env, cfg, seeds, seed)
    how = cfg.env.reward
    mine, base = _figures(ours, how), _figures(theirs, how)
    reward_p = torch.cat([e.episode_reward(how) for e in ours["episodes"]])
    reward_r = torch.cat([e.episode_reward(how) for e in theirs["episodes"]])
    conversations = lambda side: [m for e in side["episodes"] for m in e.rollout.messages][:n_samples]  # noqa: E731
    return {"episodes": n, "turns": cfg.env.turns, "env": cfg.env.name,
            "reward_policy": mine["reward"], "reward_reference": base["reward"], "win_rate": win_rate(reward_p, reward_r),
            "kl": mine["kl"], "policy": mine, "reference": base,
            "ppl_ratio": mine["ref_perplexity"] / base["ref_perplexity"],
            "samples": [{"seed": s, "reference": r, "policy": p}
                        for s, r, p in zip(seeds, conversations(theirs), conversations(ours))]}


def conversation_md(messages: list[dict]) -> str:
    """A conversation as Markdown lines, each turn labelled."""
    return "\n".join(f"> **{m['role']}**: {md_cell(m['content'])}  " for m in messages)


def episode_report(run_dir, results: dict, cfg) -> Path:
    """report.md of an episode run: per-turn figures of reference and policy, compliance by kind, conversations."""
    p, r = results["policy"], results["reference"]
    turns = range(len(p["reward_per_turn"]))
    row = lambda name, key, fmt: (name, " / ".join(format(v, fmt) for v in r[key]),  # noqa: E731
                                  " / ".join(format(v, fmt) for v in p[key]))
    rows = [(f"episode reward ({cfg.env.reward} of turns)", f"{r['reward']:.3f}", f"{p['reward']:.3f}"),
            row("reward per turn", "reward_per_turn", ".3f"),
            ("win rate of the policy", "", f"{results['win_rate']:.3f}"),
            ("KL(policy \\|\\| reference) per episode, nats", "0", f"{results['kl']:.3f}"),
            row("KL per turn, nats", "kl_per_turn", ".2f"),
            ("perplexity of the replies under the reference", f"{r['ref_perplexity']:.2f}", f"{p['ref_perplexity']:.2f}"),
            row("perplexity per turn", "ref_perplexity_per_turn", ".2f"),
            row("reply tokens per turn", "mean_tokens_per_turn", ".1f")]
    if "all_turns" in p:
        rows += [("every instruction held at every turn", f"{r['all_turns']:.3f}", f"{p['all_turns']:.3f}"),
                 row("every instruction held, per turn", "all_held_per_turn", ".3f")]
        rows += [(f"instruction `{k}` held", f"{r['kinds'].get(k, float('nan')):.3f}", f"{v:.3f}")
                 for k, v in p["kinds"].items()]
    conversations = [[f"### episode {s['seed']}: {who}", "", conversation_md(s[side])]
                     for s in results["samples"] for who, side in (("reference (before)", "reference"),
                                                                   ("policy (after)", "policy"))]
    return write_report(run_dir, f"{cfg.algorithm.upper()} on `{cfg.env.name}` episodes, run `{run_dir}`",
                        f"Policy `{cfg.policy}`; {results['episodes']} held-out episodes of at most {cfg.env.turns} "
                        f"assistant turns (seeds 0..{results['episodes'] - 1}); per turn: "
                        + ", ".join(f"turn {k + 1}" for k in turns),
                        before_after(rows, "reference (before)", "policy (after)"),
                        plot_links(run_dir, ("reward", "kl", "policy", "value")),
                        section("Sample conversations", *conversations))


def _reward_text(cfg) -> str:
    on = {"function": bool(cfg.reward.function), "reward_model": bool(cfg.reward.reward_model),
          "classifier": bool(cfg.reward.classifier or not cfg.reward.reward_model)}
    terms = [f"{getattr(cfg.reward, t + '_weight'):g} x {t}" for t in TERMS
             if getattr(cfg.reward, t + "_weight") and on.get(t, True)]
    return " + ".join(terms) or "none"


def rl_run(path: str | Path) -> tuple[RunDir, object]:
    """An RL run with a checkpoint, and the config it was trained with as its algorithm's own dataclass."""
    run = RunDir.find(path)
    if run is None or run.stage != "rl" or run.policy() is None:
        what = "not a minirlhf run" if run is None else f"{noun(run.stage)} run" if run.stage != "rl" else "not saved yet"
        raise RunError(f"{path} is not an RL run with a checkpoint ({what}); train one with `minirlhf ppo`")
    return run, load_saved(registry.get(run.algorithm).config, run.config)


def evaluate_run(run_dir: str, prompts_file: str | None, n: int | None, seed: int, device_name: str) -> dict:
    """Evaluate a finished RL run; writes eval.json and report.md into it."""
    run, cfg = rl_run(run_dir)
    if prompts_file is not None:
        cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, eval_file=prompts_file))
    if n is not None:
        cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, max_eval=n))
    device, _ = pick_device(device_name)
    policy = load_policy(str(run.path), device, value_head=False)  # as it was trained: its policy.json says how
    ref = load_reference(cfg.ref_policy or cfg.policy, device, chat_template=cfg.policy_options.chat_template)
    if cfg.env.name:
        make_env = env_factory(cfg.env, env_prompts(cfg.env, cfg.prompts, cfg.data)[1], cfg.seed, device)
        results = evaluate_episodes(policy, ref, make_env, cfg, cfg.prompts.max_eval, seed=seed)
    else:
        reward = Reward(dataclasses.replace(cfg.reward, normalize=False), cfg.response_len, device)
        _, prompts = load_prompts(cfg.prompts, cfg.data)
        results = evaluate_policy(policy, ref, reward, prompts, cfg, seed=seed)
    save_json(results, run.eval)
    trained = load_json(run.results) if run.results.is_file() else {}
    report = episode_report if cfg.env.name else rl_report
    report(run, results | {k: trained[k] for k in ("health",) if k in trained}, cfg)  # what training found
    print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2))
    print(f"report: {run.report}")
    return results
