"""`premem compress` and the long-term memory store: exactness against a full forward, bad input, refusal."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from click.testing import CliRunner

from premem.jobs.cli import main
from premem.jobs.melodi_run import run_compress
from premem.models import CheckpointError
from premem.models.melodi import MelodiConfig, MelodiLM, MelodiState
from premem.models.melodi_ckpt import ByteTokenizer, load_checkpoint, model_fingerprint, save_checkpoint
from premem.pipeline.compress import compress_documents, plan_shards
from premem.storage import FingerprintMismatch, StoreError, open_store
from premem.storage.longterm import LongTermStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
W = 8
# document id -> length in bytes: several windows exactly, a tail after the last whole window, shorter than a
# window (rejected), longer than the FIFO (Q_max = 3 windows), exactly one window
LENGTHS = {"exact5": 40, "padded8": 59, "short": 3, "two": 16, "one": 8, "long12": 93}


def tiny_config(**kw) -> MelodiConfig:
    base = dict(num_layers=3, d_model=32, num_heads=4, d_ff=64, W=W, S=4, Su=4, L=2, Q_max=3,
                long_term_layer=1, vocab_size=257, dropout=0.0)
    return MelodiConfig(**{**base, **kw})


def _texts(seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    return {k: "".join(rng.choice("abcdefgh ,.") for _ in range(n)) for k, n in LENGTHS.items()}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A random tiny checkpoint, a JSONL corpus with good and bad records, and its store (3 docs per shard)."""
    root = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    model = MelodiLM(tiny_config()).eval()
    fp = save_checkpoint(model, root / "ckpt")
    texts = _texts()
    with open(root / "docs.jsonl", "w") as f:
        for k, t in texts.items():
            f.write(json.dumps({"id": k, "title": k.upper(), "text": t}) + "\n")
        f.write(json.dumps({"id": "empty", "text": "  \n"}) + "\n")
        f.write("{broken json\n")
        f.write(json.dumps({"id": "two", "text": "a duplicate id"}) + "\n")
    summary = run_compress([str(root / "docs.jsonl")], str(root / "store"), str(root / "ckpt"),
                           docs_per_shard=3, docs_per_batch=2)
    return {"root": root, "model": model, "fp": fp, "texts": texts, "summary": summary}


def _doc_tokens(text: str) -> tuple[torch.Tensor, int]:
    """Token ids of the whole windows, and their number (the tail is not compressed)."""
    ids = ByteTokenizer().encode_tensor(text)
    n = len(ids) // W
    return ids[: n * W], n


def test_stored_increments_equal_full_forward(compressed):
    """(a) per document and window, the stored FIFO is the long-term layer's FIFO inside one full forward."""
    model = compressed["model"]
    store = open_store(compressed["root"] / "store", expected_fingerprint=compressed["fp"])
    assert isinstance(store, LongTermStore)
    c = model.config
    for doc, text in compressed["texts"].items():
        if doc == "short":
            continue
        tokens, n = _doc_tokens(text)
        with torch.no_grad():
            _, st_full, incs = model(tokens[None], return_increments=True)
        expected = torch.cat([torch.zeros(c.Q_max, c.L, c.d_model), incs[0]])  # zeros before the document
        batch = store.long_term([doc] * (n + 1), list(range(n + 1)))
        assert batch.fifo.shape == (n + 1, c.Q_max * c.L, c.d_model) and batch.fifo.dtype == torch.float32
        for k in range(n + 1):
            want = expected[k : k + c.Q_max].reshape(-1, c.d_model)  # increments of windows k-Q_max .. k-1
            assert torch.allclose(batch.fifo[k], want, atol=ATOL, rtol=0), (doc, k)
            assert int(batch.n_valid[k]) == min(k, c.Q_max)
        assert torch.allclose(batch.fifo[n], st_full.fifo[0], atol=ATOL, rtol=0)
    # batched read of several documents at one window
    b = store.long_term(["exact5", "long12", "padded8"], 1)
    assert b.fifo.shape == (3, 6, 32) and b.n_valid.tolist() == [1, 1, 1]
    assert torch.count_nonzero(b.fifo[:, :4]) == 0 and torch.count_nonzero(b.fifo[:, 4:]) > 0


def test_end_state_continues_document_exactly(compressed):
    """(b) continuing after the document from the stored end state = document + continuation in one go."""
    model = compressed["model"]
    store = LongTermStore.open(compressed["root"] / "store", expected_fingerprint=compressed["fp"])
    docs = ["padded8", "one", "long12"]
    es = store.end_state(docs)
    assert es.z.shape == (3, 3, 4, 32) and es.n_windows.tolist() == [7, 1, 11]
    assert es.n_tokens.tolist() == [59, 8, 93]
    cont = torch.randint(1, 257, (3, 2 * W), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, _ = model(cont, MelodiState(es.z, es.fifo, es.n_valid))
        for b, doc in enumerate(docs):
            tokens, _ = _doc_tokens(compressed["texts"][doc])
            whole, _ = model(torch.cat([tokens, cont[b]])[None])
            assert torch.allclose(logits[b], whole[0, -2 * W :], atol=ATOL, rtol=0), doc


def test_compress_documents_batching_and_lower_layers_only():
    """Side-by-side documents of different lengths and the increments-only path give the same increments."""
    torch.manual_seed(1)
    model = MelodiLM(tiny_config()).eval()
    docs = [torch.randint(1, 257, (n,)) for n in (13, 33, 17, 8, 64)]
    one = {i: (x, z) for i, x, z in compress_documents(model, docs, docs_per_batch=1)}
    many = {i: (x, z) for i, x, z in compress_documents(model, docs, docs_per_batch=5)}
    lower = {i: (x, z) for i, x, z in compress_documents(model, docs, docs_per_batch=3, end_state=False)}
    assert sorted(one) == sorted(many) == sorted(lower) == list(range(5))
    for i, d in enumerate(docs):
        n = len(d) // W
        assert one[i][0].shape == (n, 2, 32) and one[i][1].shape == (3, 4, 32) and lower[i][1] is None
        assert torch.allclose(one[i][0], many[i][0], atol=ATOL) and torch.allclose(one[i][1], many[i][1], atol=ATOL)
        assert torch.allclose(one[i][0], lower[i][0], atol=ATOL)


def test_bad_input_results(compressed):
    root, s = compressed["root"], compressed["summary"]
    reasons = sorted(r["reason"] for r in s["rejects"])
    assert len(reasons) == 4
    assert reasons[0].startswith("document 'short' has 3 tokens, shorter than one window (W=8)")
    assert reasons[1].startswith("duplicate id 'two'") and reasons[2] == "empty field 'text'"
    assert reasons[3].startswith("invalid JSON")
    assert (s["documents"], s["num_shards"], s["committed_shards"], s["complete"]) == (5, 2, 2, True)
    assert s["tokens"] == sum(len(t.encode()) for k, t in compressed["texts"].items() if k != "short")
    store = LongTermStore.open(root / "store")
    meta = {d["doc_id"]: d for d in store.documents()}
    # the tail after the last whole window: real length recorded, no increment computed from padding
    assert (meta["padded8"]["n_tokens"], meta["padded8"]["n_windows"], meta["padded8"]["tail_tokens"]) == (59, 7, 3)
    assert (meta["one"]["n_windows"], meta["one"]["tail_tokens"]) == (1, 0)
    assert s["tail_tokens"] == 3 + 5 and s["windows"] == 5 + 7 + 2 + 1 + 11
    # a window index past the document's end is an error naming the valid range; its end is window n_windows
    with pytest.raises(StoreError, match=r"window 2 is outside document 'one'.*use 0\.\.0, or 1"):
        store.long_term(["one"], 2)
    assert store.long_term(["one"], 1).n_valid.tolist() == [1]
    with pytest.raises(StoreError, match="window -1"):
        store.long_term(["one"], -1)
    with pytest.raises(StoreError, match="'nope' is not in store"):
        store.long_term(["nope"], 0)
    with pytest.raises(StoreError, match="one integer or one per document"):
        store.long_term(["one", "two"], [0])
    # another checkpoint's fingerprint is refused
    with pytest.raises(FingerprintMismatch):
        LongTermStore.open(root / "store", expected_fingerprint="0" * 64)
    lumen_like = root / "not-longterm"
    lumen_like.mkdir()
    (lumen_like / "manifest.json").write_text(json.dumps({"kind": "lumen-memory"}))
    with pytest.raises(StoreError, match="not a MELODI long-term memory store"):
        LongTermStore.open(lumen_like)


def test_resume_skips_committed_and_refuses_other_checkpoint_or_inputs(compressed, tmp_path):
    root = compressed["root"]
    store_copy = tmp_path / "store"
    shutil.copytree(root / "store", store_copy)
    (store_copy / "commits" / "shard-00001.json").unlink()  # as if the job died before shard 1 committed
    again = run_compress([str(root / "docs.jsonl")], str(store_copy), str(root / "ckpt"), docs_per_shard=3,
                         docs_per_batch=2)
    assert again["committed_shards"] == 2 and again["complete"]
    a, b = LongTermStore.open(root / "store"), LongTermStore.open(store_copy)
    assert torch.equal(a.long_term(["long12"], 11).fifo, b.long_term(["long12"], 11).fifo)

    torch.manual_seed(7)
    other = MelodiLM(tiny_config()).eval()
    save_checkpoint(other, tmp_path / "other")
    with pytest.raises(FingerprintMismatch, match="use another --store"):
        run_compress([str(root / "docs.jsonl")], str(store_copy), str(tmp_path / "other"), docs_per_shard=3)
    shutil.copy(root / "docs.jsonl", tmp_path / "x.jsonl")
    with pytest.raises(StoreError, match="was started with inputs="):
        run_compress([str(tmp_path / "x.jsonl")], str(store_copy), str(root / "ckpt"), docs_per_shard=3,
                     docs_per_batch=2)
    # the same input file, changed since the store was started: the shard plan differs
    corpus = tmp_path / "docs.jsonl"
    lines = (root / "docs.jsonl").read_text().splitlines()
    corpus.write_text("\n".join(lines[:2]) + "\n")
    run_compress([str(corpus)], str(tmp_path / "grown"), str(root / "ckpt"), docs_per_shard=1)
    corpus.write_text("\n".join(lines[:4]) + "\n")  # line 3 is "short" (rejected), line 4 a new document
    with pytest.raises(Exception, match="started on other documents"):
        run_compress([str(corpus)], str(tmp_path / "grown"), str(root / "ckpt"), docs_per_shard=1)


def test_checkpoint_config_must_match_weights(compressed, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(compressed["root"] / "ckpt", ckpt)
    assert load_checkpoint(ckpt).fingerprint == compressed["fp"] == model_fingerprint(compressed["model"])
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["d_ff"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json does not match model.safetensors.*ff1"):
        load_checkpoint(ckpt)
    cfg["d_ff"], cfg["L"] = 64, 5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"memory\.mix"):
        load_checkpoint(ckpt)
    cfg["L"], cfg["bogus"] = 2, 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a MELODI config"):
        load_checkpoint(ckpt)


def test_no_end_state_store_and_plan(compressed, tmp_path):
    root = compressed["root"]
    s = run_compress([str(root / "docs.jsonl")], str(tmp_path / "lower"), str(root / "ckpt"), docs_per_shard=4,
                     docs_per_batch=4, end_state=False)
    assert s["num_shards"] == 2 and not s["end_state"]
    lower, full = LongTermStore.open(tmp_path / "lower"), LongTermStore.open(root / "store")
    assert torch.allclose(lower.long_term(["padded8"], 7).fifo, full.long_term(["padded8"], 7).fifo, atol=ATOL)
    with pytest.raises(StoreError, match="--no-end-state"):
        lower.end_state(["padded8"])
    assert plan_shards([(1, 2, "c"), (0, 9, "b"), (0, 1, "a")], 2) == [["a", "b"], ["c"]]


def test_cli_compress_and_errors(compressed, tmp_path):
    root = compressed["root"]
    runner = CliRunner()
    res = runner.invoke(main, ["compress", str(root / "docs.jsonl"), "--store", str(tmp_path / "s"), "--checkpoint",
                               str(root / "ckpt"), "--docs-per-shard", "6", "--no-end-state"])
    assert res.exit_code == 0, res.output
    assert "9 input records = 5 documents + 4 rejected" in res.output
    assert "5 documents, 216 tokens, 26 windows (8 tail tokens after the last whole windows" in res.output
    res = runner.invoke(main, ["info", str(tmp_path / "s")])
    assert res.exit_code == 0 and "26 windows (8 tail tokens" in res.output and "L=2 x d=32" in res.output
    res = runner.invoke(main, ["compress", str(root / "docs.jsonl"), "--store", str(tmp_path / "t"), "--checkpoint",
                               str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    torch.manual_seed(0)
    save_checkpoint(MelodiLM(tiny_config(use_long_term=False)), tmp_path / "no-lt")
    res = runner.invoke(main, ["compress", str(root / "docs.jsonl"), "--store", str(tmp_path / "u"), "--checkpoint",
                               str(tmp_path / "no-lt")])
    assert res.exit_code == 2 and "has no long-term memory" in res.output


def test_compress_documents_segment_lengths_agree():
    torch.manual_seed(2)
    model = MelodiLM(tiny_config()).eval()
    docs = [torch.randint(1, 257, (n,)) for n in (70, 9, 41, 24)]  # tails of 6, 1, 1, 0 tokens
    ref = {i: (x, z) for i, x, z in compress_documents(model, docs, docs_per_batch=4, segment_windows=1)}
    for seg in (3, 16):
        got = {i: (x, z) for i, x, z in compress_documents(model, docs, docs_per_batch=3, segment_windows=seg)}
        for i in ref:
            assert torch.allclose(ref[i][0], got[i][0], atol=ATOL) and torch.allclose(ref[i][1], got[i][1], atol=ATOL)


def test_compress_workers_stop_committing_when_the_lease_is_lost(compressed, tmp_path):
    from premem.pipeline.compress import CompressConfig, CompressShardFn
    from premem.pipeline.read import Document
    from premem.storage.lease import LeaseLost, StoreLease

    root = compressed["root"]
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    (store / "commits" / "shard-00001.json").unlink()  # shard 1 still to do
    shard_1 = [d for d in LongTermStore.open(root / "store").documents() if d["shard"] == 1]
    docs = [Document(str(root / "docs.jsonl"), 0, d["position"], d["doc_id"], d["title"],
                     compressed["texts"][d["doc_id"]]) for d in shard_1]
    with StoreLease(str(store), job="premem compress") as lease:
        pass  # the job's lease, released (or taken over) before the worker commits
    config = CompressConfig(checkpoint=str(root / "ckpt"), fingerprint=compressed["fp"], docs_per_shard=3,
                            docs_per_batch=2, lease_token=lease.token)
    worker = CompressShardFn(str(store), config)
    worker.setup()
    with pytest.raises(LeaseLost, match="released"):
        list(worker.process((1, docs)))
    assert not (store / "commits" / "shard-00001.json").exists()
