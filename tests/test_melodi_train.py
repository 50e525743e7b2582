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
    assert "held-out (p2), whole documents: loss" in res.output and "windows 0: " in res.output
    assert load_checkpoint(tmp_path / "ck").model.config.W == 16
    res = runner.invoke(main, args[:4] + ["--config", "huge"])
    assert res.exit_code == 2 and "unknown MELODI setting" in res.output
    res = runner.invoke(main, args + ["--heldout", "3"])
    assert res.exit_code == 2 and "3 usable documents" in res.output


def test_adafactor_option_trains(tmp_path):  # the paper's Adafactor trains
    d = docs()
    tc = TrainConfig(steps=3, batch_size=2, segment_windows=1, optimizer="adafactor", lr=1e-2, warmup_steps=1,
                     eval_every=3, eval_tokens_per_doc=64, checkpoint_every=3)
    res = train(tiny(), tc, d[:2], d[2:], tmp_path / "ada")
    assert res.steps == 3 and torch.isfinite(torch.tensor(res.history[-1]["heldout_loss"]))
    assert json.loads((tmp_path / "ada" / "trainer.json").read_text())["train"]["optimizer"] == "adafactor"
    with pytest.raises(ValueError, match="adamw or adafactor"):
        TrainConfig(optimizer="sgd").check()


def test_whole_document_eval_by_window_position():
    """Whole documents from a fresh state; the loss splits into window-position buckets that add up."""
    torch.manual_seed(0)
    from premem.models.melodi import MelodiLM
    from premem.models.melodi_train import WINDOW_BUCKETS, bucket_name

    m = MelodiLM(tiny(W=4, Q_max=2))
    d = [torch.randint(1, 257, (n,), generator=torch.Generator().manual_seed(n)) for n in (300, 41, 9)]
    ev = evaluate(m, d, segment_windows=3, batch_size=2)
    assert ev["tokens"] == 299 + 40 + 8 and ev["documents"] == 3
    # predicting positions 0..298 of the longest: windows 0..74 -> buckets 0, 1-3, 4-15, 16-63, 64+
    assert [bucket_name(*b) for b in WINDOW_BUCKETS] == list(ev["buckets"]) == ["0", "1-3", "4-15", "16-63", "64+"]
    assert ev["buckets"]["0"]["tokens"] == 3 * 4 and ev["buckets"]["64+"]["tokens"] == 299 - 64 * 4
    assert sum(b["tokens"] for b in ev["buckets"].values()) == ev["tokens"]
    total = sum(b["loss"] * b["tokens"] for b in ev["buckets"].values()) / ev["tokens"]
    assert total == pytest.approx(ev["loss"], rel=1e-9)
    # batching and segment length do not change the scores; a cap scores the first tokens only
    again = evaluate(m, d, segment_windows=5, batch_size=1)
    assert again["loss"] == pytest.approx(ev["loss"], abs=1e-5)
    assert evaluate(m, d, segment_windows=3, tokens_per_doc=16)["tokens"] == 16 + 16 + 8


def test_device_option_and_placement(monkeypatch, tmp_path):
    """--device: the model, the state and the batches are where asked (CPU here; CUDA too when there is one);
    a GPU asked for where there is none is one line."""
    from premem.models.melodi import MelodiLM
    from premem.models.melodi_train import resolve_device
    from premem.storage.errors import InputError

    seen = []
    forward = MelodiLM.forward

    def spy(self, tokens, state=None, **kw):
        seen.append((tokens.device, next(self.parameters()).device, None if state is None else state.z.device))
        return forward(self, tokens, state, **kw)

    monkeypatch.setattr(MelodiLM, "forward", spy)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        seen.clear()
        tc = TrainConfig(steps=2, batch_size=2, segment_windows=1, eval_every=2, checkpoint_every=2, device=dev,
                         eval_tokens_per_doc=32)
        train(tiny(), tc, docs()[:2], docs()[2:], tmp_path / dev)
        assert seen and all(t.type == p.type == dev and (s is None or s.type == dev) for t, p, s in seen)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for bad, msg in (("cuda", "no CUDA GPU is visible here: use --device cpu"), ("tpu", "use auto, cpu, cuda or cuda:N")):
        with pytest.raises(InputError, match=msg) as e:
            resolve_device(bad)
        assert "\n" not in str(e.value)


def test_paper_adafactor_has_momentum(tmp_path):
    from premem.models.melodi import MelodiLM
    from premem.models.melodi_train import PAPER_OPTIMIZER, _optimizer

    opt = _optimizer(MelodiLM(tiny()), TrainConfig(**PAPER_OPTIMIZER))
    g = opt.param_groups[0]
    assert type(opt).__name__ == "Adafactor" and g["beta1"] == 0.9 and g["decay_rate"] == -0.8 and g["lr"] == 0.01
    assert not g["relative_step"] and g["scale_parameter"]
    tc = TrainConfig(**PAPER_OPTIMIZER, steps=2000)
    assert lr_at(999, tc) == pytest.approx(0.01) and lr_at(2000, tc) == pytest.approx(0.001)


def test_ddp_two_cpu_processes_follow_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo), each on half the rows of the same global batch: the same loss
    curve, held-out loss and weights as one process."""
    import os
    import subprocess
    import sys

    corpus = tmp_path / "docs.jsonl"
    with corpus.open("w") as f:
        for i, s in enumerate(SENTENCES + SENTENCES[:2]):
            f.write(json.dumps({"id": f"d{i}", "text": s * (4 + i)}) + "\n")
    common = ["train-melodi", str(corpus), "--config", "small", "--set", "num_layers=2", "--set", "d_model=32",
              "--set", "d_ff=64", "--set", "W=16", "--set", "S=4", "--set", "Su=4", "--set", "L=2",
              "--set", "long_term_layer=1", "--steps", "4", "--batch-size", "4", "--segment-windows", "2",
              "--eval-every", "1", "--eval-tokens", "64", "--heldout", "1", "--precision", "fp32", "--device", "cpu",
              "--lr", "1e-2", "--warmup-steps", "1"]
    res = CliRunner().invoke(main, common + ["--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "premem.jobs.cli", *common, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "trainer.json").read_text())
    two = json.loads((tmp_path / "two" / "trainer.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    curve = [h[k] for h in one["history"] for k in ("train_loss", "heldout_loss")]
    assert len(curve) == 8 and curve[-2] < curve[0] - 1.0
    assert [h[k] for h in two["history"] for k in ("train_loss", "heldout_loss")] == pytest.approx(curve, rel=1e-5)
    a, b = load_checkpoint(tmp_path / "one").model, load_checkpoint(tmp_path / "two").model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_hf_tokenizer_recorded_in_checkpoint_and_fingerprint(tmp_path):
    """A Hugging Face tokenizer directory: saved into the checkpoint and hashed into the fingerprint; resuming with
    another tokenizer, or a vocabulary too small for it, is one line."""
    from checkpoints import make_t5_tokenizer

    from premem.jobs.melodi_run import run_train_melodi
    from premem.models.melodi_ckpt import HFTokenizer, model_fingerprint

    make_t5_tokenizer().save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "d.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": s * 8}) + "\n" for i, s in enumerate(SENTENCES)))
    tok = HFTokenizer(tmp_path / "tok")
    tc = TrainConfig(steps=2, batch_size=2, segment_windows=1, eval_every=2, checkpoint_every=2, eval_tokens_per_doc=32)
    res = run_train_melodi([str(corpus)], str(tmp_path / "ck"), tiny(vocab_size=300), tc, heldout=1,
                           tokenizer=str(tmp_path / "tok"))
    loaded = load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded.tokenizer, HFTokenizer) and loaded.tokenizer.encode("the fox") == tok.encode("the fox")
    assert json.loads((tmp_path / "ck" / "tokenizer.json").read_text())["kind"] == "hf"
    assert loaded.fingerprint == res["fingerprint"] != model_fingerprint(loaded.model)  # bytes would hash otherwise
    with pytest.raises(CheckpointError, match="was trained with tokenizer .*use another --out") as e:
        run_train_melodi([str(corpus)], str(tmp_path / "ck"), tiny(vocab_size=300),
                         TrainConfig(steps=3, batch_size=2, segment_windows=1), heldout=1)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=rf"has {tok.vocab_size} ids but the model's vocab_size is 100"):
        run_train_melodi([str(corpus)], str(tmp_path / "ck2"), tiny(vocab_size=100), tc, heldout=1,
                         tokenizer=str(tmp_path / "tok"))
    info = json.loads((tmp_path / "ck" / "tokenizer.json").read_text())
    (tmp_path / "ck" / "tokenizer.json").write_text(json.dumps({**info, "vocab_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="do not match tokenizer.json"):
        load_checkpoint(tmp_path / "ck")


def test_cli_eval_melodi_and_bad_input(tmp_path, monkeypatch):
    from premem.models.melodi import MelodiLM
    from premem.models.melodi_ckpt import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(MelodiLM(tiny()), tmp_path / "ck")
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                            for i, t in enumerate([SENTENCES[0] * 30, SENTENCES[1] * 2, "too short"])))
    runner = CliRunner()
    res = runner.invoke(main, ["eval-melodi", str(tmp_path / "ck"), str(docs), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "2 documents, " in res.output and "1 shorter than one window of W=16 set aside" in res.output
    assert "| 0 | 32 |" in res.output and "| 64+ | " in res.output  # the 1380-byte document reaches window 86
    (tmp_path / "short.jsonl").write_text(json.dumps({"id": "s", "text": "too short"}) + "\n")
    res = runner.invoke(main, ["eval-melodi", str(tmp_path / "ck"), str(tmp_path / "short.jsonl")])
    assert res.exit_code == 2 and "none of the 1 documents" in res.output and "has one window of W=16" in res.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["eval-melodi", str(tmp_path / "ck"), str(docs)], ["train-melodi", str(docs), "--out", str(tmp_path / "x")],
                ["compress", str(docs), "--store", str(tmp_path / "s"), "--checkpoint", str(tmp_path / "ck")]):
        res = runner.invoke(main, [*cmd, "--device", "cuda"])
        assert res.exit_code == 2 and "--device cuda: no CUDA GPU is visible here" in res.output, cmd
        assert len([line for line in res.output.splitlines() if line.strip()]) == 1
