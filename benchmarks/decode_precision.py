"""Sampling speed in fp32 and under bf16 autocast, and the probe's verdict, on this machine.

SmolLM2-135M-Instruct (4-bit-rounded weights, offline; the lower 15 blocks frozen, as configs/smollm2_constraints.yaml)
samples 16 replies of 40 tokens, twice per precision, interleaved; the probe (`precision.probe`) runs beside it.
A decode step multiplies a few rows by every weight, so under autocast (whose weight cast is not cached, see
precision.py) it can cost more in bf16 than in fp32 even where bf16 matmuls are twice as fast.
Run from the repository root: `.venv/bin/python -m benchmarks.decode_precision`; prints one JSON object and saves it
to benchmarks/results/decode_precision.json. Under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (what an
AVX2-only CPU runs) it saves decode_precision-avx2.json instead.
"""

import os
import sys
import time

import torch

from benchmarks.common import save_result
from benchmarks.multiturn import cpu

from minirlhf.models.load import load_policy
from minirlhf.precision import probe


def sample_seconds(policy, bf16: bool) -> float:
    prompts = ["Describe a rainy day. Do not use any commas."] * 16
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        t = time.perf_counter()
        policy.sample(prompts, 40, [torch.Generator().manual_seed(i) for i in range(16)])
        return time.perf_counter() - t


def main() -> int:
    torch.manual_seed(0)
    policy = load_policy("smollm2", "cpu", value_head=False, freeze_layers=15)
    policy.sample(["warm up"] * 4, 4, torch.Generator().manual_seed(0))
    times = {"fp32": [], "bf16": []}
    for _ in range(2):
        for name in times:
            times[name].append(sample_seconds(policy, name == "bf16"))
    report = {"benchmark": "decode_precision", "cpu": cpu(), "threads": torch.get_num_threads(),
              "sample_s": {k: round(min(v), 2) for k, v in times.items()},
              "bf16_speed_vs_fp32": round(min(times["fp32"]) / min(times["bf16"]), 3),
              "probe": probe(torch.device("cpu")), "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    save_result("decode_precision" + ("-avx2" if report["isa_limit"] == "AVX2" else ""), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
