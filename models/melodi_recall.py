"""A long-range recall task for MELODI: does the model use its memory?

Each synthetic document is `n_windows` windows of W byte tokens, all filler ('.') except n_keys statements and
n_keys recalls, each at the start of its own window. A statement is '#', a label (a distinct capital letter per
key) and a random key of `key_len` lowercase letters; the recall of that key, k windows later, is '@', the label
and the same key. The key letters of a recall are unpredictable without memory (chance 1/26); everything else is
filler or a marker. Recall accuracy is the share of recalled key letters the model predicts (argmax), by
distance k and by the number of keys per document.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from .melodi import MelodiLM

__all__ = ["RecallDoc", "make_recall_docs", "recall_accuracy"]

_FILL, _STATE, _RECALL = ord(".") + 1, ord("#") + 1, ord("@") + 1  # byte tokenizer ids (byte + 1)
_LETTERS = torch.tensor([ord(c) + 1 for c in string.ascii_lowercase])
_LABELS = torch.tensor([ord(c) + 1 for c in string.ascii_uppercase])


@dataclass
class RecallDoc:
    tokens: torch.Tensor           # int64 [n_windows * W]
    targets: list[tuple[int, int, int]]  # (token position of a recalled key letter, distance k, n_keys)


def make_recall_docs(n_docs: int, *, W: int, n_windows: int, key_len: int = 1, n_keys: int | tuple[int, ...] = 1,
                     min_distance: int = 1, max_distance: int | None = None, seed: int = 0) -> list[RecallDoc]:
    """Documents whose keys are recalled min_distance..max_distance windows after they are stated (uniform),
    each with n_keys keys (or one of the tuple's counts, uniform). Seeded: the same arguments give the same docs."""
    max_distance = max_distance or n_windows - 1
    counts = (n_keys,) if isinstance(n_keys, int) else tuple(n_keys)
    if W < key_len + 2 or not 1 <= min_distance <= max_distance < n_windows or max(counts) > len(_LABELS):
        raise ValueError("need W >= key_len + 2, 1 <= min_distance <= max_distance < n_windows, <= 26 keys")
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = counts[int(torch.randint(len(counts), (1,), generator=g))]
        while True:  # n (statement, recall) window pairs, every window used at most once; k uniform
            dist = torch.randint(min_distance, max_distance + 1, (n,), generator=g)
            starts = (torch.rand(n, generator=g) * (n_windows - dist)).long()
            ends = starts + dist
            if len(set(torch.cat([starts, ends]).tolist())) == 2 * n:
                break
        tokens = torch.full((n_windows * W,), _FILL, dtype=torch.long)
        labels = _LABELS[torch.randperm(len(_LABELS), generator=g)[:n]]
        targets = []
        for i in range(n):
            key = _LETTERS[torch.randint(len(_LETTERS), (key_len,), generator=g)]
            for w, marker in ((int(starts[i]), _STATE), (int(ends[i]), _RECALL)):
                p = w * W
                tokens[p], tokens[p + 1], tokens[p + 2: p + 2 + key_len] = marker, labels[i], key
            p = int(ends[i]) * W + 2
            targets += [(p + j, int(dist[i]), n) for j in range(key_len)]
        docs.append(RecallDoc(tokens, targets))
    return docs


@torch.no_grad()
def recall_accuracy(model: MelodiLM, docs: list[RecallDoc], *, batch_size: int = 32) -> dict:
    """{"by_distance": {k: accuracy}, "by_keys": {n: accuracy}, "all": accuracy, "letters": count}: the share of
    recalled key letters predicted exactly, each document read whole from a fresh state."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: list[tuple[int, int, bool]] = []
    for s in range(0, len(docs), batch_size):
        part = docs[s:s + batch_size]
        x = torch.stack([d.tokens for d in part]).to(device)
        pred = model(x)[0].argmax(-1).cpu()  # position p predicts token p + 1
        for b, d in enumerate(part):
            hits += [(k, n, bool(pred[b, p - 1] == d.tokens[p])) for p, k, n in d.targets]
    model.train(was)

    def share(key: int) -> dict:
        groups: dict[int, list[bool]] = {}
        for h in hits:
            groups.setdefault(h[key], []).append(h[2])
        return {g: sum(v) / len(v) for g, v in sorted(groups.items())}

    return {"by_distance": share(0), "by_keys": share(1), "all": sum(h[2] for h in hits) / max(1, len(hits)),
            "letters": len(hits)}
