"""A reward model learned from preferences: a pretrained encoder, or a causal LM, with a scalar head.

An encoder's reward reads the mean of its token states, the pooling sentence encoders such as all-MiniLM-L6-v2
were trained with (its [CLS] state was never trained to summarise); a causal LM's reads its last real token,
the only one that has seen the whole text. The model reads the whole dialogue as HH text (data/dialogue.py),
cut to its last `max_length` tokens, since the reply being judged comes last.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from minirlhf import ModelError, RunError
from minirlhf.checkpoint import load_json, load_weights, save_json, save_weights
from minirlhf.models.pretrained import SMOLLM2, smollm2_path
from minirlhf.rundir import RunDir
from minirlhf.training import length_sorted_batches
from minirlhf.models.classifier import DEFAULT_ENCODER, Truncator, pad_batch, resolve_encoder


def resolve_model(name: str) -> str:
    """`minilm` and `smollm2` become the folders their pip packages ship; other names pass through."""
    if name == SMOLLM2:
        return str(smollm2_path())
    return resolve_encoder(name) if name == DEFAULT_ENCODER else name


class ScalarRewardModel(nn.Module):
    """A transformers base model and a linear head over its pooled states: `model(input_ids, attention_mask).logits`
    is (B, 1), as a one-label sequence classifier's would be, so the classifier's frozen-layer cache serves it too."""

    def __init__(self, base: nn.Module, pooling: str, marker: list[int] | None = None):
        super().__init__()
        self.base, self.pooling, self.marker = base, pooling, marker or []
        self.head = nn.Linear(base.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1 / (base.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        if getattr(base, "pooler", None) is not None:
            base.pooler.requires_grad_(False)  # unused: never trained, never in the optimizer

    @property
    def base_model(self) -> nn.Module:
        return self.base

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        if self.pooling == "reply_mean":
            mask = mask * self.reply_mask(input_ids, attention_mask).unsqueeze(-1)  # (B, T, 1)
        if self.pooling in ("mean", "reply_mean"):
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
        else:  # right-padded: the last real token
            pooled = hidden[torch.arange(len(hidden)), attention_mask.sum(1) - 1]  # (B, H)
        return SimpleNamespace(logits=self.head(pooled))  # (B, 1)

    def reply_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) 1 on the tokens after the last "Assistant:" marker: the reply being judged, which the shared
        conversation before it would otherwise outweigh in the mean. All tokens where the marker was cut away."""
        k = len(self.marker)
        marker = torch.tensor(self.marker, device=input_ids.device)
        hits = (input_ids.unfold(1, k, 1) == marker).all(-1)  # (B, T-k+1): the marker starts here
        pos = torch.arange(hits.size(1), device=input_ids.device)
        last = torch.where(hits, pos, -1).max(1).values  # (B,) start of the last marker, -1 if none
        after = torch.arange(input_ids.size(1), device=input_ids.device) >= (last + k).unsqueeze(1)  # (B, T)
        reply = after & (last >= 0).unsqueeze(1) & (attention_mask > 0)
        return torch.where(reply.any(1, keepdim=True), reply, attention_mask > 0).to(attention_mask.dtype)

    def save(self, folder: Path, tokenizer, meta: dict) -> None:
        self.base.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_weights(self.head.state_dict(), folder / "reward_head.safetensors")
        save_json({**meta, "pooling": self.pooling, "marker": self.marker}, folder / "reward_model.json")


def load_scalar_model(name: str, pooling: str = "auto") -> tuple[ScalarRewardModel, object]:
    """(model, tokenizer): a pretrained model by hub name or folder with a fresh scalar head."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        base = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ModelError(f"cannot load {name!r} as a reward model ({first}); give a local model folder, "
                        f"or the offline --model.name=minilm or smollm2") from e
    if tokenizer.pad_token_id is None:  # padding is masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    decoder = "CausalLM" in "".join(config.architectures or []) or getattr(config, "is_decoder", False)
    if pooling == "auto":
        pooling = "last" if decoder else "mean"
    marker = tokenizer("\n\nAssistant:", add_special_tokens=False)["input_ids"][-2:]  # "assistant", ":"
    return ScalarRewardModel(base, pooling, marker), tokenizer


ENSEMBLE_MODES = ("mean", "wco", "uwo", "single")


def combine(scores: torch.Tensor, mode: str = "mean", uwo_lambda: float = 1.0) -> torch.Tensor:
    """One reward (N,) from an ensemble's standardised scores (K, N) (Coste et al., ICLR 2024, section 3):
    `mean` the members' mean; `wco`, worst-case optimisation, their minimum; `uwo`, uncertainty-weighted
    optimisation, the mean minus `uwo_lambda` times the members' variance (population variance, eq. 4); `single`
    the first member alone (the others then only measure disagreement, for the over-optimisation guard)."""
    if mode == "single":
        return scores[0]
    if mode == "mean" or scores.size(0) == 1:
        return scores.mean(0)
    if mode == "wco":
        return scores.min(0).values
    if mode == "uwo":
        return scores.mean(0) - uwo_lambda * scores.var(0, unbiased=False)
    raise ModelError(f"unknown ensemble mode {mode!r}; use one of {', '.join(ENSEMBLE_MODES)}")


class RewardModel:
    """A trained reward-model run, one model or an ensemble of members (`train-reward-model --ensemble K`):
    `member_scores(texts)` -> (K, N) each member's rewards standardised with the mean and std it measured on its
    training responses (so 0 is a typical response); `normalized(texts)` -> (N,) those combined by `ensemble`
    (`combine`); `score(texts)` -> (N,) raw rewards of a single model, the combined standardised ones of an
    ensemble; `disagreement(texts)` -> (N,) the members' standard deviation."""

    def __init__(self, models: list, tokenizer, max_length: int, stats: list[tuple[float, float]], device,
                 ensemble: str = "mean", uwo_lambda: float = 1.0):
        self.models = [m.to(device).eval() for m in models]
        self.device, self.stats, self.ensemble, self.uwo_lambda = device, stats, ensemble, uwo_lambda
        self.truncate = Truncator(tokenizer, max_length, "tail")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def model(self):
        """The single model (or the first member of an ensemble)."""
        return self.models[0]

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu", ensemble: str = "mean", uwo_lambda: float = 1.0) -> "RewardModel":
        from transformers import AutoTokenizer

        run = RunDir.find(run_dir)
        folder = run.model if run is not None else Path(run_dir) / "model"
        if run is None or run.stage != "reward_model" or not (folder / "reward_model.json").is_file():
            raise RunError(f"{run_dir} is not a trained reward-model run (model/reward_model.json is missing); "
                           "train one with `minirlhf train-reward-model --preferences FILE.jsonl`")
        meta = load_json(folder / "reward_model.json")
        members = [folder / member_folder(k) for k in range(meta["members"])] if "members" in meta else [folder]
        models, stats = [], []
        for member in members:
            model, member_meta = load_member(member)
            models.append(model)
            stats.append((member_meta["mean"], member_meta["std"]))
        tokenizer = AutoTokenizer.from_pretrained(members[0])
        return cls(models, tokenizer, meta["max_length"], stats, device, ensemble, uwo_lambda)

    def as_members(self) -> list["RewardModel"]:
        """Each member as a reward model of its own (the page's uncertainty reads their disagreement)."""
        members = []
        for model, stats in zip(self.models, self.stats):
            member = copy.copy(self)  # the tokenizer and settings shared
            member.models, member.stats = [model], [stats]
            members.append(member)
        return members

    @torch.inference_mode()
    def raw_scores(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Each member's raw scalar rewards (K, N) of whole texts (dialogues as HH text)."""
        seqs = self.truncate(texts)
        out = torch.empty(len(self.models), len(texts))
        for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
            ids, mask = pad_batch([seqs[i] for i in idx], self.pad_id, self.device)
            for k, model in enumerate(self.models):
                out[k, idx] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu()
        return out

    def member_scores(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        mean, std = (torch.tensor(x).unsqueeze(1) for x in zip(*self.stats))  # (K, 1) each
        return (self.raw_scores(texts, batch_size) - mean) / std

    def score(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        if len(self.models) == 1:
            return self.raw_scores(texts, batch_size)[0]
        return self.normalized(texts, batch_size)

    def normalized(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        return combine(self.member_scores(texts, batch_size), self.ensemble, self.uwo_lambda)

    def disagreement(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        return self.member_scores(texts, batch_size).std(0, unbiased=False)


def member_folder(k: int) -> str:
    """Where member k of an ensemble run lives inside its model/ folder."""
    return f"member-{k}"


def load_member(folder: Path) -> tuple[ScalarRewardModel, dict]:
    """A saved ScalarRewardModel (its base, head and reward_model.json) and that JSON."""
    from transformers import AutoModel

    meta = load_json(folder / "reward_model.json")
    model = ScalarRewardModel(AutoModel.from_pretrained(folder), meta["pooling"], meta.get("marker"))
    model.head.load_state_dict(load_weights(folder / "reward_head.safetensors"))
    return model, meta
