"""The long-range recall task (premem.models.melodi_recall) and a reduced recall proof: S+L recalls, none cannot."""

from __future__ import annotations

import collections

import pytest
import torch

from premem.models.melodi import MelodiConfig, MelodiLM
from premem.models.melodi_recall import make_recall_docs, recall_accuracy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _text(doc) -> str:
    return "".join(chr(int(i) - 1) for i in doc.tokens)


def test_recall_documents():
    docs = make_recall_docs(400, W=8, n_windows=10, key_len=2, n_keys=(1, 3), seed=3)
    assert [_text(d) for d in docs[:5]] == [_text(d) for d in make_recall_docs(5, W=8, n_windows=10, key_len=2,
                                                                             n_keys=(1, 3), seed=3)]
    dist = collections.Counter()
    for d in docs:
        text = _text(d)
        assert len(text) == 80 and set(text) <= set(".#@") | set("abcdefghijklmnopqrstuvwxyz") | set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        windows = [text[w * 8:(w + 1) * 8] for w in range(10)]
        for p, k, n in d.targets:
            w, j = divmod(p, 8)
            recall = windows[w]
            assert recall[0] == "@" and j in (2, 3) and windows[w - k] == "#" + recall[1:]  # stated k windows before
            assert sum(x[0] == "#" for x in windows) == n and d.tokens[p] == ord(recall[j]) + 1
            dist[k] += 1
        assert all(x.strip(".") == "" or x[0] in "#@" and x[4:] == "...." for x in windows)
    assert sorted(dist) == list(range(1, 10)) and min(dist.values()) > 0.4 * max(dist.values())
    with pytest.raises(ValueError):
        make_recall_docs(1, W=3, n_windows=4, key_len=2)


def test_recall_accuracy_counts_key_letters_only():
    docs = make_recall_docs(20, W=8, n_windows=6, key_len=3, n_keys=(1, 2), seed=0)
    torch.manual_seed(0)
    m = MelodiLM(MelodiConfig(num_layers=2, d_model=32, num_heads=4, d_ff=64, W=8, S=2, Su=2, L=2, Q_max=6,
                              long_term_layer=1, vocab_size=257, dropout=0.0))
    acc = recall_accuracy(m, docs, batch_size=7)
    assert acc["letters"] == 3 * sum(len(d.targets) // 3 for d in docs)
    assert set(acc["by_keys"]) == {1, 2} and set(acc["by_distance"]) <= set(range(1, 6))
    assert acc["all"] < 0.2  # untrained

    class Oracle(torch.nn.Module):  # predicts every next token from the document itself
        def __init__(self, docs):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.docs = {tuple(d.tokens.tolist()): d.tokens for d in docs}

        def forward(self, x):
            nxt = torch.stack([torch.cat([self.docs[tuple(r.tolist())][1:], torch.zeros(1, dtype=torch.long)])
                               for r in x])
            return torch.nn.functional.one_hot(nxt, 257).float(), None

    assert recall_accuracy(Oracle(docs), docs)["all"] == 1.0
