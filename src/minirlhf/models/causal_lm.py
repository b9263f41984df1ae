"""The causal-LM policy: any transformers causal LM (the offline `smollm2` by default) as a policy, with
KV-cached sampling, a shared frozen trunk, and prompts read once per group."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from minirlhf import ModelError, sharding
from minirlhf.checkpoint import atomic_dir, save_json, save_weights
from minirlhf.data.dialogue import to_messages
from minirlhf.models.frozen_form import cast_once, choose_form
from minirlhf.models.kv_cache import KVState, sampling_cache
from minirlhf.models.lora import AdaptersOff, load_adapters, with_lora
from minirlhf.models.lstm import Generators, draw, filter_logits
from minirlhf.models.policy import Rollout, distinct_rows, left_pad, make_value_head, teacher_forcing
from minirlhf.models.pretrained import load_causal_lm
from minirlhf.models.trunk import copy_sharing, find_trunk, frozen_share
from minirlhf.ops import entropy_from_logits
from minirlhf.precision import keep_fp32


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) counted over real tokens only, so left padding shifts nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class CausalLMPolicy(nn.Module):
    """A transformers causal LM as a policy: its trunk's last hidden state feeds both the LM head and,
    optionally, a value head. Instruct models read their prompts through their chat template.

    Rows are laid out as [prompt, left-padded | response, right-padded], in sampling and in training
    alike, with position ids counted over real tokens only; so the KV-cached sampling pass and the
    full training pass compute the same function at every response position.
    """

    kind = "causal_lm"

    def __init__(self, model, tokenizer, value_head: bool = True, chat_template: bool = True, freeze_layers: int = 0,
                 lora_rank: int = 0, lora_alpha: float = 16.0, gradient_checkpointing: bool = False,
                 train_head: bool = False):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.value_head = make_value_head(model.config.hidden_size) if value_head else None
        self.chat = bool(chat_template and getattr(tokenizer, "chat_template", None))
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
        if not self.eos_ids:
            raise ModelError("the causal LM defines no end-of-text token; give a model with eos_token_id set")
        self.eos_id = self.eos_ids[0]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.freeze_layers, self.split = freeze_layers, False
        n_layers = model.config.num_hidden_layers
        if freeze_layers > n_layers:
            raise ModelError(f"freeze_layers={freeze_layers} but the model has only {n_layers} layers")
        self.trunk = None  # the block-by-block view of the model (models/trunk.py), needed to split, adapt or recompute it
        self.checkpointing = gradient_checkpointing
        if freeze_layers > 0 or lora_rank > 0 or gradient_checkpointing:
            option = "freeze_layers" if freeze_layers else "lora_rank" if lora_rank else "gradient_checkpointing"
            self.trunk = find_trunk(model, "--policy_options." + option)
        for module in self.frozen_modules():
            module.requires_grad_(False)  # the LM head too, where it is tied to the embeddings
        self.train_head = train_head
        if train_head:
            if lora_rank > 0:
                raise ModelError("--policy_options.train_head does not combine with lora_rank; use one of them")
            self._untie_head()
        if lora_rank > 0:  # peft wraps the model but adapts the same block modules, so the trunk stays valid
            self.model = with_lora(model, self.trunk.blocks, lora_rank, lora_alpha, freeze_layers)
        self.lora = hasattr(self.model, "peft_config")
        self.form, self.form_why = "fp32", ""  # the frozen layers' form (use_frozen_form)
        self.cast_once = True  # bf16 runs: sample from bf16 copies of the trainable weights made once per call

    def _untie_head(self) -> None:
        """Give the LM head weights of its own, a copy of the input embeddings it was tied to, and train them; the
        embeddings stay as they were (frozen and shared with the lower blocks, when those are)."""
        if self.head.weight is self.model.get_input_embeddings().weight:
            self.head.weight = nn.Parameter(self.head.weight.detach().clone())
            self.model.config.tie_word_embeddings = False  # save_pretrained writes both; loading keeps them apart
        self.head.requires_grad_(True)

    def frozen_modules(self) -> list[nn.Module]:
        """The input embeddings and the lowest `freeze_layers` blocks: never trained, so shared by every copy."""
        return self.trunk.frozen_modules(self.freeze_layers) if self.trunk is not None else []

    def frozen_linears(self) -> list[nn.Linear]:
        """The linear layers that never train: the frozen blocks' and a frozen LM head (tied to frozen embeddings)."""
        linears = [m for module in self.frozen_modules() for m in module.modules() if isinstance(m, nn.Linear)]
        return linears + ([self.head] if not self.head.weight.requires_grad else [])

    def use_frozen_form(self, requested: str) -> str:
        """Run the frozen linear layers in `requested` form, or the measured winner (models/frozen_form.py); the
        form taken. Once, on the device the policy runs on, before copies (the reference) are made."""
        self.form, self.form_why = choose_form(self.model, self.tokenizer, self.frozen_linears(), requested)
        return self.form

    @classmethod
    def load(cls, name: str, value_head: bool = True, chat_template: bool = True, freeze_layers: int | None = 0,
             lora_rank: int = 0, lora_alpha: float = 16.0, keep_adapters: bool = False,
             gradient_checkpointing: bool = False, train_head: bool = False, frozen_fraction: float = 0.0):
        """From a hub name, a model folder, or a folder of LoRA adapters (a LoRA run's policy). Adapters are
        merged into the weights (the policy a new run starts from, and its reference, is the adapted model)
        unless `keep_adapters` (resuming the run that trains them). `freeze_layers` None: `frozen_fraction` of the
        blocks, rounded (none under LoRA)."""
        adapters = Path(name) / "adapter_config.json"
        if adapters.is_file():
            model, tokenizer = load_adapters(Path(name), keep_adapters)
            lora_rank = 0 if keep_adapters else lora_rank
        else:
            model, tokenizer = load_causal_lm(name)
        if freeze_layers is None:
            freeze_layers = 0 if lora_rank else frozen_share(model, frozen_fraction)
        policy = cls(model, tokenizer, value_head, chat_template, freeze_layers, lora_rank, lora_alpha,
                     gradient_checkpointing, train_head)
        policy._check_logits()
        policy.split = policy._check_split()
        return policy

    @torch.no_grad()
    def _check_logits(self) -> None:
        """The policy computes logits as head(trunk(x)); refuse models whose forward does more (soft-capping)."""
        ids = torch.arange(3, 11).remainder(self.model.config.vocab_size).unsqueeze(0)  # (1, 8) ordinary tokens
        ours = self.head(self.decoder(input_ids=ids).last_hidden_state)
        if not torch.allclose(ours, self.model(input_ids=ids).logits, atol=1e-4):
            raise ModelError(f"{type(self.model).__name__} transforms its logits beyond lm_head(hidden state), "
                            "which this policy does not reproduce; use a Llama-, Qwen-, Mistral- or GPT-2-style model")

    @torch.no_grad()
    def _check_split(self) -> bool:
        """Whether the trunk's loop, frozen blocks then the rest, reproduces the model's own forward (a one-time
        check of the adapter: a family member whose forward does more fails it); if it does, the frozen blocks'
        output is computed once per rollout and reused by every pass."""
        if self.freeze_layers == 0:
            return False
        ids = torch.arange(3, 11).remainder(self.model.config.vocab_size).unsqueeze(0)  # (1, 8)
        mask = torch.ones_like(ids)
        ok = torch.allclose(self._upper(self._lower(ids, mask), mask), self._hidden(ids, mask), atol=1e-4)
        if not ok:
            print(f"note: {type(self.model).__name__} cannot be run from its layer {self.freeze_layers}; the frozen "
                  "layers are shared but recomputed on every pass")
        return ok

    def _copy(self, value_head: bool) -> "CausalLMPolicy":
        """A copy whose frozen lower blocks are this policy's own modules: only the upper blocks take memory."""
        other = CausalLMPolicy(copy_sharing(self.model, self.frozen_modules()), self.tokenizer, value_head=value_head,
                               chat_template=self.chat, freeze_layers=self.freeze_layers,
                               gradient_checkpointing=self.checkpointing, train_head=self.train_head)
        other.split, other.form, other.form_why = self.split, self.form, self.form_why  # the frozen layers: shared
        return other

    def frozen_copy(self) -> nn.Module:
        """The reference policy, which never trains: with LoRA the same model with its adapters off (no second
        copy); otherwise a copy of the upper blocks over the shared frozen ones."""
        if self.lora:
            return AdaptersOff(self)
        ref = self._copy(value_head=False)
        ref.requires_grad_(False)
        return ref.eval()

    def critic_copy(self) -> "CausalLMPolicy":
        """A separate critic: trainable upper blocks and a value head over the shared frozen blocks."""
        if self.lora:
            raise ModelError("a separate critic with LoRA is not supported; use --critic=head")
        critic = self._copy(value_head=True)
        critic.head.requires_grad_(False)  # its value loss never reaches the LM head: no gradient, no Adam state
        return critic.eval()

    def as_text(self, prompt: str, response: str) -> str:
        """A chat model's reply stands alone; a plain LM's response continues the prompt."""
        return response.strip() if self.chat else prompt + response

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids: a chat model's through its chat template (a conversation turn by turn), a plain LM's as
        the text itself."""
        if self.chat:
            out = self.tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        ids = self.tokenizer(prompt)["input_ids"]
        return ids or [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id]

    def _lower(self, ids, mask, cache=None, positions=None) -> torch.Tensor:
        """Output (B, L, H) of the embeddings and the frozen blocks for tokens ids (B, L); mask (B, cached + L)."""
        positions = _positions(mask)[:, -ids.size(1):] if positions is None else positions  # (B, L)
        return self.trunk.run(self.trunk.embed(ids, positions), mask, 0, self.freeze_layers, positions, cache)

    def _upper(self, lower: torch.Tensor, mask, cache=None, positions=None) -> torch.Tensor:
        """Last hidden states (B, L, H) of the trainable blocks and the final norm, from the frozen blocks' output."""
        positions = _positions(mask)[:, -lower.size(1):] if positions is None else positions  # (B, L)
        return self.trunk.norm(self.trunk.run(lower, mask, self.freeze_layers, None, positions, cache))

    @torch.no_grad()
    def prepare(self, rollout: Rollout) -> None:
        """Compute the frozen blocks' output over prompt + response once; every later pass (reference, critic,
        each epoch of the update) starts from it."""
        if self.split and rollout.frozen_hidden is None:
            ids, attention = self._sequence(rollout)
            rollout.frozen_hidden = self._lower(ids, attention)  # (B, P+T, H)

    @staticmethod
    def _sequence(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)  # (B, P+T)
        mask = torch.cat([rollout.prompt_mask, rollout.seen_mask.to(rollout.prompt_mask.dtype)], 1)  # (B, P+T)
        return ids, mask

    def _hidden(self, ids, mask, cache=None, positions=None) -> torch.Tensor:
        """Last hidden states (B, L, H) of the model's own decoder forward, with position ids that skip left padding."""
        positions = _positions(mask)[:, -ids.size(1):] if positions is None else positions  # (B, L)
        return self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=cache is not None).last_hidden_state

    def _step(self, ids, mask, cache, positions, frozen: list[torch.Tensor]) -> torch.Tensor:
        """Last hidden states (B, L, H) of new tokens ids (B, L) against the cache; with a split trunk the frozen
        blocks' output (B, L, H) goes to `frozen`, for the training passes to start from."""
        if not self.split:
            return self._hidden(ids, mask, cache, positions)
        lower = self._lower(ids, mask, cache, positions)
        frozen.append(lower)
        return self._upper(lower, mask, cache, positions)

    def _read_prompts(self, ids, mask, lower=None):
        """Each distinct prompt of ids, mask (B, P) read once (a GRPO group shares one). Returns the last prompt
        position's hidden state (B, H), a KV cache whose rows are copied to all B, and with a split trunk the frozen
        blocks' output (B, P, H), else None. Given that output `lower` (B, P, H), only the upper blocks run: the
        cache's slots of the frozen blocks stay empty, since nothing runs those blocks against it again."""
        index, first = distinct_rows(ids)  # (B,), (U,)
        cache = sampling_cache(self.model.config)
        if not self.split:
            h, frozen = self._hidden(ids[first], mask[first], cache), None  # (U, P, H)
        else:
            frozen = self._lower(ids[first], mask[first], cache) if lower is None else lower[first]  # (U, P, H)
            h = self._upper(frozen, mask[first], cache)  # (U, P, H)
            frozen = frozen[index]  # (B, P, H)
        cache.reorder_cache(index)
        return h[index, -1], cache, frozen

    @torch.no_grad()
    def sample(self, prompts: list[str], max_new_tokens: int, generator: Generators = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, ids: list[list[int]] | None = None,
               state: "KVState | None" = None) -> Rollout:
        """Batched sampling with a KV cache until end-of-text or `max_new_tokens`; keeps the log-probs
        (temperature 1: the policy's own), values and entropies of every sampled token, and with a split
        trunk the frozen blocks' output at every position (so `prepare` has nothing left to do). `ids`: the
        prompts' token ids where the caller holds them (an episode's conversation so far, never re-tokenised);
        `state`: the KV cache of an earlier turn of the same conversations, kept across turns, so only the tokens
        it lacks are read (an episode's next user turn), not the whole conversation again."""
        device = next(self.parameters()).device
        with keep_fp32("decode"), cast_once(self._trainable_linears() if self.cast_once else [], device):
            # bf16 runs: fp32 where this machine decodes faster in fp32 (the probe's), else bf16 weights cast once
            return self._sample(prompts, max_new_tokens, generator, (temperature, top_k, top_p), ids, state, device)

    def _trainable_linears(self) -> list[nn.Linear]:
        frozen = {id(m) for m in self.frozen_linears()}
        return [m for m in self.model.modules() if isinstance(m, nn.Linear) and id(m) not in frozen]

    def _sample(self, prompts, max_new_tokens, generator, sampling, ids, state, device) -> Rollout:
        seqs = ids if ids is not None else [self.encode(p) for p in prompts]
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad(seqs, self.pad_id))
        if state is not None and state.cache is not None:
            h, frozen = self._extend(state, seqs, device), []  # no frozen output kept: `prepare` computes it
        else:
            h, cache, prompt_frozen = self._read_prompts(prompt_ids, prompt_mask)  # (B, H)
            frozen = [prompt_frozen] if self.split and state is None else []  # (B, P, H) then (B, 1, H) a step
            state = KVState() if state is None else state
            state.cache, state.mask, state.counts = cache, prompt_mask, prompt_mask.sum(1)
        steps = self._decode(h, state, max_new_tokens, generator, sampling, frozen)
        rollout = self._rollout(prompts, prompt_ids, prompt_mask, steps)
        if frozen:
            hidden = torch.cat(frozen, 1)  # (B, P+T-1, H) or (B, P+T, H): the last token never runs, and no kept
            missing = prompt_ids.size(1) + len(steps) - hidden.size(1)  # output depends on it (causal attention)
            rollout.frozen_hidden = nn.functional.pad(hidden, (0, 0, 0, missing))  # (B, P+T, H)
        return rollout

    def _decode(self, h, state: "KVState", max_new_tokens: int, generator, sampling: tuple, frozen: list) -> list:
        """Sample token after token from the last hidden states h (B, H) against `state`'s cache. A token goes into
        the cache (attended, its position counted) only if its row was live when it was drawn: the padding after a
        row's end-of-text is never read, so a conversation can go on from the cache. Returns the steps' (token,
        log-prob, value, entropy, live) tuples, each (B,)."""
        temperature, top_k, top_p = sampling
        B, device = h.size(0), h.device
        eos = torch.tensor(self.eos_ids, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        steps: list[tuple] = []
        for _ in range(max_new_tokens):
            logits = self.head(h).float()  # (B, V)
            logp = logits.log_softmax(-1)
            probs = logp.exp() if sampling == (1.0, 0, 1.0) else \
                filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            token = draw(probs, generator)  # (B,)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            value = self.value_head(h).squeeze(-1) if self.value_head is not None else None
            steps.append((token, logp.gather(1, token.unsqueeze(1)).squeeze(1), value, entropy_from_logits(logits),
                          ~done))
            live = ~done
            done = done | torch.isin(token, eos)
            if done.all():
                break
            state.mask = torch.cat([state.mask, live.to(state.mask.dtype).unsqueeze(1)], 1)  # (B, L + 1)
            h = self._step(token.unsqueeze(1), state.mask, state.cache, state.counts.unsqueeze(1), frozen)[:, -1]
            state.counts = state.counts + live.long()
        return steps

    def _extend(self, state: "KVState", seqs: list[list[int]], device) -> torch.Tensor:
        """Read into `state`'s cache the tokens of `seqs` it does not hold yet (each row's own count of them, left-
        padded into one block whose padding is never attended); the last hidden states (B, H)."""
        new = [s[int(c):] for s, c in zip(seqs, state.counts.tolist())]
        if min(len(n) for n in new) == 0:
            raise ModelError("a conversation continued from its cache must add at least one token per row")
        ids, mask = (t.to(device) for t in left_pad(new, self.pad_id))  # (B, U)
        positions = state.counts.unsqueeze(1) + (mask.cumsum(1) - 1).clamp(min=0)  # (B, U) real tokens counted
        state.mask = torch.cat([state.mask, mask.to(state.mask.dtype)], 1)
        h = self._step(ids, state.mask, state.cache, positions, [])[:, -1]  # (B, H)
        state.counts = state.counts + mask.sum(1)
        return h

    def teacher_forced(self, prompts: list[str], responses: list[str], max_prompt_tokens: int,
                       max_response_tokens: int) -> Rollout:
        """Given responses (a chat reply stripped), each closed by end-of-text, as a Rollout to score (`teacher_forcing`)."""
        ids = [self.tokenizer(r.strip() if self.chat else r, add_special_tokens=False)["input_ids"] + [self.eos_id]
               for r in responses]
        return teacher_forcing(prompts, [self.encode(p) for p in prompts], ids, responses, max_prompt_tokens,
                               max_response_tokens, self.pad_id, self.eos_id, next(self.parameters()).device)

    def _rollout(self, prompts, prompt_ids, prompt_mask, steps) -> Rollout:
        tokens, logprobs, values, entropy, live = (torch.stack(x, 1) if x[0] is not None else None for x in zip(*steps))
        mask = live.float()  # (B, T): a row is live until just after its end-of-text token
        lengths = mask.sum(1).long()
        last = tokens.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        ended = (lengths > 0) & torch.isin(last, torch.tensor(self.eos_ids, device=last.device))
        texts = [self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(tokens, lengths)]
        return Rollout(list(prompts), prompt_ids, prompt_mask, tokens, mask, texts, ended, logprobs * mask,
                       values * mask if values is not None else None, entropy * mask)

    def forward(self, rollout: Rollout, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs, values and entropies (B, T) of the response tokens, in one pass over prompt + response
        (`entropy=False` skips a pass over the vocabulary that the update does not need). The vocabulary is read only
        where response_mask is 1: padding, and an episode's user tokens, cost no (B, T, V) logits."""
        mask = rollout.response_mask
        h = self._predicting(rollout)  # (B, T, H)
        on = mask.bool()  # (B, T)
        logits = self.head(h[on]).float()  # (N, V) one matmul over the N tokens that train
        picked = logits.log_softmax(-1).gather(1, rollout.response_ids[on].unsqueeze(1)).squeeze(1)  # (N,)
        logprobs = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(on, picked)
        values = self.value_head(h).squeeze(-1) * mask if self.value_head is not None else None
        ent = None
        if entropy:
            ent = torch.zeros(mask.shape, dtype=logits.dtype, device=logits.device).masked_scatter(
                on, entropy_from_logits(logits))  # (B, T)
        return logprobs, values, ent

    def _predicting(self, rollout: Rollout) -> torch.Tensor:
        """Hidden states (B, T, H) at the positions that predict each response token: the distinct prompts are read
        once (`_read_prompts`), then the responses against their copied cache. The same as one pass over prompt +
        response, without reading a shared prompt B times."""
        if self.checkpointing and torch.is_grad_enabled():
            return self._recomputed(rollout)
        P = rollout.prompt_ids.size(1)
        ids, attention = self._sequence(rollout)  # (B, P+T) each
        positions = _positions(attention)  # (B, P+T)
        if self.split:
            self.prepare(rollout)
            lower = rollout.frozen_hidden
            last, cache, _ = self._read_prompts(ids[:, :P], attention[:, :P], lower[:, :P])  # (B, H)
            response = self._upper(lower[:, P:], attention, cache, positions[:, P:])  # (B, T, H)
        else:
            last, cache, _ = self._read_prompts(ids[:, :P], attention[:, :P])
            response = self._hidden(ids[:, P:], attention, cache, positions[:, P:])  # (B, T, H)
        return torch.cat([last.unsqueeze(1), response[:, :-1]], 1)

    def _recomputed(self, rollout: Rollout) -> torch.Tensor:
        """`_predicting` with gradient checkpointing: one pass over prompt + response whose trainable blocks keep only
        their inputs, recomputed in the backward pass. No prompt cache: the recompute would write to it again."""
        P = rollout.prompt_ids.size(1)
        ids, attention = self._sequence(rollout)  # (B, P+T) each
        positions = _positions(attention)  # (B, P+T)
        if self.split:
            self.prepare(rollout)
            hidden, start = rollout.frozen_hidden, self.freeze_layers  # (B, P+T, H)
        else:
            hidden, start = self.trunk.embed(ids, positions), 0  # (B, P+T, H)
        hidden = self.trunk.norm(self.trunk.run(hidden, attention, start, None, positions, checkpoint=True))
        return hidden[:, P - 1: -1]  # (B, T, H): the positions that predict each response token

    def save(self, folder: Path) -> None:
        """transformers' own format (so `from_pretrained` loads it; with LoRA, the adapters only) plus the
        value head, replaced atomically."""
        with atomic_dir(folder) as tmp:
            self.model.save_pretrained(tmp, state_dict=sharding.full_state_dict(self.model))  # whole under FSDP
            self.tokenizer.save_pretrained(tmp)
            save_json({"kind": "causal_lm", "chat_template": self.chat}, tmp / "policy.json")
            if self.value_head is not None:
                save_weights(sharding.full_state_dict(self.value_head), tmp / "value_head.safetensors")
