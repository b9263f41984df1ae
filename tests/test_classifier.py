import json
from pathlib import Path

import pytest
import torch

from minirlhf import UserError
from minirlhf.stages.classifier import QUICK_S, SLOW_S, ClassifierConfig, Estimate, binary_scores
from minirlhf.config import load_config
from minirlhf.models.classifier import (DEFAULT_ENCODER, SentimentClassifier, Truncator, freeze_lower, load_pretrained,
                                        pad_batch, set_dropout)
from minirlhf.models.trunk import lower_hidden, start_at_layer


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model, tok = load_pretrained(DEFAULT_ENCODER)
    return model.eval(), tok


def test_freezing_counts_trainable_parameters(minilm):
    model, _ = minilm
    total = sum(p.numel() for p in model.parameters())
    trainable = freeze_lower(model, 4)
    frozen = sum(p.numel() for p in model.base_model.embeddings.parameters())
    frozen += sum(p.numel() for layer in model.base_model.encoder.layer[:4] for p in layer.parameters())
    assert trainable == total - frozen
    with pytest.raises(UserError, match="only 6 layers"):
        freeze_lower(model, 7)
    model.requires_grad_(True)


@pytest.mark.parametrize("n", [1, 4, 6])
def test_cached_lower_layers_give_the_full_models_logits(minilm, n):
    model, tok = minilm
    seqs = Truncator(tok, 32, "head")(["a wonderful, moving film", "dull", "I would not watch it again, ever."])
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        hidden = lower_hidden(model, ids, mask, n)
        with start_at_layer(model, n, hidden):
            upper = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(full, upper, atol=1e-5)
    assert len(model.base_model.encoder.layer) == 6  # restored


def test_truncation_keeps_head_or_head_and_tail(minilm):
    _, tok = minilm
    text = " ".join(f"w{i}" for i in range(200))
    head = Truncator(tok, 20, "head")([text])[0]
    both = Truncator(tok, 20, "head_tail")([text])[0]
    full = tok(text)["input_ids"]
    assert len(head) == len(both) == 20
    assert head[0] == both[0] == tok.cls_token_id and head[-1] == both[-1] == tok.sep_token_id
    assert head[1:-1] == full[1:19]
    assert both[1:5] == full[1:5] and both[5:-1] == full[-15:-1]
    assert Truncator(tok, 20, "head_tail")(["short"])[0] == tok("short")["input_ids"]


def test_dropout_option_sets_every_dropout_layer():
    model, tok = load_pretrained(DEFAULT_ENCODER)
    set_dropout(model, 0.0)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert layers and all(m.p == 0.0 for m in layers)
    ids, mask = pad_batch(Truncator(tok, 32, "head")(["a wonderful, moving film"]), tok.pad_token_id)
    model.train()  # attention dropout reads its layer's p too: two training-mode passes now agree
    with torch.no_grad():
        first, second = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert torch.equal(first, second)


def test_imdb_config_is_valid():
    cfg = load_config(ClassifierConfig, str(Path(__file__).parents[1] / "configs" / "imdb_classifier.yaml"))
    assert cfg.model.dropout == 0.0 and cfg.model.max_length == 256 and cfg.dtype == "auto"
    assert ClassifierConfig().model.dropout is None  # the default keeps the encoder's own dropout


def test_binary_scores_against_hand_counts():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # predicts 1, 0, 1, 0
    labels = torch.tensor([1, 1, 0, 0])
    s = binary_scores(logits, labels)
    assert s["accuracy"] == 0.5
    assert s["f1"] == pytest.approx(0.5)  # tp=1, fp=1, fn=1


def test_estimate_tells_a_slow_run_how_to_be_quicker():
    """10,000 reviews cut to 128 tokens, 3 epochs, at about the rates of MiniLM on 2 cores: a slow run, told the
    flags that bring it near QUICK_S; tweets of 30 tokens are not told anything."""
    rates = (1.1e-4, 1.9e-4, 1.45e-4)  # seconds per token: frozen layers 0-3, a training step of 4-5, the whole model
    reviews = Estimate({"train": 1_280_000, "val": 160_000, "test": 160_000}, 10_000, 3, rates, 10 ** 9, long_texts=True)
    assert reviews.seconds() > SLOW_S
    texts, epochs = reviews.quicker()
    assert epochs == 2 and 1000 <= texts < 10_000 and reviews.seconds(texts, epochs) <= QUICK_S
    assert reviews.seconds(texts + 1000, epochs) > QUICK_S  # as many texts as fit
    line = reviews.line()
    assert "about 16 min" in line and f"--data.max_train={texts} --train.epochs=2" in line
    assert "configs/imdb_classifier.yaml" in line and "954 MB" in line
    tweets = Estimate({"train": 300_000, "val": 36_000, "test": 36_000}, 10_000, 3, rates)
    assert tweets.quicker() is None and "quicker" not in tweets.line()


def test_training_two_epochs_changes_only_trainable_layers(tiny_classifier):
    from transformers import AutoModelForSequenceClassification

    trained = AutoModelForSequenceClassification.from_pretrained(tiny_classifier / "model")
    base, _ = load_pretrained(DEFAULT_ENCODER)
    t, b = trained.state_dict(), base.state_dict()
    assert torch.equal(t["bert.encoder.layer.0.attention.self.query.weight"], b["bert.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(t["bert.embeddings.word_embeddings.weight"], b["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(t["bert.encoder.layer.5.output.dense.weight"], b["bert.encoder.layer.5.output.dense.weight"])
    rows = [json.loads(line) for line in (tiny_classifier / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r] + [r["val/loss"] for r in rows if "val/loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "accuracy.png", "results.json"):
        assert (tiny_classifier / name).is_file(), name
    report = (tiny_classifier / "report.md").read_text()
    assert "| test accuracy |" in report and "![accuracy](accuracy.png)" in report
    results = json.loads((tiny_classifier / "results.json").read_text())
    assert 0 < results["estimated_seconds"] < results["total_seconds"]  # the timed passes, not the run's overheads


def test_trained_run_scores_texts(tiny_classifier):
    clf = SentimentClassifier.from_run(tiny_classifier)
    probs, logits = clf.score(["I love this so much", "worst day ever"])
    assert probs.shape == logits.shape == (2,)
    assert torch.all((probs > 0) & (probs < 1))
    assert torch.allclose(probs, clf.logits(["I love this so much", "worst day ever"]).softmax(-1)[:, 1])


def test_missing_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.yaml is missing"):
        SentimentClassifier.from_run(tmp_path)


@pytest.mark.slow
def test_classifier_learns_tweet_sentiment(learned_classifier):
    """Learning test: 2,000 tweets, one epoch, beats the majority-class baseline clearly."""
    results = json.loads((learned_classifier / "results.json").read_text())
    rows = [json.loads(line) for line in (learned_classifier / "metrics.jsonl").read_text().splitlines()]
    majority = 0.70  # about 70% of the tweets are negative
    assert results["test_accuracy"] >= majority + 0.08, results
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train_losses[-1] < 0.69  # below chance-level cross-entropy
