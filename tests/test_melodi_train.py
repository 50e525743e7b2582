"""MELODI training: the loss falls, resuming is exact, checkpoints, the byte tokenizer, `premem train-melodi`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from premem.jobs.cli import main
from premem.models import CheckpointError
from premem.models.melodi import MelodiConfig
from premem.models.melodi_ckpt import ByteTokenizer, load_checkpoint
from premem.models.melodi_train import IGNORE, BookStreams, TrainConfig, evaluate, lr_at, train

SENTENCES = [
    "the quick brown fox jumps over the lazy dog. ",
    "to be or not to be, that is the question. ",
    "all the world is a stage, and all the men and women merely players. ",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> MelodiConfig:
    base = dict(num_layers=2, d_model=32, num_heads=4, d_ff=64, W=16, S=4, Su=4, L=2, Q_max=4,
                long_term_layer=1, vocab_size=257, dropout=0.0)
    return MelodiConfig(**{**base, **kw})


def docs() -> list[torch.Tensor]:
    tok = ByteTokenizer()
    return [tok.encode_tensor(s * 12) for s in SENTENCES]


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("Hamlet, é!")
    assert min(ids) >= 1 and max(ids) <= 256 and len(ids) == len("Hamlet, é!".encode())
    assert tok.decode(ids + [0, 0]) == "Hamlet, é!"
    assert tok.encode_tensor("ab").tolist() == [98, 99]


def test_book_streams_rows_targets_and_resets():
    d = [torch.arange(1, 11), torch.arange(20, 45)]
    s = BookStreams(d, batch_size=2, seg_len=8, seed=0)
    x, y, reset = s.next_batch()
    assert reset.tolist() == [True, True]
    for r in range(2):
        valid = y[r] != IGNORE
        assert torch.equal(y[r][valid][:-1], x[r][1:int(valid.sum())])  # targets are the next token
    state = s.state_dict()
    x2, y2, r2 = s.next_batch()
    s.load_state_dict(state)
    x3, y3, r3 = s.next_batch()
    assert torch.equal(x2, x3) and torch.equal(y2, y3) and torch.equal(r2, r3)
    assert lr_at(0, TrainConfig(lr=1.0, warmup_steps=4, steps=10)) == 0.25
    assert lr_at(10, TrainConfig(lr=1.0, warmup_steps=4, steps=10, min_lr_ratio=0.1)) == pytest.approx(0.1)


def test_training_loss_falls_and_checkpoint_loads(tmp_path):
    d = docs()
    tc = TrainConfig(steps=30, batch_size=2, segment_windows=2, lr=1e-2, warmup_steps=5, eval_every=10,
                     eval_tokens_per_doc=256, checkpoint_every=30)
    torch.manual_seed(0)
    from premem.models.melodi import MelodiLM

    before = evaluate(MelodiLM(tiny()), d[2:], tokens_per_doc=256, segment_windows=2)
    res = train(tiny(), tc, d[:2], d[2:], tmp_path / "ck")
    heldout = [h["heldout_loss"] for h in res.history]
    train_losses = [h["train_loss"] for h in res.history]
    assert res.steps == 30 and len(res.history) == 3
    assert heldout[-1] < before["loss"] - 1.0  # nats per byte, from about 6 at init
    assert train_losses[-1] < train_losses[0] - 1.0
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.fingerprint == res.fingerprint
    again = evaluate(loaded.model, d[2:], tokens_per_doc=256, segment_windows=2)
    assert again["loss"] == pytest.approx(heldout[-1], abs=1e-5)
    meta = json.loads((tmp_path / "ck" / "trainer.json").read_text())
    assert meta["step"] == 30 and meta["fingerprint"] == res.fingerprint


def test_resume_is_exact(tmp_path):
    d = docs()
    kw = dict(batch_size=2, segment_windows=2, lr=5e-3, warmup_steps=2, eval_every=100, eval_tokens_per_doc=64)
    train(tiny(), TrainConfig(steps=6, checkpoint_every=6, **kw), d[:2], [], tmp_path / "one")
    train(tiny(), TrainConfig(steps=3, checkpoint_every=3, **kw), d[:2], [], tmp_path / "two")
    res = train(tiny(), TrainConfig(steps=6, checkpoint_every=3, **kw), d[:2], [], tmp_path / "two")
    assert res.steps == 6
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert a.fingerprint == b.fingerprint  # same weights, bit for bit
    with pytest.raises(CheckpointError, match=r"holds a model with L=2 \(asked 3\)"):
        train(tiny(L=3), TrainConfig(steps=8, **kw), d[:2], [], tmp_path / "two")


def test_cli_train_melodi(tmp_path):
    corpus = tmp_path / "plays.jsonl"
    with corpus.open("w") as f:
        for i, s in enumerate(SENTENCES):
            f.write(json.dumps({"id": f"p{i}", "text": s * 6}) + "\n")
        f.write(json.dumps({"id": "empty", "text": ""}) + "\n")
    runner = CliRunner()
    args = ["train-melodi", str(corpus), "--out", str(tmp_path / "ck"), "--config", "small", "--set", "num_layers=2",
            "--set", "d_model=32", "--set", "d_ff=64", "--set", "W=16", "--set", "long_term_layer=1",
            "--steps", "4", "--batch-size", "2", "--segment-windows", "2", "--eval-every", "2",
            "--eval-tokens", "64", "--heldout", "1", "--precision", "fp32"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "4 steps on 2 documents" in res.output and "1 rejected" in res.output
    assert "held-out (p2): loss" in res.output and "perplexity" in res.output
    assert load_checkpoint(tmp_path / "ck").model.config.W == 16
    res = runner.invoke(main, args[:4] + ["--config", "huge"])
    assert res.exit_code == 2 and "unknown MELODI setting" in res.output
    res = runner.invoke(main, args + ["--heldout", "3"])
    assert res.exit_code == 2 and "3 usable documents" in res.output


def test_adafactor_option_trains(tmp_path):
    d = docs()
    tc = TrainConfig(steps=3, batch_size=2, segment_windows=1, optimizer="adafactor", lr=1e-2, warmup_steps=1,
                     eval_every=3, eval_tokens_per_doc=64, checkpoint_every=3)
    res = train(tiny(), tc, d[:2], d[2:], tmp_path / "ada")
    assert res.steps == 3 and torch.isfinite(torch.tensor(res.history[-1]["heldout_loss"]))
    assert json.loads((tmp_path / "ada" / "trainer.json").read_text())["train"]["optimizer"] == "adafactor"
    with pytest.raises(ValueError, match="adamw or adafactor"):
        TrainConfig(optimizer="sgd").check()
