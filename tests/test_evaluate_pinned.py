"""The evaluation's figures pinned to values worked out by hand on one small fixed batch, and report.md: only
plots that exist, and the Health section.

The batch: 4 responses, two padded; one reward tie. Every expected value below is arithmetic written out here,
never a call to the code under test, and each is chosen so that a plausible wrong formula (ties as 0 or 1,
padding counted, distinct-n averaged per response, perplexity as a mean of per-response perplexities) gives a
different number.
"""

import math
import re

import pytest
import torch

from minirlhf.ops import response_kl
from minirlhf.report import plot_links
from minirlhf.stages.evaluate import (HEALTH_CHECKS, _gather, _summary, distinct_n, perplexity, response_nll,
                                     rl_report, win_rate)
from minirlhf.rl.grpo import GRPOConfig
from minirlhf.rl.ppo import PPOConfig
from minirlhf.stages.rl import train
from minirlhf.config import load_config
from minirlhf.rundir import RunDir

INF = float("inf")
TEXTS = ["The cat sat", "the cat ran", "good", "the the the"]
POLICY_REWARD = torch.tensor([1.0, 0.5, -0.2, 0.9])
REFERENCE_REWARD = torch.tensor([0.0, 0.5, 0.1, 0.3])  # response 1: a tie
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)  # (B, T) 3, 2, 1, 3 tokens
# padding (mask 0) holds garbage, even -inf: none of it may reach a figure
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 50.0], [-2.0, 50.0, 50.0], [-0.1, -0.2, -0.3]])
REF_LOGPROBS = torch.tensor([[-1.5, -1.0, -0.5], [-0.8, -1.2, -INF], [-1.0, -50.0, -50.0], [-0.2, -0.2, -0.5]])


def test_win_rate_counts_a_tie_as_half():
    # win, tie, loss, win; ties as 0 would give 0.5, as 1 give 0.75, left out give 2/3
    assert win_rate(POLICY_REWARD, REFERENCE_REWARD) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate(REFERENCE_REWARD, POLICY_REWARD) == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert win_rate(torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0])) == pytest.approx(0.5)


def test_kl_per_response_sums_log_ratios_over_real_tokens_only():
    # log pi - log pi_ref on each real token; the padding's 50 - (-inf) and 50 - (-50) never count
    per_response = [(-1.0 + 1.5) + (-2.0 + 1.0) + (-0.5 + 0.5),  # -0.5
                    (-0.3 + 0.8) + (-1.2 + 1.2),  # 0.5
                    (-2.0 + 1.0),  # -1.0
                    (-0.1 + 0.2) + (-0.2 + 0.2) + (-0.3 + 0.5)]  # 0.3
    kl = response_kl(LOGPROBS, REF_LOGPROBS, MASK)
    assert kl.shape == (4,) and kl.tolist() == pytest.approx(per_response, abs=1e-6)
    assert kl.mean().item() == pytest.approx((-0.5 + 0.5 - 1.0 + 0.3) / 4, abs=1e-6)  # the report's "KL per response"


def test_perplexity_under_the_reference_is_exp_of_the_mean_nll_per_real_token():
    nll = response_nll(REF_LOGPROBS, MASK)
    assert nll.tolist() == pytest.approx([1.5 + 1.0 + 0.5, 0.8 + 1.2, 1.0, 0.2 + 0.2 + 0.5], abs=1e-6)
    # all real tokens pooled: 6.9 nats over 9 tokens. A mean of per-response perplexities would give
    # (3 e^1 + e^0.3) / 4 = 2.376; exp of the mean per-response NLL, exp(3.3 / 4) = 2.282; this is 2.153
    expected = math.exp((3.0 + 2.0 + 1.0 + 0.9) / (3 + 2 + 1 + 3))
    assert perplexity(nll, MASK.sum(1)) == pytest.approx(expected, rel=1e-6)
    assert perplexity(torch.zeros(2), torch.zeros(2)) == 1.0  # no tokens at all: no surprise, not a division by 0


def test_distinct_n_counts_n_grams_over_the_whole_batch():
    # words (lower-cased): the cat sat | the cat ran | good | the the the
    # unigrams: 3 + 3 + 1 + 3 = 10, distinct {the, cat, sat, ran, good} = 5 (per-response mean: (1 + 1 + 1 + 1/3) / 4)
    assert distinct_n(TEXTS, 1) == pytest.approx(5 / 10)
    # bigrams: 2 + 2 + 0 + 2 = 6, distinct {the cat, cat sat, cat ran, the the} = 4; "good" adds none
    assert distinct_n(TEXTS, 2) == pytest.approx(4 / 6)
    assert distinct_n(["good", ""], 2) == 0.0  # no bigram anywhere


def test_the_summary_pools_batches_before_dividing():
    """evaluate_policy answers in batches and gathers them: the figures are over all 4 responses, not a mean of the
    two batches' figures (batch 1's perplexity exp(5/5), batch 2's exp(1.9/4); distinct-1 4/6 and 2/4)."""
    chunks = [{"texts": TEXTS[i: i + 2], "reward": POLICY_REWARD[i: i + 2], "tokens": MASK[i: i + 2].sum(1),
               "kl": response_kl(LOGPROBS[i: i + 2], REF_LOGPROBS[i: i + 2], MASK[i: i + 2]),
               "ref_nll": response_nll(REF_LOGPROBS[i: i + 2], MASK[i: i + 2])} for i in (0, 2)]
    side = _summary(_gather(chunks))
    assert side["reward"] == pytest.approx((1.0 + 0.5 - 0.2 + 0.9) / 4)
    assert side["mean_tokens"] == pytest.approx((3 + 2 + 1 + 3) / 4)
    assert side["distinct_1"] == pytest.approx(5 / 10) and side["distinct_2"] == pytest.approx(4 / 6)
    assert side["ref_perplexity"] == pytest.approx(math.exp(6.9 / 9), rel=1e-6)


# --- report.md ---

def _results(**extra) -> dict:
    side = {"reward": 0.1, "distinct_1": 0.5, "distinct_2": 0.7, "mean_tokens": 9.0, "ref_perplexity": 20.0}
    return {"prompts": 4, "policy": side, "reference": side, "win_rate": 0.625, "kl": -0.175,
            "samples": [{"prompt": "hi", "reference": "a", "reference_reward": 0.0, "policy": "b", "policy_reward": 1.0}],
            **extra}


@pytest.fixture
def cfg(tmp_path):
    return load_config(PPOConfig, overrides=[f"--out={tmp_path}"])


def _linked(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


@pytest.mark.parametrize("as_rundir", [False, True])  # training passes a RunDir, as does `minirlhf evaluate`
def test_report_links_only_the_plots_that_exist(tmp_path, cfg, as_rundir):
    (tmp_path / "reward.png").write_bytes(b"\x89PNG")  # policy.png and value.png (no critic) absent
    (tmp_path / "kl.png").write_bytes(b"\x89PNG")
    report = rl_report(RunDir(tmp_path) if as_rundir else tmp_path, _results(), cfg).read_text()
    assert _linked(report) == ["reward.png", "kl.png"]
    assert all((tmp_path / name).is_file() for name in _linked(report))
    assert plot_links(tmp_path, ["loss"]) == [] and plot_links(tmp_path, ["kl"]) == ["![kl](kl.png)"]


def test_health_section_lists_each_guard_that_fired(tmp_path, cfg):
    health = [{"step": 3, "guard": "kl", "message": "KL 12.5 nats per response,\nover the 10 allowed"},
              {"step": 7, "guard": "distinct_2", "message": "distinct-2 fell to 0.05"}]
    report = rl_report(tmp_path, _results(health=health), cfg).read_text()
    section = report.split("## Health\n", 1)[1].split("\n\n", 1)[0]
    assert section.strip().splitlines() == ["- step 3 - kl: KL 12.5 nats per response, over the 10 allowed",
                                            "- step 7 - distinct_2: distinct-2 fell to 0.05"]
    assert report.index("## Health") < report.index("## Samples")


def test_health_section_says_when_no_check_fired_and_is_absent_without_the_key(tmp_path, cfg):
    report = rl_report(tmp_path, _results(health=[]), cfg).read_text()
    line = report.split("## Health\n", 1)[1].strip().splitlines()[0]
    assert line.startswith("No health check fired during training")
    assert all(check in line for check in ("responses ending", "group reward variance", "KL", "response length",
                                           "distinct-2", "reward vs reference perplexity"))
    assert len(HEALTH_CHECKS) == 6
    assert "## Health" not in rl_report(tmp_path, _results(), cfg).read_text()  # `minirlhf evaluate` alone


def test_a_run_without_a_critic_links_only_the_plots_it_wrote(tiny_generator, tmp_path):
    """GRPO on the LSTM trains no value head, so writes no value.png: its report must not link one."""
    run = train(load_config(GRPOConfig, overrides=[
        f"--policy={tiny_generator}", "--reward.classifier_weight=0", "--reward.length_weight=1", "--steps=1",
        "--batch_size=4", "--group_size=2", "--prompts.max_eval=4", "--data.max_train=400", "--data.max_eval=100",
        f"--out={tmp_path / 'run'}", "--device=cpu"]))
    linked = _linked((run / "report.md").read_text())
    assert "reward.png" in linked and "value.png" not in linked
    assert all((run / name).is_file() for name in linked), linked
