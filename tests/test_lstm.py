import math

import pytest
import torch

from minirlhf.data.vocab import Vocab, detokenize, tokenize
from minirlhf.models.lstm import LSTMConfig, LSTMLanguageModel, decode, filter_logits, lm_loss


def test_tokenize_and_detokenize():
    toks = tokenize("I don't LOVE it!!<br />See http://x.co @bob &amp; (really)")
    assert toks == ["i", "don't", "love", "it", "!", "!", "see", "<url>", "@user", "&", "(", "really", ")"]
    assert detokenize(["great", "movie", "!", "(", "really", ")"]) == "great movie! (really)"


def test_vocab_build_encode_decode_save(tmp_path):
    v = Vocab.build(["a b c", "a b", "a", "z"], min_freq=2, max_size=10)
    assert v.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert v.itos[4:] == ["a", "b"]  # by frequency; c and z are below min_freq
    ids = v.encode("a c b")
    assert ids == [v.bos_id, v.stoi["a"], v.unk_id, v.stoi["b"], v.eos_id]
    assert v.decode(ids) == "a <unk> b"
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").itos == v.itos
    assert len(Vocab.build(["w%d" % i for i in range(50)] * 2, max_size=10)) == 10


def test_model_shapes_and_tied_weights():
    m = LSTMLanguageModel(LSTMConfig(emb_dim=8, hidden_dim=12, n_layers=2), vocab_size=30)
    logits, hidden, (h, c) = m(torch.randint(0, 30, (3, 5)))
    assert logits.shape == (3, 5, 30) and hidden.shape == (3, 5, 8) and h.shape == (2, 3, 12)
    assert m.head.weight is m.embed.weight
    untied = LSTMLanguageModel(LSTMConfig(emb_dim=8, hidden_dim=12, tie_weights=False), vocab_size=30)
    assert m.num_params() == untied.num_params() - 30 * 8


def test_lm_loss_ignores_padding():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 2, 0], [3, 0, 0]])
    picked = [logits[0, 0].log_softmax(-1)[1], logits[0, 1].log_softmax(-1)[2], logits[1, 0].log_softmax(-1)[3]]
    assert torch.allclose(lm_loss(logits, targets, pad_id=0), -torch.stack(picked).mean())


def _naive_filter(row: list[float], top_k: int, top_p: float) -> set[int]:
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k:
        order = order[:top_k]
    probs = [math.exp(row[i]) for i in order]
    z = sum(math.exp(x) for x in row) if not top_k else sum(probs)
    kept, mass = set(), 0.0
    for i, p in zip(order, probs):
        if mass >= top_p:
            break
        kept.add(i)
        mass += p / z
    return kept


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (0, 0.9), (4, 0.8)])
def test_filter_logits_matches_naive_loop(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    out = filter_logits(logits.clone(), top_k, top_p)
    for b in range(4):
        kept = {i for i in range(10) if out[b, i] > float("-inf")}
        assert kept == _naive_filter(logits[b].tolist(), top_k, top_p)


def test_batched_sampling_equals_one_by_one():
    torch.manual_seed(0)
    m = LSTMLanguageModel(LSTMConfig(emb_dim=16, hidden_dim=16, dropout=0.5), vocab_size=40).eval()
    prompts = [[2], [2, 7, 9, 11], [2, 5]]
    batched = decode(m, prompts, 12, eos_id=3, banned=[0, 2], top_k=1)  # greedy: deterministic
    single = [decode(m, [p], 12, eos_id=3, banned=[0, 2], top_k=1)[0] for p in prompts]
    assert batched == single
    assert all(len(s) <= 12 for s in batched)


def test_sampling_stops_at_eos_and_never_emits_banned_tokens():
    m = LSTMLanguageModel(LSTMConfig(emb_dim=8, hidden_dim=8), vocab_size=20).eval()
    with torch.no_grad():
        m.head.bias[:] = 0
        m.head.bias[3] = 4.0  # eos likely
        m.head.bias[0] = 50.0  # pad would win, but it is banned
    outs = decode(m, [[2]] * 16, 50, eos_id=3, banned=[0, 2], generator=torch.Generator().manual_seed(0))
    assert all(0 not in o and 2 not in o for o in outs)
    assert all(o[-1] == 3 and o.count(3) == 1 for o in outs)
