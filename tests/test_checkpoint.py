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


def test_a_non_finite_loss_stops_before_the_weights_change():
    from minirlhf.training import make_optimizer, optimizer_step
    from minirlhf.config import OptimConfig

    w = torch.nn.Parameter(torch.ones(3))
    opt, sched = make_optimizer([w], OptimConfig(), total_steps=10)
    with pytest.raises(UserError, match="loss became nan"):
        optimizer_step((w * float("nan")).sum(), [w], opt, sched, 1.0)
    assert torch.equal(w.detach(), torch.ones(3))
    optimizer_step((w * 2).sum(), [w], opt, sched, 1.0)
    assert not torch.equal(w.detach(), torch.ones(3))


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
