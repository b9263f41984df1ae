"""Multi-turn episodes: the policy writes every assistant turn itself, an environment answers each one.

The conversation is held as token ids from the first turn to the last. Each assistant turn is sampled by the
policy's own sampler continuing those ids (its log-probs kept as it samples), from a KV cache kept across turns,
so a turn reads only the tokens added since the last (the user's message); the environment's next message is
appended as the ids of the chat template applied to that turn alone (`continuation`), so nothing before it is ever
re-tokenised and the log-probs of a sampled turn are those of a forward pass over the whole conversation (tested). The episode becomes one `Rollout`: the opening conversation is its prompt, everything after
it its response part, with `response_mask` 1 on the assistant's tokens only (the ones that get loss, KL and value),
`attention_mask` 1 on every token, and `turn_ids` naming each assistant token's turn.

Environments are duck-typed here (reset/step; see envs/base.py), so this file imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minirlhf import ModelError
from minirlhf.data.dialogue import from_messages
from minirlhf.models.kv_cache import KVState
from minirlhf.models.policy import Rollout, left_pad, right_pad


@dataclass
class Episodes:
    """B episodes as one Rollout, with what the environments said of each turn."""

    rollout: Rollout
    rewards: torch.Tensor  # (B, K) each turn's reward, 0 where the episode had ended
    reached: torch.Tensor  # (B, K) bool: the episode had this turn
    infos: list[list[dict]]  # per episode, the environment's info of each turn

    def episode_reward(self, how: str) -> torch.Tensor:
        """(B,) the `last` turn's reward or the `mean` of the turns the episode had."""
        if how == "mean":
            return (self.rewards * self.reached).sum(1) / self.reached.sum(1).clamp(min=1)
        last = (self.reached.long().cumsum(1).argmax(1))  # (B,) index of the last turn reached
        return self.rewards.gather(1, last.unsqueeze(1)).squeeze(1)


@dataclass
class _Track:
    """One episode as it grows: its messages, and the token ids after its opening with what each one is."""

    messages: list[dict]
    opening: list[int]
    ids: list[int] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)  # assistant turn of each id, -1 for the user's (and the template's)
    logprobs: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    live: bool = True

    def add(self, ids: list[int], turn: int, logprobs=None, entropy=None, values=None) -> None:
        n = len(ids)
        self.ids += ids
        self.turn += [turn] * n
        self.logprobs += logprobs if logprobs is not None else [0.0] * n
        self.entropy += entropy if entropy is not None else [0.0] * n
        self.values += values if values is not None else [0.0] * n


def sample_episodes(policy, envs: list, seeds: list[int], turns: int, max_new_tokens: int,
                    generators: list[torch.Generator] | None = None, **sampling) -> Episodes:
    """Run one episode per environment (reset with its seed) for at most `turns` assistant turns of at most
    `max_new_tokens` tokens each. `generators`: one per episode, used turn after turn (a resumed run repeats).
    `sampling`: temperature, top_k, top_p as `policy.sample` takes them (default: the policy's own distribution,
    as RL needs; the log-probs kept are always the policy's own)."""
    tracks = []
    for env, seed in zip(envs, seeds):
        messages = list(env.reset(seed))
        tracks.append(_Track(messages, opening_ids(policy, messages)))
    rewards = torch.zeros(len(envs), turns)  # (B, K)
    reached = torch.zeros(len(envs), turns, dtype=torch.bool)  # (B, K)
    state, cached = KVState(), list(range(len(tracks)))  # the rows in the cache, in its order
    for k in range(turns):
        live = [b for b, t in enumerate(tracks) if t.live]
        if not live:
            break
        if live != cached:  # episodes that ended leave the cache
            state.keep([cached.index(b) for b in live])
            cached = live
        gens = None if generators is None else [generators[b] for b in live]
        out = policy.sample([tracks[b].messages[-1]["content"] for b in live], max_new_tokens, gens,
                            ids=[tracks[b].opening + tracks[b].ids for b in live], state=state, **sampling)
        for i, b in enumerate(live):
            rewards[b, k], reached[b, k] = _turn(policy, envs[b], tracks[b], out, i, k, last=k == turns - 1), True
    return Episodes(_rollout(policy, tracks), rewards, reached, [t.infos for t in tracks])


def _turn(policy, env, track: _Track, out: Rollout, i: int, k: int, last: bool) -> float:
    """Row i of a turn's sample joins its episode; the environment scores it and, unless the episode is over,
    its next message is appended. Returns the turn's reward."""
    n = int(out.response_mask[i].sum())
    reply = out.response_ids[i, :n].tolist()
    values = out.values[i, :n].tolist() if out.values is not None else None
    track.add(reply, k, out.logprobs[i, :n].tolist(), out.entropy[i, :n].tolist(), values)
    track.messages.append({"role": "assistant", "content": out.texts[i].strip()})
    message, reward, done, info = env.step(list(track.messages))
    track.infos.append(dict(info))
    if done or message is None or last:
        track.live = False
    else:
        track.messages.append({"role": "user", "content": str(message)})
        track.add(continuation(policy, track.messages, reply[-1] if reply else None), -1)
    return float(reward)


def need_chat(policy) -> None:
    """Episodes are conversations: only a chat model (a causal LM with a chat template) can hold one."""
    if getattr(policy, "kind", "") != "causal_lm" or not getattr(policy, "chat", False):
        raise ModelError("multi-turn episodes need a chat model (a causal LM with a chat template), e.g. smollm2")


def opening_ids(policy, messages: list[dict]) -> list[int]:
    """An episode's opening conversation as token ids, the assistant's turn opened."""
    need_chat(policy)
    out = policy.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def continuation(policy, messages: list[dict], last_token: int | None) -> list[int]:
    """Token ids that follow an assistant reply already in the sequence (its last token `last_token`): the end of
    its turn, the user's next message (messages[-1]) and the opening of the next assistant turn, by the chat
    template applied to this turn alone, so the tokens before it are never re-tokenised. A reply that did not end
    with the template's end-of-turn token (cut at the length limit) gets it here (read, never trained)."""
    need_chat(policy)
    tok = policy.tokenizer
    mark = "\u2063MINIRLHF_REPLY\u2063"  # stands for the reply, whose tokens are already in the sequence
    history = messages[:-2] + [{"role": "assistant", "content": mark}, messages[-1]]
    text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    tail = text[text.rindex(mark) + len(mark):]
    ended = tok.decode([last_token]) if last_token is not None else ""
    if ended and last_token in policy.eos_ids and tail.startswith(ended):
        tail = tail[len(ended):]
    return tok(tail, add_special_tokens=False)["input_ids"]


def _rollout(policy, tracks: list[_Track]) -> Rollout:
    """The episodes as one Rollout: openings left-padded (B, P), the rest right-padded (B, T)."""
    device = next(policy.parameters()).device
    prompt_ids, prompt_mask = left_pad([t.opening for t in tracks], policy.pad_id)  # (B, P)
    ids, seen = right_pad([t.ids for t in tracks], policy.pad_id)  # (B, T)
    turn, _ = right_pad([[max(x, 0) for x in t.turn] for t in tracks], 0)  # (B, T)
    assistant, _ = right_pad([[int(x >= 0) for x in t.turn] for t in tracks], 0)  # (B, T)
    mask = assistant.float() * seen  # (B, T) 1 on the assistant's tokens only
    floats = lambda name: right_pad_floats([getattr(t, name) for t in tracks], ids.size(1)) * mask  # noqa: E731
    ended = torch.tensor([bool(t.ids) and t.turn[-1] >= 0 and t.ids[-1] in policy.eos_ids for t in tracks])
    texts = ["\n\n".join(m["content"] for m in t.messages if m["role"] == "assistant") for t in tracks]
    openings = [from_messages(t.messages[:_opening_length(t)]) for t in tracks]
    has_values = getattr(policy, "value_head", None) is not None
    rollout = Rollout(openings, prompt_ids, prompt_mask, ids, mask, texts, ended, floats("logprobs"),
                      floats("values") if has_values else None, floats("entropy"), attention_mask=seen,
                      turn_ids=turn * assistant, messages=[list(t.messages) for t in tracks])
    return _to(rollout, device)


def _opening_length(track: _Track) -> int:
    """Messages before the first assistant turn."""
    roles = [m["role"] for m in track.messages]
    return roles.index("assistant") if "assistant" in roles else len(roles)


def right_pad_floats(rows: list[list[float]], width: int) -> torch.Tensor:
    """(B, width) of float rows, right-padded with 0."""
    out = torch.zeros(len(rows), width)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def _to(rollout: Rollout, device) -> Rollout:
    for name, value in vars(rollout).items():
        if isinstance(value, torch.Tensor):
            setattr(rollout, name, value.to(device))
    return rollout
