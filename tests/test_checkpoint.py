import json
import math
import os

import pytest
import torch

from minirlhf import UserError
from minirlhf.checkpoint import atomic_dir, atomic_write_text, load_json, load_weights, save_json, save_weights


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "a.json"
    save_json({"x": 1}, f)
    save_json({"x": 2}, f)
    assert load_json(f) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    f = tmp_path / "w.safetensors"
    save_weights({"w": torch.ones(3)}, f)
    with pytest.raises(Exception):
        save_weights({"w": "not a tensor"}, f)
    assert torch.equal(load_weights(f)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_dir_swaps_folders_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        atomic_write_text(tmp / "a.txt", "one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            atomic_write_text(tmp / "a.txt", "two")
            raise RuntimeError("crash while saving")
    assert (target / "a.txt").read_text() == "one"
    with atomic_dir(target) as tmp:
        atomic_write_text(tmp / "b.txt", "three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_corrupt_files_are_user_errors(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_json(tmp_path / "x.json")
    with pytest.raises(UserError, match="missing"):
        load_weights(tmp_path / "none.safetensors")


def test_an_update_with_non_finite_gradients_is_skipped_counted_or_stops():
    from minirlhf.training import make_optimizer, optimizer_step, skips
    from minirlhf.config import OptimConfig

    w = torch.nn.Parameter(torch.ones(3))
    opt, sched = make_optimizer([w], OptimConfig(), total_steps=40)
    skips("warn")
    for bad in (float("nan"), float("inf")):
        assert not math.isfinite(optimizer_step((w * bad).sum(), [w], opt, sched, 1.0))
    assert torch.equal(w.detach(), torch.ones(3)) and skips().total == 2 and not opt.state  # no Adam state either
    optimizer_step((w * 2).sum(), [w], opt, sched, 1.0)
    assert not torch.equal(w.detach(), torch.ones(3)) and skips().in_a_row == 0
    for _ in range(skips().IN_A_ROW - 1):  # warn: a run that only ever skips is going nowhere
        optimizer_step((w * float("nan")).sum(), [w], opt, sched, 1.0)
    with pytest.raises(UserError, match="10 updates in a row had non-finite gradients"):
        optimizer_step((w * float("nan")).sum(), [w], opt, sched, 1.0)
    skips("strict")
    kept = w.detach().clone()
    with pytest.raises(UserError, match="--guards strict stopped the run before the update"):
        optimizer_step((w * float("nan")).sum(), [w], opt, sched, 1.0)
    assert torch.equal(w.detach(), kept)
    skips("warn")


def test_weights_that_are_not_finite_never_replace_what_was_saved(tmp_path):
    from minirlhf.checkpoint import NotFinite
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_weights({"w": torch.ones(3), "step": torch.tensor([3])}, f)
    with pytest.raises(NotFinite, match="w in .* is not finite"):
        save_weights({"w": torch.tensor([1.0, float("nan"), 2.0])}, f)
    assert torch.equal(load_weights(f)["w"], torch.ones(3))
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        save_file({"a": torch.ones(2)}, str(tmp / "model.safetensors"))  # as transformers' save_pretrained writes
    with pytest.raises(NotFinite, match="model.safetensors"):
        with atomic_dir(target) as tmp:
            save_file({"a": torch.tensor([float("inf"), 0.0])}, str(tmp / "model.safetensors"))
    assert torch.equal(load_weights(target / "model.safetensors")["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "w.safetensors"]


def test_the_last_checkpoints_are_kept_and_an_unreadable_one_gives_way_to_the_one_before(tmp_path):
    from minirlhf.rundir import RunDir

    run = RunDir.create(tmp_path / "r", "rl", "ppo")
    for step in (2, 4, 6):
        with run.write_checkpoint(keep=2) as tmp:
            save_json({"step": step}, tmp / "state.json")
    assert run.checkpoint_step() == 6 and run.earlier_checkpoints() == [run.path / "checkpoint-4"]
    assert load_json(run.path / "checkpoint-4" / "state.json") == {"step": 4}
    with run.write_checkpoint(keep=1) as tmp:
        save_json({"step": 8}, tmp / "state.json")
    assert run.checkpoint_step() == 8 and run.earlier_checkpoints() == []
    for step in (5, 6, 7):  # what a crash before a save's pruning leaves
        (run.path / f"checkpoint-{step}").mkdir()
    run.prune(keep=2)
    assert run.earlier_checkpoints() == [run.path / "checkpoint-7"]


def test_every_random_stream_comes_back(tmp_path):
    import random

    import numpy as np

    from minirlhf.runtime import rng_state, set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    tensors, meta = rng_state()
    save_weights(tensors, tmp_path / "rng.safetensors")
    (tmp_path / "rng.json").write_text(json.dumps(meta))
    draws = lambda: (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), random.random())  # noqa: E731
    first = draws()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_weights(tmp_path / "rng.safetensors"), json.loads((tmp_path / "rng.json").read_text()))
    assert draws() == first


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    import json

    from minirlhf.checkpoint import load_optimizer_state, optimizer_state

    def model_and_adam():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    def step(model, opt):
        opt.zero_grad()
        model(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()

    a, opt_a = model_and_adam()
    step(a, opt_a)
    tensors, meta = optimizer_state(opt_a)
    save_weights(tensors, tmp_path / "opt.safetensors")
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    b, opt_b = model_and_adam()
    b.load_state_dict(a.state_dict())
    load_optimizer_state(opt_b, load_weights(tmp_path / "opt.safetensors"), json.loads((tmp_path / "opt.json").read_text()),
                         tmp_path)
    step(a, opt_a)
    step(b, opt_b)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    other = torch.optim.Adam(torch.nn.Linear(5, 3).parameters())
    with pytest.raises(UserError, match="does not fit this model"):
        load_optimizer_state(other, tensors, meta, tmp_path)


def test_a_resumed_metrics_file_keeps_the_steps_before_the_checkpoint_and_drops_a_torn_line(tmp_path):
    import json

    from minirlhf.metrics import MetricsWriter

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a"')
    writer = MetricsWriter(tmp_path, keep_until=2)
    writer.log(3, a=30)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "a": 1}, {"step": 2, "a": 2}, {"step": 3, "a": 30}] and writer.rows == rows


def test_a_folder_is_discarded_under_a_temporary_name_that_a_resume_clears(tmp_path):
    from minirlhf.checkpoint import discard
    from minirlhf.rundir import RunDir

    run = RunDir.create(tmp_path / "r", "rl", "ppo")
    (run.path / "checkpoint-3").mkdir()
    (run.path / "checkpoint-3" / "state.json").write_text("{}")
    discard(run.path / "checkpoint-3")
    (run.path / ".checkpoint-5.abc.tmp").mkdir()  # what a crash mid-discard (or mid-write) leaves
    (run.path / ".metrics.jsonl.xyz.tmp").write_text("half")
    run.clear_leftovers()
    assert sorted(p.name for p in run.path.iterdir()) == ["run.json"]


def test_saved_weights_read_back_exactly_with_safetensors_own_reader(tmp_path):
    """The file is written a tensor at a time by our own writer: every dtype, an empty and a 0-dim tensor, tied
    weights and views come back equal through safetensors' reader (and its memory-mapped one), metadata too."""
    from safetensors import safe_open

    base = torch.randn(6, 4)
    tensors = {"w": base, "tied": base, "row": base[2], "b16": torch.randn(5).bfloat16(), "h": torch.randn(3).half(),
               "ids": torch.arange(7), "i32": torch.arange(3, dtype=torch.int32), "flags": torch.tensor([True, False, True]),
               "u8": torch.arange(5, dtype=torch.uint8), "empty": torch.zeros(0, 3), "step": torch.tensor(4.5)}
    f = tmp_path / "w.safetensors"
    save_weights(tensors, f, metadata={"step": 4})
    back = load_weights(f)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safe_open(str(f), framework="pt") as g:
        assert g.metadata() == {"step": "4"} and torch.equal(g.get_tensor("b16"), tensors["b16"])
    umask = os.umask(0o022)
    os.umask(umask)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not mkstemp's private 0600


def test_a_save_writes_from_the_tensors_own_memory(tmp_path):
    """Saving 400 MB of weights raises the process's peak memory by far less than their size (safetensors' `save`
    built the whole file in memory first). Measured in a fresh process, so nothing else moves its peak."""
    import subprocess
    import sys

    code = (
        "import torch, resource\n"
        "from minirlhf.checkpoint import save_weights\n"
        "w = {f't{i}': torch.ones(25_000_000) for i in range(4)}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"save_weights(w, {str(tmp_path / 'big.safetensors')!r})\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) < 100, f"a 400 MB save raised the peak by {float(out.stdout):.0f} MB"
    assert (tmp_path / "big.safetensors").stat().st_size > 400_000_000
