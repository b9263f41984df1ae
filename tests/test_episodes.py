"""Multi-turn episodes: the masks, GAE and reward placement against naive loops, zero gradient on the user's tokens,
the sampled log-probs against one forward pass of the whole conversation, and every RL algorithm on episodes."""

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from minirlhf.rl import registry
from minirlhf.rl.core import KLTerms, k3_in_loss, policy_loss, value_loss
from minirlhf.models.policy import Rollout
from minirlhf.ops import gae, place_turn_rewards, returns_to_go, token_rewards, turn_index, turn_sums


def episode_masks(seed: int = 0, B: int = 5, T: int = 17, K: int = 3):
    """Random episodes laid out as the sampler lays them: assistant turns with user tokens between them, then
    padding. Returns response_mask (1 on assistant tokens), attention (1 on every token), turn_ids (B, T)."""
    rng = random.Random(seed)
    mask, seen, turns = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        t = 0
        for k in range(rng.randint(1, K)):
            n = rng.randint(1, 3)
            if t + n > T:
                break
            mask[b, t: t + n], seen[b, t: t + n], turns[b, t: t + n] = 1, 1, k
            t += n
            u = rng.randint(1, 3)  # the user's tokens (and the template's) after the turn
            seen[b, t: t + u] = 1
            t += u
    return mask, seen, turns


def naive_gae(rewards, values, mask, gamma, lam):
    """GAE on each row's assistant tokens only, as if the user's tokens were not there."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        idx = [t for t in range(rewards.size(1)) if mask[b, t] == 1]
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_value = values[b, idx[j + 1]].item() if j + 1 < len(idx) else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t], ret[b, t] = last, last + values[b, t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_runs_over_the_assistant_tokens_only(gamma, lam):
    mask, seen, _ = episode_masks(1)
    rewards, values = torch.randn(mask.shape) * seen, torch.randn(mask.shape) * seen  # user positions hold junk too
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = naive_gae(rewards * mask, values * mask, mask, gamma, lam)
    assert torch.allclose(adv, want_adv, atol=1e-5) and torch.allclose(ret, want_ret, atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_each_turns_reward_lands_on_that_turns_last_assistant_token():
    mask, _, turns = episode_masks(2)
    K = 3
    scores = torch.randn(mask.size(0), K)
    kl = torch.rand(mask.shape)
    placed = token_rewards(scores, kl, mask, 0.1, turns)
    want = -0.1 * kl * mask
    for b in range(mask.size(0)):
        for k in range(K):
            positions = [t for t in range(mask.size(1)) if mask[b, t] == 1 and turns[b, t] == k]
            if positions:
                want[b, positions[-1]] += scores[b, k]
    assert torch.allclose(placed, want, atol=1e-6)
    episode = place_turn_rewards(scores[:, 0], turn_index(mask, turns))  # one score: the episode's last token
    last = [max(t for t in range(mask.size(1)) if mask[b, t] == 1) for b in range(mask.size(0))]
    assert all(episode[b, last[b]] == scores[b, 0] and episode[b].abs().sum() == scores[b, 0].abs() for b in range(5))


def test_turn_sums_and_returns_to_go_against_loops():
    mask, _, turns = episode_masks(3)
    x = torch.randn(mask.shape)
    sums = turn_sums(x * mask, turn_index(mask, turns), 3)
    for b in range(mask.size(0)):
        for k in range(3):
            assert sums[b, k].item() == pytest.approx(sum(x[b, t].item() for t in range(mask.size(1))
                                                          if mask[b, t] and turns[b, t] == k), abs=1e-5)
    r = torch.randn(4, 3)
    assert torch.allclose(returns_to_go(r), torch.stack([r[:, 0] + r[:, 1] + r[:, 2], r[:, 1] + r[:, 2], r[:, 2]], 1))


def synthetic_episodes(B: int = 8) -> Rollout:
    mask, seen, turns = episode_masks(4, B=B)
    T = mask.size(1)
    logprobs = -torch.rand(B, T) * mask
    return Rollout(["p"] * B, torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                   torch.ones(B, T, dtype=torch.long), mask, ["r"] * B, torch.ones(B, dtype=torch.bool), logprobs,
                   torch.randn(B, T) * mask, torch.zeros(B, T), attention_mask=seen, turn_ids=turns)


@pytest.mark.parametrize("name", ["ppo", "grpo", "rloo", "dr_grpo", "a2c"])
def test_no_gradient_reaches_the_users_tokens(name):
    """Every algorithm's advantages, policy loss, KL term and value loss: a log-prob or value at a user token could
    hold anything and the gradient there is exactly 0."""
    algo, rollout = registry.get(name), synthetic_episodes()
    cfg = algo.config(group_size=4) if algo.grouped else algo.config()
    mask = rollout.response_mask
    ref = rollout.logprobs - 0.1 * torch.rand(mask.shape) * mask
    kl = KLTerms(ref, (rollout.logprobs - ref) * mask, ((rollout.logprobs - ref) * mask).sum(1))
    batch = algo.advantages(cfg, rollout, torch.randn(len(mask), 3), kl, 0.1)
    assert (batch.advantages[mask == 0] == 0).all()
    logprobs = (rollout.logprobs + torch.randn(mask.shape) * (1 - mask)).requires_grad_()  # junk at user tokens
    values = (rollout.values + torch.randn(mask.shape)).requires_grad_()
    loss, _ = policy_loss(logprobs, rollout.logprobs, batch.advantages, mask, 0.2)
    loss = loss + k3_in_loss(cfg, logprobs, batch, 0.1, mask.sum())[0]
    if batch.returns is not None:
        loss = loss + value_loss(values, batch.old_values, batch.returns, mask, 0.2)
    loss.backward()
    assert logprobs.grad[mask == 1].abs().sum() > 0 and (logprobs.grad[mask == 0] == 0).all()
    if batch.returns is not None:
        assert (values.grad[mask == 0] == 0).all() and (batch.returns[mask == 0] == 0).all()


def test_group_algorithms_credit_each_turn_with_what_follows_it():
    """GRPO with per-turn scores: a turn's advantage is its return-to-go standardised against the same turn of its
    group, so a last turn that did well is credited though its episode did badly overall, and a bad last turn is
    blamed though its episode did well."""
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1]] * 4, dtype=torch.float)  # turns of 2 tokens, a user token between
    turns = torch.tensor([[0, 0, 0, 1, 1, 0, 2, 2]] * 4)
    rollout = synthetic_episodes(4)
    rollout.response_mask, rollout.turn_ids, rollout.attention_mask = mask, turns, torch.ones_like(mask)
    scores = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    zero = torch.zeros_like(mask)
    for name in ("grpo", "dr_grpo", "rloo"):
        algo = registry.get(name)
        adv = algo.advantages(algo.config(group_size=4), rollout, scores, KLTerms(zero, zero, zero.sum(1)), 0.0).advantages
        assert (adv[[0, 2]][:, [6, 7]] > 0).all() and (adv[[1, 3]][:, [6, 7]] < 0).all()  # turn 3
        assert (adv[[0, 2]][:, [0, 1]] < 0).all() and (adv[[1, 3]][:, [0, 1]] > 0).all()  # turn 1: returns 1 vs 2
        assert (adv[:, [2, 5]] == 0).all()


@pytest.fixture(scope="module")
def smol():
    from minirlhf.models.load import load_policy
    return load_policy("smollm2", "cpu")


class Scripted:
    """An environment for the tests: a fixed opening, a fixed follow-up, reward = words in the reply. The questions
    get replies of different lengths (SmolLM2, seeds 0-3: 2, 4 and 8 tokens), so the KV cache kept across turns holds
    the padding after the short replies' ends."""

    def __init__(self, turns=3):
        self.turns, self.k = turns, 0

    def reset(self, seed):
        self.k = 0
        return [{"role": "user", "content": "Answer with one word only: yes or no. Is the sky blue?"}]

    def step(self, messages):
        self.k += 1
        done = self.k >= self.turns
        return None if done else "One word only: is grass green?", float(len(messages[-1]["content"].split())), \
            done, {"k": self.k}


def test_sampled_logprobs_equal_one_forward_pass_of_the_whole_conversation(smol):
    from minirlhf.models.episodes import sample_episodes

    episodes = sample_episodes(smol, [Scripted() for _ in range(4)], [0, 0, 1, 2], 3, 8,
                               [torch.Generator().manual_seed(b) for b in range(4)])
    r = episodes.rollout
    assert episodes.reached.all() and r.response_mask.sum() < r.attention_mask.sum()  # user tokens are holes
    first_turn = ((r.turn_ids == 0) & (r.response_mask == 1)).sum(1)
    assert len(set(first_turn.tolist())) > 1  # replies ended at different lengths: the cache went on past padding
    with torch.no_grad():
        logprobs, _, _ = smol(r)
        for b in range(4):  # each conversation alone, unpadded, through the model's own forward
            prompt = r.prompt_ids[b][r.prompt_mask[b] == 1].tolist()
            rest = r.response_ids[b][r.attention_mask[b] == 1].tolist()
            logits = smol.model(torch.tensor([prompt + rest])).logits[0, len(prompt) - 1: -1]  # (n, V)
            naive = logits.log_softmax(-1).gather(1, torch.tensor(rest).unsqueeze(1)).squeeze(1)
            on = r.response_mask[b][r.attention_mask[b] == 1] == 1
            assert torch.allclose(r.logprobs[b][r.attention_mask[b] == 1][on], naive[on], atol=3e-4)
    assert torch.allclose(logprobs, r.logprobs, atol=3e-4)
    assert [m["role"] for m in r.messages[0]] == ["user", "assistant"] * 3
    assert episodes.rewards[0, 0] == len(r.messages[0][1]["content"].split())


def test_the_next_users_turn_is_the_chat_templates_own_tokens(smol):
    """Opening + reply + `continuation` is exactly the tokeniser's reading of the template over the whole
    conversation, though the earlier tokens were never re-tokenised."""
    from minirlhf.models.episodes import continuation, opening_ids

    tok = smol.tokenizer
    messages = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a joke, in lowercase."}]
    opening = opening_ids(smol, messages[:1])
    reply = tok(messages[1]["content"], add_special_tokens=False)["input_ids"] + [smol.eos_id]
    ids = opening + reply + continuation(smol, messages, reply[-1])
    whole = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    cut = continuation(smol, messages, reply[-2])  # a reply cut at the length limit gets its end-of-turn token
    assert tok.decode(cut).startswith("<|im_end|>") and cut[1:] == continuation(smol, messages, reply[-1])


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_the_critic_and_the_group_algorithms_train_on_episodes(name, tmp_path):
    """Two steps of PPO (value head, GAE) and GRPO (groups of one seed) on SmolLM2 episodes; A2C, RLOO and Dr. GRPO
    differ from them only in their advantages, tested on episodes above (no gradient on the user's tokens, per-turn
    credit)."""
    from minirlhf.stages.rl import train
    from minirlhf.config import load_config

    algo = registry.get(name)
    grouped = ["--group_size=2"] if algo.grouped else []
    cfg = load_config(algo.config, overrides=[
        "--policy=smollm2", "--env.name=constraints", "--env.turns=2", "--steps=2", "--batch_size=2",
        "--minibatch_size=2", "--response_len=3", "--prompts.max_eval=1", "--save_every=2", "--device=cpu",
        "--policy_options.freeze_layers=28", "--train.lr=1e-3", f"--out={tmp_path / 'run'}", *grouped])
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["policy/loss"])) for r in rows)
    assert {"reward/turn_1", "reward/turn_2", "reward/all_turns"} <= set(rows[0])
    results = json.loads((run / "results.json").read_text())
    assert len(results["policy"]["reward_per_turn"]) == 2 and "all_turns" in results["policy"]
    assert "**assistant**" in (run / "report.md").read_text() and "**user**" in (run / "samples.md").read_text()
    from safetensors.torch import load_file
    from minirlhf.models.pretrained import smollm2_path
    before = load_file(smollm2_path() / "model.safetensors")
    after = load_file(run / "checkpoint" / "policy" / "model.safetensors")
    changed = [k for k in after if k in before and not torch.equal(after[k], before[k].to(after[k].dtype))]
    assert changed and all("layers.28" in k or "layers.29" in k or "norm" in k for k in changed)


USER_ENV = textwrap.dedent('''
    class Echo:
        """A user's own environment: asks for a word, rewards replies that contain it."""

        def __init__(self, turns):
            self.turns = turns

        def reset(self, seed):
            self.word, self.k = ["apple", "river", "stone"][seed % 3], 0
            return [{"role": "user", "content": f"Say the word {self.word}."}]

        def step(self, messages):
            self.k += 1
            reward = float(self.word in messages[-1]["content"].lower())
            done = self.k >= self.turns
            return (None if done else "Again, please."), reward, done, {}
''')


def test_a_users_own_environment_runs_unchanged_from_the_command_line(tmp_path):
    (tmp_path / "my_env.py").write_text(USER_ENV)
    out = subprocess.run([sys.executable, "-m", "minirlhf", "grpo", "--policy", "smollm2", "--env", "my_env:Echo",
                          "--env.turns=2", "--steps=1", "--batch_size=2", "--group_size=2", "--minibatch_size=2",
                          "--response_len=3", "--prompts.max_eval=2", "--policy_options.freeze_layers=29",
                          "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/turn_2" in rows[0] and "Say the word" in (tmp_path / "run" / "samples.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "minirlhf", "grpo", "--policy", "smollm2", "--env", "my_env:Nope",
                          "--out", "run2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "my_env:Nope" in bad.stderr


def test_the_judge_environment_follows_the_datas_user_turns_then_a_script():
    from minirlhf.envs.judge import FOLLOW_UPS, JudgeEnv

    seen = []

    def judge(prompts, replies):
        seen.append((prompts[0], replies[0]))
        return torch.tensor([float(len(replies[0]))])

    hh = "\n\nHuman: Hi, can you help me?\n\nAssistant: Sure.\n\nHuman: How do I boil an egg?\n\nAssistant:"
    env = JudgeEnv([hh], turns=3, judge=judge)
    messages = env.reset(7)
    assert messages == [{"role": "user", "content": "Hi, can you help me?"}]
    messages.append({"role": "assistant", "content": "Of course."})
    follow, reward, done, info = env.step(messages)
    assert follow == "How do I boil an egg?" and reward == len("Of course.") and not done and info["turn"] == 1
    assert seen[0] == ("\n\nHuman: Hi, can you help me?\n\nAssistant:", "Of course.")
    messages += [{"role": "user", "content": follow}, {"role": "assistant", "content": "Put it in water."}]
    follow, _, done, _ = env.step(messages)
    assert follow in FOLLOW_UPS and not done  # the data has no third user turn: the script follows
    messages += [{"role": "user", "content": follow}, {"role": "assistant", "content": "Yes."}]
    assert env.step(messages)[2] is True


def test_environments_are_found_by_name_and_bad_ones_stop_with_one_line(tmp_path, monkeypatch):
    from minirlhf import ConfigError
    from minirlhf.envs.base import EnvConfig, make_env
    from minirlhf.envs.constraints import ConstraintsEnv

    assert isinstance(make_env(EnvConfig(name="constraints", turns=2), []), ConstraintsEnv)
    (tmp_path / "my_envs.py").write_text(USER_ENV + "\nclass Broken:\n    def reset(self, seed):\n        return []\n")
    monkeypatch.chdir(tmp_path)
    env = make_env(EnvConfig(name="my_envs:Echo", turns=2), ["unused"])
    assert env.reset(1)[0]["content"] == "Say the word river."
    for name, words in (("nope", "unknown environment"), ("my_envs:Missing", "cannot load"), ("my_envs:Broken", "step()")):
        with pytest.raises(ConfigError, match=words):
            make_env(EnvConfig(name=name), [])
    with pytest.raises(ConfigError, match="reward=mean"):
        EnvConfig(name="constraints", reward="last", turn_credit="turn").check()
    EnvConfig(name="constraints", reward="last", turn_credit="episode").check()


def test_an_episodes_reward_is_its_last_turns_or_the_mean_of_those_it_had():
    from minirlhf.models.episodes import Episodes

    rewards = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.4, 0.0]])
    reached = torch.tensor([[True, True, True], [True, True, False]])
    episodes = Episodes(None, rewards, reached, [[], []])
    assert torch.allclose(episodes.episode_reward("last"), torch.tensor([0.0, 0.4]))
    assert torch.allclose(episodes.episode_reward("mean"), torch.tensor([0.5, 0.3]))


def test_generate_plays_conversations_through_the_same_sampler(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minirlhf", "generate", "smollm2", "--env", "constraints", "--turns",
                          "2", "-n", "2", "--max-new-tokens", "4", "--seed", "3"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines if line.startswith("---")] == ["--- episode 3", "--- episode 4"]
    assert sum(line.startswith("user: ") for line in lines) == 4 and sum(line.startswith("assistant: ") for line in lines) == 4


def test_judge_episodes_are_scored_by_the_judge_turn_by_turn(smol, tmp_path, monkeypatch):
    from minirlhf.rl.grpo import GRPOConfig
    from minirlhf.stages.rl_episodes import EpisodeSource
    from minirlhf.config import load_config

    (tmp_path / "my_judge.py").write_text("def score(prompts, replies):\n    return [len(r) / 10 for r in replies]\n")
    monkeypatch.chdir(tmp_path)
    prompts = ["\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Tell me a joke.\n\nAssistant:"]
    cfg = load_config(GRPOConfig, overrides=["--env.name=judge", "--env.judge=my_judge:score", "--env.turns=2",
                                             "--response_len=4", "--policy=smollm2"])
    source = EpisodeSource(cfg, prompts, "cpu")
    episodes = source.play(smol, [0, 1], [torch.Generator().manual_seed(b) for b in range(2)])
    for b in range(2):
        messages = episodes.rollout.messages[b]
        assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi!", "Tell me a joke."]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert episodes.rewards[b].tolist() == pytest.approx([len(r) / 10 for r in replies])
    assert torch.allclose(source.scores({"_rewards": episodes.rewards, "_reached": episodes.reached}),
                          episodes.rewards / 2)
