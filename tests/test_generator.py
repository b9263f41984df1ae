import json
import math

import pytest
import torch

from minirlhf import UserError
from minirlhf.models.policy import SamplingConfig
from minirlhf.stages.generator import generate_texts, load_generator, perplexity, unigram_perplexity
from minirlhf.data.vocab import Vocab
from minirlhf.models.lstm import LSTMConfig, LSTMLanguageModel, draw


def test_perplexity_matches_a_naive_loop():
    torch.manual_seed(0)
    m = LSTMLanguageModel(LSTMConfig(emb_dim=8, hidden_dim=8), vocab_size=12).eval()
    seqs = [[2, 5, 6, 3], [2, 7, 3], [2, 4, 4, 4, 8, 3]]
    nll, n = 0.0, 0
    for s in seqs:
        logp = m(torch.tensor([s[:-1]]))[0][0].log_softmax(-1)
        nll -= sum(logp[t, s[t + 1]].item() for t in range(len(s) - 1))
        n += len(s) - 1
    assert perplexity(m, seqs, pad_id=0, device="cpu", batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_draw_follows_the_distribution_and_each_row_its_own_generator():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])  # zero-probability tokens included
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(20_000):
        counts[draw(probs[:1], g)] += 1
    assert counts[1] == counts[4] == 0
    assert torch.allclose(counts / counts.sum(), probs[0], atol=0.015)  # ~4 standard errors
    rows = [draw(probs, [torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 1)]) for s in range(50)]
    assert all(r[1] == 4 for r in rows)
    alone = [draw(probs[:1], [torch.Generator().manual_seed(s)]).item() for s in range(50)]
    assert alone == [r[0].item() for r in rows]  # a row's token does not depend on the rows beside it


def test_unigram_perplexity_is_add_one_smoothed_frequency():
    v = Vocab(["<pad>", "<unk>", "<bos>", "<eos>", "a", "b"])
    train = [[2, 4, 4, 3], [2, 5, 3]]  # targets: a a eos b eos -> counts a2 b1 eos2 unk0
    val = [[2, 4, 3]]
    total = 5 + 4  # 5 targets + 4 symbols that can be predicted (a, b, eos, unk)
    expected = math.exp(-(math.log(3 / total) + math.log(3 / total)) / 2)
    assert unigram_perplexity(train, val, v) == pytest.approx(expected)


def test_training_writes_checkpoint_plots_and_beats_uniform_guessing(tiny_generator):
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "perplexity.png", "samples.md",
                 "model.safetensors", "vocab.json", "checkpoint.json", "results.json"):
        assert (tiny_generator / name).is_file(), name
    report = (tiny_generator / "report.md").read_text()
    assert "![perplexity](perplexity.png)" in report and report.count("\n| i think |") == 3  # 3 samples a prompt
    meta = json.loads((tiny_generator / "checkpoint.json").read_text())
    assert meta["step"] > 0 and meta["vocab_size"] <= 500
    results = json.loads((tiny_generator / "results.json").read_text())
    # a few steps only: better than guessing uniformly over the vocabulary, not yet than the unigram model
    assert math.isfinite(results["val_perplexity"]) and results["val_perplexity"] < results["vocab_size"]


def test_generation_from_a_saved_run_is_seeded(tiny_generator):
    model, vocab = load_generator(tiny_generator)
    sampling = SamplingConfig(max_new_tokens=8, top_p=0.9)
    a = generate_texts(model, vocab, ["i think", "this"], n=2, sampling=sampling, seed=1)
    b = generate_texts(model, vocab, ["i think", "this"], n=2, sampling=sampling, seed=1)
    assert a == b and len(a) == 4 and a[0][0] == "i think"
    assert all(len(text.split()) <= 8 for _, text in a)


def test_damaged_checkpoints_are_user_errors(tiny_generator, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_generator, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_generator(broken)
    (broken / "checkpoint.json").write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        load_generator(broken)
    with pytest.raises(UserError, match="not a generator run"):
        load_generator(tmp_path)


@pytest.mark.slow
def test_default_model_learns_the_tweets(tmp_path):
    """Learning test: two epochs of the default LSTM on 6,000 tweets beat the unigram model by a wide margin."""
    from minirlhf.stages.generator import GeneratorConfig, train
    from minirlhf.config import load_config

    cfg = load_config(GeneratorConfig, overrides=["--data.max_train=6000", "--data.max_eval=1000",
                                                   "--train.epochs=2", f"--out={tmp_path}", "--device=cpu"])
    results = json.loads((train(cfg) / "results.json").read_text())
    assert results["val_perplexity"] <= 0.75 * results["unigram_perplexity"], results
    print(results)


def test_training_moved_every_parameter_from_its_initial_value(tiny_generator):
    from minirlhf.runtime import seed_everything

    trained, vocab = load_generator(tiny_generator)
    seed_everything(0)  # train() builds the model right after seeding, with no random draws between
    initial = LSTMLanguageModel(trained.cfg, len(vocab))
    for (name, a), (_, b) in zip(trained.named_parameters(), initial.named_parameters()):
        assert torch.isfinite(a).all(), name
        assert not torch.equal(a, b), f"{name} did not change"


def test_the_seed_makes_cpu_runs_repeatable(tmp_path):
    from minirlhf.stages.generator import GeneratorConfig, train
    from minirlhf.config import load_config

    weights = []
    for name in ("a", "b"):
        cfg = load_config(GeneratorConfig, overrides=[
            "--data.max_train=200", "--data.max_eval=40", "--train.epochs=1", "--vocab.max_size=300",
            "--model.emb_dim=16", "--model.hidden_dim=16", f"--out={tmp_path / name}", "--device=cpu", "--seed=3"])
        model, _ = load_generator(train(cfg))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
