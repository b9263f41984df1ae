"""How each round of `minirlhf loop` sets up its policy stage: RL against the round's reward model (on episodes of
the loop's environment with --env: loop_episodes.py), or online DPO on the round's new pairs. `cfg` is the loop's
LoopConfig, `r` the round (loop.Round: its k, policy, reward_model, labels, folder)."""

from __future__ import annotations

import dataclasses

from minirlhf.rl import registry

from minirlhf.stages import dpo, rl
from minirlhf.config import load_config
from minirlhf.feedback import loop_episodes


def run_settings(cfg) -> dict:
    """What every stage of the loop takes from the loop's own config: device, precision, dashboards."""
    return dict(device=cfg.device, dtype=cfg.dtype, report_to=cfg.report_to, strategy=cfg.strategy)


def rl_stage(cfg, r) -> tuple:
    """RL against the round's reward model, from the round's policy, with the first policy as the reference."""
    cls = registry.get(cfg.method).config
    base = load_config(cls, overrides=cfg.policy_args)
    episodes = loop_episodes.rl_settings(cfg, r.reward_model, r.folder) if cfg.env.name else {}
    stage_cfg = dataclasses.replace(
        base, policy=r.policy, ref_policy="" if r.policy == cfg.policy else cfg.policy,
        policy_options=cfg.policy_options, reward=dataclasses.replace(base.reward, reward_model=str(r.reward_model)),
        data=cfg.data, steps=cfg.steps, response_len=cfg.response_len,
        kl_coef=base.kl_coef if cfg.kl_coef is None else cfg.kl_coef, seed=cfg.seed * 1009 + r.k,
        **{"prompts": cfg.prompts} | run_settings(cfg) | episodes)  # episodes: env and its openings
    return rl.train, stage_cfg


def dpo_stage(cfg, r) -> tuple:
    """Online DPO on the round's new pairs, from the round's policy, with the first policy as the reference."""
    base = load_config(dpo.DPOConfig, overrides=cfg.policy_args)
    stage_cfg = dataclasses.replace(
        base, policy=r.policy, ref_policy="" if r.policy == cfg.policy else cfg.policy,
        policy_options=cfg.policy_options, preferences=str(r.labels), train=dataclasses.replace(base.train, steps=cfg.steps),
        beta=base.beta if cfg.kl_coef is None else cfg.kl_coef, max_response_tokens=cfg.response_len + 1,
        seed=cfg.seed * 1009 + r.k, **run_settings(cfg))
    return dpo.train, stage_cfg


POLICY_ROUNDS = {"dpo": dpo_stage}
"""how a round trains its policy, by method; every other method is an RL algorithm of the registry"""
