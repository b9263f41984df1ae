"""A transformer's trunk run block by block: embeddings -> lower blocks -> upper blocks -> final norm.

This one loop serves every pass that starts or stops between blocks: the classifier and the reward model
compute their frozen lower blocks' output once (`FrozenCache`) and train the upper blocks on it
(`cached_forward`); the causal-LM policy keeps its frozen blocks' output from sampling and runs only its upper
blocks afterwards. A small adapter per family (`find_trunk`) knows the embeddings, the block list, what each
block receives besides the hidden states, and the final norm, as transformers' own modeling files call them;
so the loop over all blocks is the base model's own forward, op for op.
"""

from __future__ import annotations

import copy

from contextlib import contextmanager

import torch
import torch.utils.checkpoint
import torch.nn as nn

from minirlhf import ModelError
from minirlhf.training import length_sorted_batches, progress

SUPPORTED = "a BERT-, RoBERTa-, DistilBERT-, Llama-, Qwen-, Mistral- or GPT-2-style model"


class Trunk:
    """One base model's embeddings, blocks and final norm; a subclass per family knows its call signatures."""

    def __init__(self, base: nn.Module, embeddings: list[nn.Module], blocks: nn.ModuleList, final_norm=None):
        self.base, self.config = base, base.config
        self.embeddings, self.blocks, self.final_norm = embeddings, blocks, final_norm

    def __len__(self) -> int:
        return len(self.blocks)

    def frozen_modules(self, n: int) -> list[nn.Module]:
        """The embeddings and the lowest n blocks: what a split at block n computes once."""
        return [*self.embeddings, *self.blocks[:n]] if n > 0 else []

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def block_inputs(self, hidden, mask, positions, cache, start: int, stop: int) -> dict:
        """What every block of start..stop-1 receives besides the hidden states, prepared once per pass."""
        raise NotImplementedError

    def call_block(self, i: int, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def run(self, hidden: torch.Tensor, mask: torch.Tensor | None, start: int = 0, stop: int | None = None,
            positions: torch.Tensor | None = None, cache=None, checkpoint: bool = False) -> torch.Tensor:
        """Hidden states (B, L, H) after blocks start..stop-1, given their input `hidden` (B, L, H): the embeddings'
        output for start 0, else block start-1's output. `mask` (B, cached + L) is 1 on real tokens. `checkpoint`
        keeps only each block's input for the backward pass, which runs the block again (less memory, ~1/3 more
        compute); never with a cache, which the second run would write to again."""
        stop = len(self.blocks) if stop is None else stop
        inputs = self.block_inputs(hidden, mask, positions, cache, start, stop)
        recompute = checkpoint and cache is None and torch.is_grad_enabled()
        for i in range(start, stop):
            if recompute:
                hidden = torch.utils.checkpoint.checkpoint(self.call_block, i, hidden, inputs, use_reentrant=False)
            else:
                hidden = self.call_block(i, hidden, inputs)
        return hidden

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm after the last block (decoders have one; BERT-likes normalise inside each block)."""
        return hidden if self.final_norm is None else self.final_norm(hidden)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions=None, cache=None) -> torch.Tensor:
        """Last hidden states (B, L, H) of the whole trunk: what the base model's own forward returns."""
        return self.norm(self.run(self.embed(ids, positions), mask, 0, None, positions, cache))


class EncoderTrunk(Trunk):
    """BERT, RoBERTa, MiniLM (BertModel) and DistilBERT: bidirectional attention, no cache, no final norm."""

    @classmethod
    def of(cls, base: nn.Module) -> "EncoderTrunk | None":
        owner = getattr(base, "encoder", None)
        owner = getattr(base, "transformer", None) if owner is None else owner  # DistilBERT: transformer
        blocks = getattr(owner, "layer", None)
        if isinstance(blocks, nn.ModuleList) and hasattr(base, "embeddings") and not getattr(base.config, "is_decoder", False):
            return cls(base, [base.embeddings], blocks)
        return None

    def embed(self, ids, positions=None):
        return self.base.embeddings(ids)  # (B, T, H); positions are the model's own (RoBERTa's skip padding)

    def block_inputs(self, hidden, mask, positions, cache, start, stop):
        from transformers.masking_utils import create_bidirectional_mask

        return {"mask": create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)}

    def call_block(self, i, hidden, inputs):
        return self.blocks[i](hidden, inputs["mask"])


class DecoderTrunk(Trunk):
    """Llama-likes (Llama, SmolLM2, Qwen2/3, Mistral): rotary position embeddings, a causal mask per attention
    type (full or sliding window), a KV cache, and a final RMS norm.

    A DynamicCache holds one slot per block, and each block reads and extends only its own (`layer_idx`). When
    only blocks start.. run (the lower blocks' output kept from elsewhere), the slots below start stay empty:
    the masks are sized by the slot of the first block that runs (`layer_idx` of the mask builders), not slot 0.
    """

    @classmethod
    def of(cls, base: nn.Module) -> "DecoderTrunk | None":
        if all(hasattr(base, a) for a in ("embed_tokens", "norm", "rotary_emb")) and \
                isinstance(getattr(base, "layers", None), nn.ModuleList):
            return cls(base, [base.embed_tokens], base.layers, base.norm)
        return None

    @property
    def layer_types(self) -> list[str]:
        """Each block's attention type, as the model's forward picks its mask (Mistral: sliding if configured)."""
        kind = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        return list(getattr(self.config, "layer_types", None) or [kind] * len(self.blocks))

    def positions(self, length: int, cache, layer: int, device) -> torch.Tensor:
        """(1, L) positions after what the cache holds at `layer`: the model's default without position ids."""
        seen = cache.get_seq_length(layer) if cache is not None else 0
        return (torch.arange(length, device=device) + seen).unsqueeze(0)

    def forward(self, ids, mask, positions=None, cache=None):
        if positions is None:  # once, for the embeddings (GPT-2's are positional) and the blocks alike
            positions = self.positions(ids.size(1), cache, 0, ids.device)
        return super().forward(ids, mask, positions, cache)

    def embed(self, ids, positions=None):
        return self.base.embed_tokens(ids)  # (B, T, H)

    def masks(self, hidden, mask, positions, cache, start: int, stop: int) -> dict:
        """The attention mask of each attention type among blocks start..stop-1, sized by the first such block."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kinds = self.layer_types[start:stop]
        masks = {}
        for kind in dict.fromkeys(kinds):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(config=self.config, inputs_embeds=hidden, attention_mask=mask, past_key_values=cache,
                               position_ids=positions, layer_idx=start + kinds.index(kind))
        return masks

    def block_inputs(self, hidden, mask, positions, cache, start, stop):
        if positions is None:
            positions = self.positions(hidden.size(1), cache, start, hidden.device)
        rotary = self.base.rotary_emb(hidden, positions)  # (cos, sin), each (B, L, head_dim)
        return {"masks": self.masks(hidden, mask, positions, cache, start, stop), "rotary": rotary,
                "positions": positions, "cache": cache}

    def call_block(self, i, hidden, inputs):
        return self.blocks[i](hidden, attention_mask=inputs["masks"][self.layer_types[i]],
                              position_embeddings=inputs["rotary"], position_ids=inputs["positions"],
                              past_key_values=inputs["cache"], use_cache=inputs["cache"] is not None)


class GPT2Trunk(DecoderTrunk):
    """GPT-2: learned absolute positions added to the token embeddings, one causal mask, final LayerNorm."""

    @classmethod
    def of(cls, base: nn.Module) -> "GPT2Trunk | None":
        if all(hasattr(base, a) for a in ("wte", "wpe", "ln_f", "drop")) and isinstance(getattr(base, "h", None), nn.ModuleList):
            return cls(base, [base.wte, base.wpe], base.h, base.ln_f)
        return None

    @property
    def layer_types(self) -> list[str]:
        return ["full_attention"] * len(self.blocks)

    def embed(self, ids, positions=None):
        if positions is None:
            positions = self.positions(ids.size(1), None, 0, ids.device)
        return self.base.drop(self.base.wte(ids) + self.base.wpe(positions))  # (B, T, H)

    def block_inputs(self, hidden, mask, positions, cache, start, stop):
        if positions is None:
            positions = self.positions(hidden.size(1), cache, start, hidden.device)
        causal = self.masks(hidden, mask, positions, cache, start, stop)["full_attention"]
        return {"mask": causal, "positions": positions, "cache": cache}

    def call_block(self, i, hidden, inputs):
        return self.blocks[i](hidden, inputs["cache"], inputs["mask"], use_cache=inputs["cache"] is not None,
                              position_ids=inputs["positions"])


def base_model(model: nn.Module) -> nn.Module:
    """The transformers base model (BertModel, LlamaModel, ...) inside a task model, a peft wrapper (whose
    adapters sit inside the same blocks) or a ScalarRewardModel."""
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def copy_sharing(model: nn.Module, shared: list[nn.Module]) -> nn.Module:
    """A deep copy of `model` in which the `shared` modules (and their parameters) are the same objects, not copies:
    frozen layers held once by a policy and its reference, or by the members of a reward-model ensemble."""
    memo = {id(m): m for m in shared} | {id(p): p for m in shared for p in m.parameters()}
    return copy.deepcopy(model, memo)


def find_trunk(model: nn.Module, option: str = "--model.freeze_layers") -> Trunk:
    """The trunk adapter of a model's family; for a family it does not know, a UserError naming `option`, the
    setting that splits the model, to set to 0."""
    base = base_model(model)
    for family in (EncoderTrunk, GPT2Trunk, DecoderTrunk):
        trunk = family.of(base)
        if trunk is not None:
            return trunk
    raise ModelError(f"splitting {type(base).__name__} between its layers is not supported; use {SUPPORTED}, or {option}=0")


def frozen_share(model: nn.Module, fraction: float) -> int:
    """`fraction` of the model's blocks, rounded: how many to freeze where a config sets no number; none for a family
    the trunk cannot split (where a number given is refused)."""
    n = round(fraction * model.config.num_hidden_layers)
    if n:
        try:
            find_trunk(model)
        except ModelError:
            print(f"note: {type(base_model(model)).__name__} cannot be split between its layers; no blocks frozen")
            return 0
    return n


@torch.no_grad()
def lower_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Hidden states after the embeddings and the lowest n blocks, (B, T, H); the upper blocks never run."""
    trunk = find_trunk(model)
    return trunk.run(trunk.embed(input_ids), attention_mask, 0, n)


@contextmanager
def start_at_layer(model: nn.Module, n: int, hidden: torch.Tensor):
    """Inside the block, `model(input_ids=..., attention_mask=...)` runs only blocks n.., the final norm and the
    model's own head, on `hidden` (B, T, H), the output of the embeddings and the lowest n blocks.

    The base model's forward is, for the while, the trunk's loop from block n; so every head (a classifier's
    pooler and dense layers, a causal LM's last-token score, a ScalarRewardModel's pooling) is the model's own.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    trunk = find_trunk(model)
    pooler = getattr(trunk.base, "pooler", None)

    def upper(input_ids=None, attention_mask=None, **kwargs):
        h = trunk.norm(trunk.run(hidden, attention_mask, n))  # (B, T, H)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooler(h) if pooler is not None else None)

    trunk.base.forward = upper  # an instance attribute: shadows the class's forward until deleted
    try:
        yield
    finally:
        del trunk.base.forward


def pad_batch(seqs: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (B, T) and attention_mask (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class FrozenCache:
    """The frozen layers' outputs for a list of texts, packed into one (total_tokens, D) fp16 tensor.

    One allocation instead of one per text: no allocator fragmentation, and fp16 halves the memory.
    """

    def __init__(self, model, seqs: list[list[int]], pad_id: int, n: int, batch_size: int, device):
        self.lengths = [len(s) for s in seqs]
        self.offsets = [0]
        for length in self.lengths:
            self.offsets.append(self.offsets[-1] + length)
        self.data = torch.empty(self.offsets[-1], model.config.hidden_size, dtype=torch.float16)  # (sum T_i, D)
        model.eval()
        for idx in progress(length_sorted_batches(self.lengths, batch_size), desc=f"caching layers 0-{n - 1}", unit="batch"):
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id, device)
            hidden = lower_hidden(model, ids, mask, n)  # (B, T, D)
            for row, i in enumerate(idx):
                self.data[self.offsets[i]: self.offsets[i + 1]] = hidden[row, : self.lengths[i]].cpu()

    def batch(self, idx: list[int], device) -> torch.Tensor:
        """Right-padded hidden states of texts idx, (B, T, D) in fp32."""
        rows = [self.data[self.offsets[i]: self.offsets[i + 1]] for i in idx]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device, torch.float32)


def cached_forward(model, idx, seqs, cache: FrozenCache | None, n, pad_id, device) -> torch.Tensor:
    """Logits (B, num_labels) for texts idx, from the cache (upper layers only) or the full model."""
    ids, mask = pad_batch([seqs[i] for i in idx], pad_id, device)
    if cache is None:
        return model(input_ids=ids, attention_mask=mask).logits
    with start_at_layer(model, n, cache.batch(idx, device)):
        return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def split_works(model, seqs: list[list[int]], n: int, pad_id: int, device) -> bool:
    """Whether the upper blocks on the cached (fp16) frozen output reproduce the whole model on two texts: a
    one-time check of the adapter (a family member whose forward does more than the loop fails it)."""
    model.eval()
    seqs = seqs[:2]
    idx = list(range(len(seqs)))
    whole = cached_forward(model, idx, seqs, None, 0, pad_id, device)
    cache = FrozenCache(model, seqs, pad_id, n, len(seqs), device)
    ok = torch.allclose(cached_forward(model, idx, seqs, cache, n, pad_id, device), whole, atol=1e-2, rtol=1e-2)  # fp16
    if not ok:
        print(f"note: {type(base_model(model)).__name__} cannot be run from its layer {n}; the frozen layers are recomputed")
    return ok
