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
