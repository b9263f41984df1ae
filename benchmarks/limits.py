"""What this machine allows, and how close a run came to it: the fp32 matmul peak, the memory bandwidth, the
sampling phase against the bytes each decode step must read, and the update against the matmul peak.

Sampling a batch of B responses token by token reads every weight once per decode step (the tied LM head is
the embedding matrix, read whole) plus the KV cache of every block; nothing faster than memory can serve a
step, so `bytes / bandwidth` is the sampling's lower bound. At small B the arithmetic (2 FLOPs per weight per
row) can take longer than the reading: the roofline bound is the larger of the two, reported beside it.
"""

import json
import re
import time
from pathlib import Path

import torch


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """fp32 GFLOP/s of torch.mm on this machine, now (the best of `reps`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def decode_matmul_rate(rows: int = 16, shape: tuple[int, int] = (1536, 576), weights: int = 60) -> float:
    """fp32 GFLOP/s of a decode step's matmuls: `rows` tokens against `weights` distinct (cold) weight matrices of
    SmolLM2's MLP shape, best of 5. Far below the square-matmul peak at small `rows`: what sampling can reach."""
    ws = [torch.randn(*shape) for _ in range(weights)]
    x = torch.randn(rows, shape[1])  # (B, H)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        for w in ws:
            torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * rows * shape[0] * shape[1] * weights / best / 1e9


def memory_bandwidth(gib: float = 1.0, reps: int = 6) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written over the best time): far larger than any cache,
    so every byte comes from memory."""
    src = torch.ones(int(gib * 2 ** 30) // 4)  # (N,) fp32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def model_shape(folder: Path) -> dict:
    """Parameter counts (all; in the blocks; of block i) and the KV-cache geometry of a Llama-like model folder."""
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    total, per_block = 0, {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            size = 1
            for n in f.get_slice(key).get_shape():
                size *= n
            total += size
            m = re.match(r"model\.layers\.(\d+)\.", key)
            if m:
                per_block[int(m.group(1))] = per_block.get(int(m.group(1)), 0) + size
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return {"params": total, "block_params": per_block, "layers": cfg["num_hidden_layers"],
            "kv_bytes_per_token": 2 * cfg["num_key_value_heads"] * head_dim * 4 * cfg["num_hidden_layers"],
            "head_params": cfg["vocab_size"] * cfg["hidden_size"]}


def sampling_bounds(shape: dict, rows: int, prompt_len: int, decode_steps: int, bandwidth_gbs: float,
                    peak_gflops: float) -> tuple[float, float]:
    """(bandwidth bound, compute bound) in seconds for one sampling call of `rows` responses: the prompt pass and
    each later step read all weights (fp32) and the cache so far; each decode step computes 2 FLOPs per weight
    per row (the embedding lookup aside, counted once as the head; the prompt pass's FLOPs left out, which
    makes the bound, and the fraction, smaller)."""
    weight_bytes = 4 * shape["params"]
    kv = sum(rows * (prompt_len + t) * shape["kv_bytes_per_token"] for t in range(decode_steps))
    bytes_read = decode_steps * weight_bytes + kv
    matmul_params = sum(shape["block_params"].values()) + shape["head_params"]
    flops = 2 * matmul_params * rows * decode_steps
    return bytes_read / bandwidth_gbs / 1e9, flops / peak_gflops / 1e9


def sampling_fractions(rows: list[dict], shape: dict, batch: int, bandwidth_gbs: float, peak_gflops: float,
                       decode_gflops: float) -> dict:
    """The sampling phase's achieved fraction of the bandwidth bound, of the roofline bound, and of the time its
    matmuls take at the decode shape's own rate, over a run's steps (the first, which warms up, left out)."""
    bound_bw = bound_roof = bound_decode = seconds = 0.0
    for r in rows:
        if "time/sample_s" not in r:
            continue
        bw, compute = sampling_bounds(shape, batch, r["sample/prompt_len"], r["sample/decode_steps"], bandwidth_gbs,
                                      peak_gflops)
        bound_bw, bound_roof, seconds = bound_bw + bw, bound_roof + max(bw, compute), seconds + r["time/sample_s"]
        bound_decode += compute * peak_gflops / decode_gflops
    if not seconds:
        return {}
    return {"sample_seconds_per_step": seconds / len(rows), "sampling_bandwidth_fraction": bound_bw / seconds,
            "sampling_roofline_fraction": bound_roof / seconds,
            "sampling_decode_matmul_fraction": bound_decode / seconds}


def update_flops(rows: list[dict], cfg: dict, shape: dict) -> float:
    """Model FLOPs of the update (forward 2N + backward 4N per position through the trainable blocks; the LM head
    at response positions, 4N when frozen: its input's gradient only) per second of update."""
    options = cfg.get("policy_options", {})
    freeze = options.get("freeze_layers") or 0  # null: a run that kept the default for a policy with no blocks
    blocks = sum(n for i, n in shape["block_params"].items() if i >= freeze)
    head_trains = freeze == 0 or options.get("train_head")  # tied, the head is frozen with the embeddings
    flops = seconds = 0.0
    for r in rows:
        if "update/tokens" not in r:
            continue
        head_positions = r["policy/updates"] * min(cfg["minibatch_size"], cfg["batch_size"]) * r["response/length"]
        flops += 6 * blocks * r["update/tokens"] + (6 if head_trains else 4) * shape["head_params"] * head_positions
        seconds += r["time/update_s"]
    return flops / seconds if seconds else float("nan")
