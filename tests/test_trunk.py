"""The block-by-block trunk (models/trunk.py) is each model's own forward: whole, split, and with a KV cache."""

import pytest
import torch

from minirlhf import UserError
from minirlhf.models.trunk import DecoderTrunk, EncoderTrunk, GPT2Trunk, find_trunk, frozen_share


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def minilm():
    from minirlhf.models.classifier import load_pretrained

    model, tok = load_pretrained("minilm")
    return model.eval(), tok


@pytest.fixture(scope="module")
def smollm2():
    from minirlhf.models.pretrained import load_causal_lm

    return load_causal_lm("smollm2")[0]


@pytest.fixture
def prompts():
    """Two left-padded rows (B, 7) and their masks: the policy's layout."""
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [0, 0, 0, 21, 22, 23, 24]])
    return ids, (ids != 0).long()


@torch.no_grad()
def test_minilm_loop_is_its_forward_whole_and_split(minilm):
    model, tok = minilm
    enc = tok(["a wonderful, moving film", "dull"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    trunk = find_trunk(model)
    assert isinstance(trunk, EncoderTrunk) and len(trunk) == 6
    own = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    assert torch.allclose(trunk.forward(ids, mask), own, atol=1e-5)
    lower = trunk.run(trunk.embed(ids), mask, 0, 4)
    assert torch.allclose(trunk.norm(trunk.run(lower, mask, 4)), own, atol=1e-5)


@torch.no_grad()
def test_smollm2_loop_is_its_forward_whole_and_split(smollm2, prompts):
    ids, mask = prompts
    trunk = find_trunk(smollm2)
    assert isinstance(trunk, DecoderTrunk) and len(trunk) == 30
    positions = _positions(mask)
    own = smollm2(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
    head = smollm2.get_output_embeddings()
    assert torch.allclose(head(trunk.forward(ids, mask, positions)), own, atol=1e-5)
    lower = trunk.run(trunk.embed(ids), mask, 0, 20, positions)
    assert torch.allclose(head(trunk.norm(trunk.run(lower, mask, 20, None, positions))), own, atol=1e-5)


@torch.no_grad()
def test_smollm2_prompt_then_a_step_on_a_kv_cache_is_the_full_pass(smollm2, prompts):
    """Both ways the policy uses a cache: every block runs (sampling), or only the upper blocks on the frozen
    blocks' output kept from elsewhere (training), their lower slots left empty."""
    from transformers import DynamicCache

    ids, mask = prompts
    positions, P = _positions(mask), ids.size(1) - 1
    trunk, head = find_trunk(smollm2), smollm2.get_output_embeddings()
    full = smollm2(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]  # (B, V)

    cache = DynamicCache(config=smollm2.config)
    for cols in (slice(0, P), slice(P, P + 1)):  # the prompt, then one token
        lower = trunk.run(trunk.embed(ids[:, cols]), mask[:, : cols.stop], 0, 20, positions[:, cols], cache)
        step = head(trunk.norm(trunk.run(lower, mask[:, : cols.stop], 20, None, positions[:, cols], cache)))[:, -1]
    assert torch.allclose(step, full, atol=1e-4)

    lower = trunk.run(trunk.embed(ids), mask, 0, 20, positions)  # (B, P+1, H)
    cache = DynamicCache(config=smollm2.config)
    for cols in (slice(0, P), slice(P, P + 1)):
        step = head(trunk.norm(trunk.run(lower[:, cols], mask[:, : cols.stop], 20, None, positions[:, cols], cache)))
    assert cache.get_seq_length(0) == 0 and cache.get_seq_length(20) == P + 1  # the frozen blocks' slots stay empty
    assert torch.allclose(step[:, -1], full, atol=1e-4)


def _tiny(name: str):
    """A small random model of a family (no download): its config, the model, and whether it is causal."""
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    configs = {
        "distilbert": (tf.DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64, vocab_size=100), tf.DistilBertModel),
        "roberta": (tf.RobertaConfig(**small, max_position_embeddings=40, pad_token_id=1), tf.RobertaModel),
        "qwen2": (tf.Qwen2Config(**small, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                                 max_window_layers=1), tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig(**small, num_key_value_heads=1, sliding_window=4), tf.MistralForCausalLM),
        "gpt2": (tf.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100, n_positions=40), tf.GPT2LMHeadModel),
    }
    config, cls = configs[name]
    torch.manual_seed(0)
    return cls(config).eval(), name not in ("distilbert", "roberta")


@pytest.mark.parametrize("name, family", [("distilbert", EncoderTrunk), ("roberta", EncoderTrunk),
                                          ("qwen2", DecoderTrunk), ("mistral", DecoderTrunk), ("gpt2", GPT2Trunk)])
@torch.no_grad()
def test_other_families_loop_is_their_forward(name, family, prompts):
    from transformers import DynamicCache

    model, causal = _tiny(name)
    ids, mask = torch.cat([prompts[0]] * 2, 1) + 2, torch.cat([prompts[1]] * 2, 1)  # (B, 14): past the window of 4
    trunk = find_trunk(model)
    assert type(trunk) is family
    kw = {"position_ids": _positions(mask)} if causal else {}
    own = trunk.base(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    positions = kw.get("position_ids")
    assert torch.allclose(trunk.forward(ids, mask, positions), own, atol=1e-5)
    lower = trunk.run(trunk.embed(ids, positions), mask, 0, 1, positions)
    assert torch.allclose(trunk.norm(trunk.run(lower, mask, 1, None, positions)), own, atol=1e-5)
    if causal:  # the upper blocks alone on a cache, prompt then a step
        cache, P = DynamicCache(config=model.config), ids.size(1) - 1
        trunk.run(lower[:, :P], mask[:, :P], 1, None, positions[:, :P], cache)
        step = trunk.norm(trunk.run(lower[:, P:], mask, 1, None, positions[:, P:], cache))
        assert torch.allclose(step[:, -1], own[:, -1], atol=1e-5)


def test_an_unknown_model_is_a_user_error_naming_the_setting():
    with pytest.raises(UserError, match=r"not supported; .*--policy_options.freeze_layers=0"):
        find_trunk(torch.nn.Linear(2, 2), "--policy_options.freeze_layers")


def test_the_default_share_of_blocks_to_freeze_is_none_for_a_family_that_cannot_be_split(capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert frozen_share(llama, 1 / 3) == 1 and frozen_share(llama, 0.0) == 0  # round(4 / 3)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                            num_attention_heads=2))  # no trunk adapter: a number given is refused
    assert frozen_share(neox, 1 / 3) == 0
    assert "GPTNeoXModel cannot be split between its layers; no blocks frozen" in capsys.readouterr().out
