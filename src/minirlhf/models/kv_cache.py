"""The KV cache sampling keeps: transformers' DynamicCache, whose full-attention layers grow in blocks of columns
written in place instead of by concatenation.

Concatenating a token's keys and values copies every layer's whole cache at every decode step (an episode of three
turns copies its cache ~190 times), and the freed copies, each a little smaller than the next, leave holes in glibc's
heap that it keeps: a multi-turn GRPO run's resident memory crept from 2.3 to 3.8 GB over 80 steps that way. A block
layer allocates once per `block` tokens and hands attention a view of the columns filled so far.

Only without gradients: a training pass whose keys are kept for the backward pass must not write into a buffer that
an earlier pass's saved view shares, so with grad enabled the layer concatenates as DynamicLayer does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BLOCK = 64
"""Columns a layer grows by: one allocation per 64 decoded tokens, at most 63 columns unused."""


@functools.cache
def _block_layer_class():
    """The layer class, made on first use: importing transformers' cache module costs every command's start."""
    from transformers.cache_utils import DynamicLayer

    class BlockLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views of buffers (B, heads, capacity, head dim) grown `BLOCK`
        columns at a time. A reorder, selection or concatenation replaces the views with plain tensors; the next
        update copies them into a fresh buffer."""

        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def _in_buffer(self) -> bool:
            """Whether keys and values are still the views of the buffers this layer last handed out."""
            if self.buffers is None or self.keys.numel() == 0:
                return False
            k = self.buffers[0]
            return self.keys.data_ptr() == k.data_ptr() and self.keys.shape[0] == k.shape[0]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if torch.is_grad_enabled():
                self.buffers = None
                return super().update(key_states, value_states, *args, **kwargs)
            seen, new = self.get_seq_length(), key_states.shape[-2]
            if not self._in_buffer() or seen + new > self.buffers[0].shape[-2]:
                self._grow(key_states, value_states, seen + new)
            k, v = self.buffers
            k[:, :, seen:seen + new] = key_states
            v[:, :, seen:seen + new] = value_states
            self.keys, self.values = k[:, :, :seen + new], v[:, :, :seen + new]  # (B, heads, seen + new, head dim)
            return self.keys, self.values

        def _grow(self, key_states, value_states, needed: int) -> None:
            """Fresh buffers with room for `needed` columns and a block more, holding what the layer has so far."""
            seen = self.get_seq_length()
            buffers = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                shape = (*new.shape[:2], needed + BLOCK, new.shape[-1])
                buf = new.new_empty(shape)  # (B, heads, capacity, head dim)
                if seen:
                    buf[:, :, :seen] = old
                buffers.append(buf)
            self.buffers = (buffers[0], buffers[1])

        def reset(self) -> None:
            self.buffers = None
            super().reset()

    return BlockLayer


def sampling_cache(config):
    """A DynamicCache for `config`'s model whose full-attention layers grow in blocks (sliding-window and other layer
    kinds keep transformers' own)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [_block_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@dataclass
class KVState:
    """A batch of conversations' KV cache, kept between the turns of an episode: the attention mask over every
    cached column (B, L) and the real tokens each row has in it (B,). Rows go with `keep`."""

    cache: object = None
    mask: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def keep(self, rows: list[int]) -> None:
        """Only these rows (of the current ones) go on, in this order."""
        if self.cache is not None:
            index = torch.tensor(rows, device=self.mask.device)
            self.cache.reorder_cache(index)
            self.mask, self.counts = self.mask[index], self.counts[index]
