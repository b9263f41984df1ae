"""Policies for RLHF: a language model that samples responses and scores them token by token,
optionally with a value head on its trunk. The RL algorithms only see this interface:

- `sample(prompts, max_new_tokens, generator)` -> Rollout: token ids, masks, and the policy's own
  log-probs (and values) of the sampled tokens, so no second pass is needed for the old policy;
- `forward(rollout, entropy=True)` -> logprobs (B, T), values (B, T) or None, entropy (B, T) or None of the
  response tokens;
- `prepare(rollout)`: precompute what every later pass shares (a causal LM's frozen blocks' output);
- `frozen_copy()` -> the reference policy; `critic_copy()` -> a separate critic; `save(folder)`;
  `as_text(prompt, response)` -> what a reader (and the reward model) sees.

Two kinds implement it: `LSTMPolicy` (the stage-3 generator, here) and `CausalLMPolicy` (any
transformers causal LM, in causal_lm.py). `load.load_policy` picks one from a run directory or model name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from minirlhf import sharding
from minirlhf.checkpoint import atomic_dir, load_weights, save_weights
from minirlhf.config import setting
from minirlhf.data.vocab import Vocab
from minirlhf.models.lstm import Generators, LSTMLanguageModel, decode, save_generator
from minirlhf.ops import entropy_from_logits


@dataclass
class SamplingConfig:
    """How text is sampled from a policy outside RL's own rollouts: the generator's samples.md, `generate` and the
    feedback page's pairs (which add a seed per response)."""

    max_new_tokens: int = setting(48, ge=1)
    """tokens (an LSTM: words) per sample at most"""
    temperature: float = setting(1.0, gt=0)
    """softmax temperature"""
    top_p: float = setting(1.0, gt=0, le=1)
    """nucleus sampling: the smallest set of tokens reaching this probability (1: all)"""
    top_k: int = setting(0, ge=0)
    """sample from the k most likely tokens only (0: all)"""


def sample_with(policy, prompts: list[str], sampling: SamplingConfig, generator: Generators = None) -> "Rollout":
    """`policy.sample` with a SamplingConfig's length and filters: how everything outside RL's rollouts samples."""
    return policy.sample(prompts, sampling.max_new_tokens, generator, sampling.temperature, sampling.top_k,
                         sampling.top_p)


@dataclass
class Rollout:
    """Prompts and sampled responses: prompts left-padded to P tokens, responses right-padded to T.

    Masks come from lengths, never from comparing ids with the pad id (which may equal <eos>).
    """

    prompts: list[str]  # the prompts as given (before any chat template)
    prompt_ids: torch.Tensor = field(metadata={"pad": "left"})  # (B, P) left-padded
    prompt_mask: torch.Tensor = field(metadata={"pad": "left"})  # (B, P) 1 on prompt tokens
    response_ids: torch.Tensor  # (B, T) right-padded
    response_mask: torch.Tensor  # (B, T) 1 on response tokens (the end-of-text token included)
    texts: list[str]  # decoded responses
    ended: torch.Tensor  # (B,) bool: the response stopped at end-of-text, not at the length limit
    logprobs: torch.Tensor  # (B, T) of the sampled tokens under the policy that sampled them (temperature 1)
    values: torch.Tensor | None  # (B, T) value estimates at the positions that predict each token
    entropy: torch.Tensor  # (B, T) of the policy's next-token distribution
    frozen_hidden: torch.Tensor | None = field(default=None, metadata={"pad": "prompt+response"})
    """(B, P+T, H) output of a causal LM's frozen blocks (kept from sampling, or computed by `prepare`)"""
    attention_mask: torch.Tensor | None = None
    """(B, T) 1 on every token of a multi-turn episode's response part, the user's included (None: response_mask);
    response_mask is then 1 on the assistant's tokens only, the ones that get loss, KL and value"""
    turn_ids: torch.Tensor | None = None
    """(B, T) the assistant turn (0, 1, ...) each position belongs to, where response_mask is 1 (None: one turn)"""
    messages: list[list[dict]] | None = None
    """an episode's whole conversation as text, the policy's replies included"""

    @property
    def seen_mask(self) -> torch.Tensor:
        """(B, T) the response part's tokens the model reads: every real token, whoever wrote it."""
        return self.response_mask if self.attention_mask is None else self.attention_mask

    def select(self, idx: list[int]) -> "Rollout":
        picked = {}
        for f in fields(self):
            v = getattr(self, f.name)
            picked[f.name] = [v[i] for i in idx] if isinstance(v, list) else None if v is None else v[idx]
        return Rollout(**picked)


def distinct_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of ids (B, L): index (B,) of each row's distinct row, and first (U,) the first row holding each."""
    on_host = ids.device.type == "mps"  # torch.unique(dim=0) has no MPS kernel in some torch releases
    _, index = torch.unique(ids.cpu() if on_host else ids, dim=0, return_inverse=True)
    index = index.to(ids.device)
    rows = torch.arange(len(index), device=index.device)
    first = torch.full((int(index.max()) + 1,), len(index), device=index.device).scatter_reduce(0, index, rows, "amin")
    return index, first


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, P) and mask (B, P): every prompt ends at the same column."""
    P = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros(len(seqs), P, dtype=torch.long)  # (B, P)
    for b, s in enumerate(seqs):
        if s:
            ids[b, P - len(s):] = torch.tensor(s)
            mask[b, P - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and mask (B, T), T >= 1."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(seqs), T)  # (B, T)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def teacher_forcing(prompts: list[str], prompt_seqs: list[list[int]], response_seqs: list[list[int]], texts: list[str],
                    max_prompt_tokens: int, max_response_tokens: int, pad_id: int, eos_id: int, device) -> Rollout:
    """A Rollout of given (not sampled) responses, for `policy(rollout)` to score token by token (DPO). A prompt
    keeps its last `max_prompt_tokens` tokens (a conversation's end matters most), a response its first
    `max_response_tokens`; `ended` only where the end-of-text token survives the cut."""
    prompt_seqs = [s[max(0, len(s) - max_prompt_tokens):] for s in prompt_seqs]
    response_seqs = [s[:max_response_tokens] for s in response_seqs]
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompt_seqs, pad_id))
    response_ids, response_mask = (t.to(device) for t in right_pad(response_seqs, pad_id))
    ended = torch.tensor([bool(s) and s[-1] == eos_id for s in response_seqs], device=device)
    empty = torch.zeros_like(response_mask)
    return Rollout(list(prompts), prompt_ids, prompt_mask, response_ids, response_mask, list(texts), ended, empty,
                   None, empty)


def make_value_head(width: int) -> nn.Linear:
    """A linear value head, zero-initialised so early values do not disturb the first updates."""
    head = nn.Linear(width, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


@runtime_checkable
class Policy(Protocol):
    """What every stage asks of a policy, the LSTM (`LSTMPolicy`) and any causal LM (`CausalLMPolicy`) alike: sample
    responses, score given ones, and save to a folder whose policy.json names its kind. A new kind of policy is a
    class with these, plus a branch in load.py's `load_policy`."""

    kind: str
    """`lstm` or `causal_lm`: what policy.json records"""
    value_head: nn.Module | None

    def sample(self, prompts: list[str], max_new_tokens: int, generator=None, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0) -> Rollout:
        """Responses to `prompts`, with their log-probs (the one sampling path of RL, evaluation, the page)."""

    def teacher_forced(self, prompts: list[str], responses: list[str], max_prompt_tokens: int,
                       max_response_tokens: int) -> Rollout:
        """Given responses as a Rollout to score (SFT, DPO, reward of fixed texts)."""

    def forward(self, rollout: Rollout, entropy: bool = True) -> tuple:
        """Log-probs, values and entropies at the response positions, each (B, T)."""

    def prepare(self, rollout: Rollout) -> None:
        """Precompute what a rollout's passes share (a frozen trunk's output)."""

    def as_text(self, prompt: str, response: str) -> str:
        """What a reward reads of a prompt and its response."""

    def frozen_copy(self) -> "Policy":
        """The reference: a copy that never trains."""

    def critic_copy(self) -> "Policy":
        """A separate critic: a trainable copy with a fresh value head."""

    def save(self, folder: Path) -> None:
        """The policy as a folder that `load_policy` reads back, replaced atomically."""


class LSTMPolicy(nn.Module):
    """The stage-3 LSTM generator as a policy; the value head reads the same hidden state as the LM head."""

    kind = "lstm"

    def __init__(self, lm: LSTMLanguageModel, vocab: Vocab, value_head: bool = True):
        super().__init__()
        self.lm, self.vocab = lm, vocab
        self.value_head = make_value_head(lm.cfg.emb_dim) if value_head else None
        self.eos_id = vocab.eos_id

    def frozen_copy(self) -> "LSTMPolicy":
        """The reference policy: a copy that never trains."""
        ref = copy.deepcopy(self).eval()
        ref.requires_grad_(False)
        return ref

    def critic_copy(self) -> "LSTMPolicy":
        """A separate critic: a trainable copy with a fresh value head."""
        critic = copy.deepcopy(self)
        critic.value_head = make_value_head(self.lm.cfg.emb_dim).to(next(self.parameters()).device)
        critic.lm.head.requires_grad_(False)  # its value loss never reaches the LM head: no gradient, no Adam state
        return critic

    def prepare(self, rollout: Rollout) -> None:
        """Nothing to precompute: the LSTM is small and has no frozen part."""

    def as_text(self, prompt: str, response: str) -> str:
        """The prompt continued by the response: what the reward model reads."""
        return f"{prompt} {response}".strip()

    @torch.no_grad()
    def sample(self, prompts: list[str], max_new_tokens: int, generator: Generators = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Rollout:
        """Pure sampling by default (temperature 1, no top-k/top-p), so the KL estimates are honest."""
        v = self.vocab
        encoded = [v.encode(p, eos=False) for p in prompts]
        outs = decode(self.lm, encoded, max_new_tokens, v.eos_id, banned=[v.pad_id, v.bos_id],
                      temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        device = next(self.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad(encoded, v.pad_id))
        response_ids, response_mask = (t.to(device) for t in right_pad(outs, v.pad_id))
        ended = torch.tensor([bool(o) and o[-1] == v.eos_id for o in outs], device=device)
        empty = torch.zeros_like(response_mask)
        rollout = Rollout(list(prompts), prompt_ids, prompt_mask, response_ids, response_mask,
                          [v.decode(o) for o in outs], ended, empty, None, empty)
        rollout.logprobs, rollout.values, rollout.entropy = self(rollout)  # one cheap pass: the LSTM is small
        return rollout

    def teacher_forced(self, prompts: list[str], responses: list[str], max_prompt_tokens: int,
                       max_response_tokens: int) -> Rollout:
        """Given responses, each closed by <eos>, as a Rollout to score (see `teacher_forcing`); <bos> stays."""
        v = self.vocab
        words = [v.encode(p, bos=False, eos=False) for p in prompts]
        encoded = [[v.bos_id] + w[max(0, len(w) - max_prompt_tokens + 1):] for w in words]
        device = next(self.parameters()).device
        return teacher_forcing(prompts, encoded, [v.encode(r, bos=False) for r in responses], responses,
                               max_prompt_tokens, max_response_tokens, v.pad_id, v.eos_id, device)

    def forward(self, rollout: Rollout, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs, values and entropies (unless `entropy=False`) at the response positions, each (B, T).

        The LSTM reads each prompt without padding: row b is prompt_b + response_b, right-padded, and
        response token t sits at position p_b + t, predicted from position p_b + t - 1.
        """
        device = next(self.parameters()).device
        B, T = rollout.response_ids.shape
        prompts = [row[m == 1].tolist() for row, m in zip(rollout.prompt_ids, rollout.prompt_mask)]
        lengths = torch.tensor([len(p) for p in prompts])
        full, _ = right_pad([p + r.tolist() for p, r in zip(prompts, rollout.response_ids)], self.vocab.pad_id)
        logits, hidden, _ = self.lm(full.to(device))  # (B, P+T, V), (B, P+T, E)
        pos = (lengths.unsqueeze(1) - 1 + torch.arange(T)).to(device)  # (B, T)
        logits = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.size(-1)))  # (B, T, V)
        logits[..., [self.vocab.pad_id, self.vocab.bos_id]] = float("-inf")  # never sampled, as in `sample`
        mask = rollout.response_mask.to(device)
        logprobs = token_logprobs(logits, rollout.response_ids.to(device), mask)
        ent = entropy_from_logits(logits) * mask if entropy else None  # (B, T)
        values = None
        if self.value_head is not None:
            h = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))  # (B, T, E)
            values = self.value_head(h).squeeze(-1) * mask
        return logprobs, values, ent

    def save(self, folder: Path) -> None:
        """Weights (safetensors), vocabulary and config as one folder, replaced atomically."""
        with atomic_dir(folder) as tmp:
            save_generator(tmp, self.lm, self.vocab, 0, {})
            if self.value_head is not None:
                save_weights(sharding.full_state_dict(self.value_head), tmp / "value_head.safetensors")


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs (B, T) of `ids` (B, T) under `logits` (B, T, V); 0 on padding, whatever id it holds."""
    picked = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked.masked_fill(mask == 0, 0.0)  # not `* mask`: a banned pad id has log-prob -inf, and -inf * 0 is nan


def load_value_head(policy: nn.Module, folder: Path) -> None:
    """Restore the value head saved beside a policy's weights, if both exist."""
    path = Path(folder) / "value_head.safetensors"
    if policy.value_head is not None and path.is_file():
        policy.value_head.load_state_dict(load_weights(path))
