"""Word-level LSTM language model with tied input/output embeddings (Press & Wolf, 2017)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirlhf.config import setting
from minirlhf import RunError, sharding
from minirlhf.checkpoint import load_json, load_weights, save_json, save_weights
from minirlhf.data.vocab import Vocab
from minirlhf.precision import keep_fp32


@dataclass
class LSTMConfig:
    emb_dim: int = setting(256, ge=1)
    """word embedding size (also the output projection size when weights are tied)"""
    hidden_dim: int = setting(448, ge=1)
    """LSTM state size"""
    n_layers: int = setting(2, ge=1)
    """stacked LSTM layers"""
    dropout: float = setting(0.3, ge=0, lt=1)
    """dropout on embeddings, between layers and before the output"""
    tie_weights: bool = True
    """share the input embedding with the output layer (fewer parameters, lower perplexity)"""


class LSTMLanguageModel(nn.Module):
    def __init__(self, cfg: LSTMConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.emb_dim, cfg.hidden_dim, cfg.n_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        # project the state down to the embedding size so the output layer can share the embedding
        self.proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim) if cfg.hidden_dim != cfg.emb_dim else nn.Identity()
        self.head = nn.Linear(cfg.emb_dim, vocab_size)
        if cfg.tie_weights:
            self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.05)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, state=None):
        """input_ids (B, T) -> logits (B, T, V), hidden (B, T, emb_dim), new LSTM state."""
        x = self.drop(self.embed(input_ids))  # (B, T, E)
        with keep_fp32("lstm"):  # bf16 runs: fp32 where this CPU has no bf16 LSTM kernel, or a slower one
            out, state = self.lstm(x.float(), state)  # (B, T, H)
        hidden = self.drop(self.proj(out))  # (B, T, E)
        return self.head(hidden), hidden, state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over non-pad targets. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p. logits (B, V)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


Generators = torch.Generator | list[torch.Generator] | None
"""one generator for the whole batch, or one per row (see `draw`)"""


def draw(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One token id per row of `probs` (B, V) -> (B,), by inverse transform: the first token whose cumulative
    probability exceeds a uniform draw. One random number per row, where multinomial draws one per
    vocabulary entry (a tenth of SmolLM2's sampling time).

    With one generator per row, a row's sample does not depend on which rows share its batch, so the
    same prompts give the same responses on one process or split across several.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(probs):
            raise ValueError(f"{len(generator)} generators for {len(probs)} rows")
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])  # (B,)
    else:
        u = torch.rand(len(probs), generator=generator, device=probs.device)  # (B,)
    cdf = probs.float().cumsum(-1)  # (B, V)
    token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)  # a zero-probability token never
    return token.clamp(max=probs.size(1) - 1)  # has cdf[i-1] <= target < cdf[i]; the clamp guards rounding at the top


@torch.no_grad()
def decode(model: LSTMLanguageModel, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
           banned: list[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: Generators = None) -> list[list[int]]:
    """Continue each prompt (token ids, <bos> first) until <eos> or `max_new_tokens`: the LSTM's decoding loop
    behind `LSTMPolicy.sample`, the one way anything samples from an LSTM.

    Prompts of different lengths are fed one by one through the recurrent state, so no padding
    ever enters the LSTM. Returns the new tokens of each prompt, <eos> included when reached.
    """
    model.eval()
    device = next(model.parameters()).device
    n = len(prompts)
    states = [_prompt_state(model, ids, device) for ids in prompts]
    state = (torch.cat([h for h, _ in states], 1), torch.cat([c for _, c in states], 1))  # (L, B, H) each
    last = [ids[-1] for ids in prompts]
    tokens = torch.tensor(last, device=device).unsqueeze(1)  # (B, 1)
    out = torch.zeros(n, 0, dtype=torch.long, device=device)  # (B, 0)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits, _, state = model(tokens, state)
        logits = logits[:, -1] / max(temperature, 1e-6)  # (B, V)
        logits[:, banned] = float("-inf")
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        nxt = draw(probs, generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out = torch.cat([out, nxt.unsqueeze(1)], 1)
        done |= nxt == eos_id
        if done.all():
            break
        tokens = nxt.unsqueeze(1)
    return [_cut_at(row.tolist(), eos_id) for row in out]


def _prompt_state(model: LSTMLanguageModel, ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM state after reading all but the last prompt token; (L, 1, H) each."""
    if len(ids) == 1:
        zeros = torch.zeros(model.cfg.n_layers, 1, model.cfg.hidden_dim, device=device)
        return zeros, zeros.clone()
    _, _, state = model(torch.tensor([ids[:-1]], device=device))
    return state


def _cut_at(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def save_generator(folder: Path, model: LSTMLanguageModel, vocab: Vocab, step: int, extra: dict) -> None:
    """An LSTM policy folder: weights (safetensors), vocabulary, and model config + step (JSON)."""
    folder = Path(folder)
    save_weights(sharding.full_state_dict(model), folder / "model.safetensors")  # whole, also under FSDP
    vocab.save(folder / "vocab.json")
    save_json({"model": dataclasses.asdict(model.cfg), "vocab_size": len(vocab), "step": step, **extra},
              folder / "checkpoint.json")
    save_json({"kind": "lstm"}, folder / "policy.json")


def load_generator(folder: str | Path, device="cpu") -> tuple[LSTMLanguageModel, Vocab]:
    """The model and vocabulary of an LSTM policy folder (a `train-generator` run, or an RL run's policy)."""
    folder = Path(folder)
    if not (folder / "checkpoint.json").is_file():
        raise RunError(f"{folder} is not a generator run (no checkpoint.json); run `minirlhf train-generator` first")
    meta = load_json(folder / "checkpoint.json")
    vocab = Vocab.load(folder / "vocab.json")
    model = LSTMLanguageModel(LSTMConfig(**meta["model"]), meta["vocab_size"])
    try:
        model.load_state_dict(load_weights(folder / "model.safetensors"))
    except RuntimeError as e:
        raise RunError(f"{folder}/model.safetensors does not match checkpoint.json ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), vocab
