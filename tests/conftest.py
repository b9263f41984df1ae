import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from minirlhf.runtime import configure_process

ROOT = Path(__file__).resolve().parents[1]
# `--dtype auto` takes bf16 where this machine's probe measured it faster (precision.py); the suite pins the speed part
# of the probe below the margin (bf16 passes, and frozen layers in bf16 or int8), so every machine runs the same fp32
# arithmetic and the same figures. The kernels that exist (the LSTM's bf16) are still measured; test_devices.py and
# test_frozen_form.py force the other results.
os.environ.setdefault("MINIRLHF_DTYPE_PROBE", '{"mlp": 1.0, "frozen_bf16": 1.0, "frozen_int8": 1.0}')
configure_process()  # the test session is an entry point: process-wide settings once, as the CLI makes them
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: a test process per core; one thread each, the runs it starts too
    os.environ["OMP_NUM_THREADS"] = "1"
    __import__("torch").set_num_threads(1)

FAST_FILES = {"test_ops.py", "test_structure.py", "test_config.py", "test_registry.py", "test_rundir.py",
              "test_checkpoint.py", "test_data.py", "test_prompts.py", "test_modelcard.py", "test_envs.py",
              "test_rewards.py", "test_kv_cache.py", "test_simulate.py", "test_guards.py", "test_readme.py",
              "test_benchmarks_harness.py", "test_benchmarks_render.py", "test_report.py"}
"""the `fast` tier (`make test-fast`): math against naive loops, units, parsing, the package's shape"""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in FAST_FILES:
            item.add_marker(pytest.mark.fast)


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m minirlhf ARGS` in a real subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minirlhf", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    return lambda *args, **kw: run_cli(*args, cwd=tmp_path, **kw)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A classifier run trained for a few steps on the offline tweets (shared by several tests)."""
    from minirlhf.stages.classifier import ClassifierConfig, train
    from minirlhf.config import load_config

    out = tmp_path_factory.mktemp("clf") / "run"
    cfg = load_config(ClassifierConfig, overrides=[
        "--data.max_train=96", "--data.max_eval=64", "--train.epochs=1", "--train.batch_size=32",
        "--model.max_length=48", f"--out={out}", "--device=cpu"])
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory) -> Path:
    from minirlhf.stages.generator import GeneratorConfig, train
    from minirlhf.config import load_config

    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = load_config(GeneratorConfig, overrides=[
        "--data.max_train=400", "--data.max_eval=100", "--train.epochs=1", "--vocab.max_size=500",
        "--model.emb_dim=32", "--model.hidden_dim=32", f"--out={out}", "--device=cpu"])
    return train(cfg)


@pytest.fixture(scope="session")
def learned_classifier(tmp_path_factory) -> Path:
    """A classifier that has really learned (2,000 tweets, one epoch): for the learning tests."""
    from minirlhf.stages.classifier import ClassifierConfig, train
    from minirlhf.config import load_config

    out = tmp_path_factory.mktemp("clf-learned") / "run"
    cfg = load_config(ClassifierConfig, overrides=[
        "--data.max_train=2000", "--data.max_eval=500", "--train.epochs=1", "--model.max_length=48",
        f"--out={out}", "--device=cpu"])
    return train(cfg)


def write_length_pairs(path: Path, n: int, longer_wins: bool = True, seed: int = 0) -> Path:
    """`n` preference pairs in which the longer response wins (or loses): a taste a reward model picks up fast."""
    rng = random.Random(seed)
    words = "good bad film movie great awful plot actor scene story love hate fun boring".split()
    with path.open("w") as f:
        for i in range(n):
            long, short = (" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for lo, hi in ((8, 14), (1, 5)))
            chosen, rejected = (long, short) if longer_wins else (short, long)
            f.write(json.dumps({"prompt": f"Tell me about film {i}", "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def train_tiny_reward_model(folder: Path, longer_wins: bool = True) -> Path:
    from minirlhf.stages.reward_model import RewardModelConfig, train
    from minirlhf.config import load_config

    pairs = write_length_pairs(folder / "pairs.jsonl", 32, longer_wins)
    cfg = load_config(RewardModelConfig, overrides=[
        f"--preferences={pairs}", "--model.max_length=32", "--train.epochs=1", "--train.batch_size=8",
        f"--out={folder / 'run'}", "--device=cpu"])
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> Path:
    """A MiniLM reward model trained for 4 steps to prefer longer responses (shared by several tests)."""
    return train_tiny_reward_model(tmp_path_factory.mktemp("rm"))
