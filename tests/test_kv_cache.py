"""The sampling KV cache: the same keys and values as transformers' DynamicCache through appends, reorders and row
selections, one allocation per block of columns, and plain concatenation whenever gradients are on."""

import torch
from transformers import DynamicCache, LlamaConfig

from minirlhf.models.kv_cache import BLOCK, sampling_cache

CONFIG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


def kv(B: int, L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, L, 4, generator=g), torch.randn(B, 2, L, 4, generator=g)  # (B, heads, L, head dim)


@torch.no_grad()
def test_appends_and_reorders_match_the_dynamic_cache():
    ours, theirs = sampling_cache(CONFIG), DynamicCache(config=CONFIG)
    seed = 0
    for step in range(150):
        B = ours.layers[0].keys.shape[0] if step else 3
        L = 7 if step in (0, 80) else 1  # a prompt, single decoded tokens, a user's turn in the middle
        for layer in range(2):
            seed += 1
            a = ours.update(*kv(B, L, seed), layer)
            b = theirs.update(*kv(B, L, seed), layer)
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        if step == 40:
            for cache in (ours, theirs):
                cache.reorder_cache(torch.tensor([2, 0, 2, 1]))  # rows copied and reordered: the buffer is rebuilt
        if step == 100:
            for cache in (ours, theirs):
                cache.reorder_cache(torch.tensor([3, 1]))
    assert ours.get_seq_length(0) == theirs.get_seq_length(0) == 150 + 12
    assert ours.layers[0].keys.shape == theirs.layers[0].keys.shape == (2, 2, 162, 4)


@torch.no_grad()
def test_decoding_allocates_once_per_block():
    cache = sampling_cache(CONFIG)
    cache.update(*kv(4, 5, 0), 0)
    buffers = [cache.layers[0].buffers[0]]  # each held, so a freed one's address cannot come back as a "new" one
    for t in range(3 * BLOCK):
        keys, _ = cache.update(*kv(4, 1, t + 1), 0)
        if cache.layers[0].buffers[0] is not buffers[-1]:
            buffers.append(cache.layers[0].buffers[0])
        assert keys.data_ptr() == cache.layers[0].buffers[0].data_ptr()  # a view, not a copy
    assert len(buffers) == 3  # 5 + 64 columns, then two more blocks


def test_with_gradients_on_it_concatenates_and_keeps_nothing_in_place():
    """A training pass keeps the prompt's keys for backward; writing the responses' keys into the same buffer would
    change them under autograd. So with gradients on, each update is a fresh tensor and backward runs."""
    cache = sampling_cache(CONFIG)
    k1, v1 = (t.requires_grad_() for t in kv(2, 4, 0))
    keys, _ = cache.update(k1, v1, 0)
    first = keys.sum()
    k2, v2 = (t.requires_grad_() for t in kv(2, 3, 1))
    keys2, values2 = cache.update(k2, v2, 0)
    (first + keys2.sum() + values2.sum()).backward()
    assert cache.layers[0].buffers is None and torch.equal(k1.grad, torch.full_like(k1, 2.0))
