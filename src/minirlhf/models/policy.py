"""Policies for RLHF: a language model that samples responses and scores them token by token,
with a value head on its trunk. The RL algorithms only see this interface:

- `sample(prompts, max_new_tokens)` -> Rollout (token ids, masks, log-probs of the sampled tokens);
- `forward(rollout)` -> logprobs (B, T), values (B, T), entropy (B, T) of the response tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from minirlhf.data.vocab import Vocab
from minirlhf.models.lstm import LSTMLanguageModel, sample
from minirlhf.ops import entropy_from_logits


@dataclass
class Rollout:
    """A batch of prompts and sampled responses; T is the longest response, right-padded."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) 1 on response tokens (the <eos> included), 0 on padding
    texts: list[str]  # decoded responses, for the reward model and the sample tables

    def select(self, idx: list[int]) -> "Rollout":
        return Rollout([self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx],
                       self.response_ids[idx], self.response_mask[idx], [self.texts[i] for i in idx])


class LSTMPolicy(nn.Module):
    """The stage-3 LSTM generator as a policy; the value head reads the same hidden state as the LM head."""

    def __init__(self, lm: LSTMLanguageModel, vocab: Vocab):
        super().__init__()
        self.lm, self.vocab = lm, vocab
        self.value_head = nn.Linear(lm.cfg.emb_dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def frozen_copy(self) -> "LSTMPolicy":
        """The reference policy: a copy that never trains."""
        ref = copy.deepcopy(self).eval()
        ref.requires_grad_(False)
        return ref

    @torch.no_grad()
    def sample(self, prompts: list[str], max_new_tokens: int, generator: torch.Generator | None = None) -> Rollout:
        """Pure sampling (temperature 1, no top-k/top-p), so the log-probs are those of the policy itself."""
        v = self.vocab
        prompt_ids = [v.encode(p, eos=False) for p in prompts]
        outs = sample(self.lm, prompt_ids, max_new_tokens, v.eos_id, banned=[v.pad_id, v.bos_id], generator=generator)
        T = max(1, max(len(o) for o in outs))
        ids = torch.full((len(outs), T), v.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(outs), T)  # (B, T)
        for b, o in enumerate(outs):
            ids[b, : len(o)] = torch.tensor(o, dtype=torch.long)
            mask[b, : len(o)] = 1
        return Rollout(prompts, prompt_ids, ids, mask, [v.decode(o) for o in outs])

    def forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs, values and entropies at the response positions, each (B, T).

        Each row is prompt + response, right-padded; response token t of row b sits at position
        p_b + t and is predicted from position p_b + t - 1, where p_b is that prompt's length.
        """
        device = next(self.parameters()).device
        B, T = rollout.response_ids.shape
        lengths = [len(p) for p in rollout.prompt_ids]
        full = torch.full((B, max(lengths) + T), self.vocab.pad_id, dtype=torch.long)  # (B, P+T)
        for b, p in enumerate(rollout.prompt_ids):
            full[b, : lengths[b]] = torch.tensor(p)
            full[b, lengths[b]: lengths[b] + T] = rollout.response_ids[b]
        logits, hidden, _ = self.lm(full.to(device))  # (B, P+T, V), (B, P+T, E)
        pos = (torch.tensor(lengths).unsqueeze(1) - 1 + torch.arange(T)).to(device)  # (B, T)
        logits = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.size(-1)))  # (B, T, V)
        logits[..., [self.vocab.pad_id, self.vocab.bos_id]] = float("-inf")  # never sampled, as in `sample`
        logp_all = logits.log_softmax(-1)
        mask = rollout.response_mask.to(device)
        # padding holds <pad>, whose log-prob is -inf: look up <eos> there instead, then zero it
        ids = rollout.response_ids.to(device).masked_fill(mask == 0, self.vocab.eos_id)
        logprobs = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask  # (B, T)
        entropy = entropy_from_logits(logits) * mask  # (B, T)
        values = self.value_head(hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))).squeeze(-1)
        return logprobs, values, entropy
