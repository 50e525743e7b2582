"""Compressed memory stores: the int8 and faiss codecs, their torch decode, quantized encode / resume / verify /
`premem quantize`, and the bad inputs refused before anything is written."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from premem.storage.errors import InputError
from premem.storage.quantize import FaissCodec, Int8Codec, QuantizeConfig, draw_sample, fidelity, sample_shards

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Anisotropic vectors (a few strong directions, like transformer states), so OPQ has something to rotate."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((d, d)).astype(np.float32) * (0.7 ** np.arange(d))[:, None].astype(np.float32)
    return (rng.standard_normal((n, d)).astype(np.float32) @ basis).astype(np.float32)


def _trained(factory: str, x: np.ndarray) -> FaissCodec:
    """faiss's own training, OPQ with 8 instead of 50 rotation rounds: the tests are about codes, not their quality."""
    index = faiss.index_factory(x.shape[1], factory)
    if isinstance(index, faiss.IndexPreTransform):
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = 8
        faiss.downcast_index(index.index).do_polysemous_training = False
    else:
        index.do_polysemous_training = False
    index.train(x)
    return FaissCodec(index, factory)


def test_int8_decode_within_half_a_step_per_value():
    x = _vectors(2000, 48)
    x[5] = 0  # a zero token (padding-like) has scale 0 and decodes to zeros
    codec = Int8Codec(48)
    codes, scales = codec.encode(x)
    assert codes.dtype == np.int8 and codes.shape == x.shape and scales.dtype == np.float16 and scales.shape == (2000,)
    y = codec.decode(torch.from_numpy(codes), torch.from_numpy(scales)).numpy()
    step = scales.astype(np.float32)[:, None]
    assert np.all(np.abs(y - x) <= step / 2 + 1e-6 * np.abs(x))
    assert np.all(y[5] == 0)
    assert np.abs(codes).max() == 127
    assert fidelity(codec, x[:1000] + 1)["cosine_min"] >= 0.999


@pytest.mark.parametrize("factory", ["PQ8x8", "OPQ8,PQ8x8", "OPQ4_16,PQ4x8"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_decode_equals_faiss_sa_decode(factory, device):
    x = _vectors(1200, 32)
    codec = FaissCodec.train(factory, x) if factory == "PQ8x8" else _trained(factory, x)
    codes, _ = codec.encode(x[:500])
    assert np.array_equal(codes, codec.index.sa_encode(x[:500]))
    ours = codec.decode(torch.from_numpy(codes).to(device)).cpu().numpy()
    np.testing.assert_allclose(ours, codec.index.sa_decode(codes), rtol=1e-5, atol=1e-5)
    # the codebook round-trips through its bytes: same codes, same decode
    again = FaissCodec.from_bytes(codec.to_bytes(), factory)
    assert np.array_equal(again.encode(x[:500])[0], codes)


def test_16_bit_codes_and_a_codec_the_gather_does_not_cover():
    x = _vectors(70000, 4, seed=1)
    index = faiss.index_factory(4, "PQ2x16")
    index.pq.cp.niter = 1  # one k-means pass: the test is about the code layout, not the codebook's quality
    index.do_polysemous_training = False
    index.train(x)
    codec = FaissCodec(index, "PQ2x16")
    codes, _ = codec.encode(x[:300])
    assert codes.shape == (300, 4)
    np.testing.assert_allclose(codec.decode(torch.from_numpy(codes)).numpy(), index.sa_decode(codes), atol=1e-6)
    sq = FaissCodec.train("SQ8", x[:2000])  # no gather plan: faiss decodes
    c, _ = sq.encode(x[:10])
    np.testing.assert_array_equal(sq.decode(torch.from_numpy(c)).numpy(), sq.index.sa_decode(c))


def test_opq_beats_plain_pq_at_the_same_bytes():
    """The default codec's choice, measured (the full-size figures: benchmarks/quantize.py)."""
    x, held = np.split(_vectors(2000, 16, seed=2), [1500])
    plain = fidelity(FaissCodec.train("PQ2x8", x), held)
    opq = fidelity(_trained("OPQ2,PQ2x8", x), held)
    assert opq["relative_mse"] < plain["relative_mse"], (plain, opq)


@pytest.mark.parametrize("request_, message", [
    (QuantizeConfig("pq", pq_bytes=5), "--pq-bytes 5 does not divide d=32"),
    (QuantizeConfig("pq", pq_bytes=64), "--pq-bytes 64 must be in 1..32"),
    (QuantizeConfig("pq", pq_bytes=0), "--pq-bytes 0 must be in 1..32"),
    (QuantizeConfig("pq", factory="Nope12"), "not a faiss index_factory string"),
    (QuantizeConfig("pq", pq_bytes=8, factory="PQ4x8"), "makes 4 bytes per token, --pq-bytes says 8"),
    (QuantizeConfig("int8", pq_bytes=8), "go with --quantize pq"),
])
def test_bad_requests_are_one_line(request_, message):
    with pytest.raises(InputError) as e:
        request_.resolve(32)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_too_few_vectors_to_train_is_one_line():
    with pytest.raises(InputError, match=r"^200 memory vectors are too few to train the PQ4x8 codebook") as e:
        FaissCodec.train("PQ4x8", _vectors(200, 32))
    assert "\n" not in str(e.value)


def test_sample_is_seeded_and_held_out_tokens_are_not_trained_on():
    spec = QuantizeConfig("pq").resolve(32) | {"train_tokens": 300, "heldout_tokens": 50}
    tokens = {s: 100 for s in range(10)}
    assert sample_shards(tokens, spec) == sample_shards(tokens, spec)
    assert len(sample_shards(tokens, spec)) == 4
    assert sample_shards(tokens, spec) != sample_shards(tokens, spec | {"seed": 1})
    x = np.arange(400, dtype=np.float32)[:, None].repeat(2, 1)
    train, held = draw_sample(x, spec)
    assert len(train) == 300 and len(held) == 40  # held-out: at most a tenth of a small sample
    assert not set(train[:, 0].tolist()) & set(held[:, 0].tolist())


# --------------------------------------------------------------------------------------------
# quantized stores: `premem encode --quantize`, the reader, verify, resume, `premem quantize`

PQ_ARGS = ("--quantize", "pq", "--pq-factory", "PQ8x8", "--codebook-tokens", "1500")  # small: the test corpus is
MEAN = ("--retriever", "memory-mean")  # retrieval vectors of the memory as stored (decoded)


def _cli(*args):
    from click.testing import CliRunner

    from premem.jobs.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The small Shakespeare shards encoded three ways: bf16, pq (PQ8x8) and int8."""
    from resilience_data import encode_args, make_shards, write_small_corpus

    work = tmp_path_factory.mktemp("quantize")
    shards = make_shards(work / "shards", write_small_corpus(work / "plays.jsonl", words=900), shard_size=4)
    out = {"shards": shards}
    for name, extra in (("raw", MEAN), ("pq", PQ_ARGS + MEAN), ("int8", ("--quantize", "int8"))):
        result = _cli(*encode_args(shards, work / name, *extra))
        assert result.exit_code == 0, result.output
        out[name] = work / name
    return out


def _real(store, rows):
    from premem.storage.tensors import to_numpy

    batch = store.read(rows)
    real = batch.mask.numpy()
    return to_numpy(batch.states).astype(np.float32)[real], batch, real


def test_pq_store_holds_faiss_codes_of_the_stored_states_and_decodes_them(stores):
    from premem.storage import MemoryStore

    raw, pq = MemoryStore.open(stores["raw"]), MemoryStore.open(stores["pq"])
    rows = np.arange(raw.rows)
    x, _, real = _real(raw, rows)
    codes = pq.read(rows, decode=False)
    assert codes.states is None and codes.codes.dtype == torch.uint8 and codes.codes.shape[-1] == 8
    assert np.array_equal(codes.codes.numpy()[real], pq.codec.index.sa_encode(x))  # faiss's encoding, bit for bit
    assert not codes.codes.numpy()[~real].any()  # zero codes past each length
    batch = pq.read(rows)
    assert batch.states.dtype == torch.bfloat16 and not batch.states[~batch.mask].any()
    ref = pq.codec.index.sa_decode(codes.codes.numpy()[real])
    np.testing.assert_allclose(batch.states.float().numpy()[real], ref, rtol=2 ** -7, atol=1e-6)
    summary = pq.summary()
    assert summary["logical_bytes_per_token"] == 8 and summary["bytes_per_token"] <= 1.25 * 8  # short passages: padding
    assert pq.fingerprint != raw.fingerprint and pq.encoder_fingerprint == raw.fingerprint


def test_int8_store_within_the_int8_bound(stores):
    from premem.storage import MemoryStore

    raw, q = MemoryStore.open(stores["raw"]), MemoryStore.open(stores["int8"])
    rows = np.arange(raw.rows)
    x, _, real = _real(raw, rows)
    coded = q.read(rows, decode=False)
    scales = coded.scales.float().numpy()[real][:, None]
    y = q.read(rows).states.float().numpy()[real]
    assert np.all(np.abs(y - x) <= scales / 2 + 2 ** -8 * np.abs(y) + 1e-6)  # + the bf16 rounding of the decode
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cos.min() >= 0.998
    assert q.summary()["logical_bytes_per_token"] == 384 + 2


def test_reader_with_the_unquantized_fingerprint_refuses_unless_the_codec_is_accepted(stores):
    from premem.storage import MemoryStore
    from premem.storage.errors import FingerprintMismatch

    fp = MemoryStore.open(stores["raw"]).fingerprint
    with pytest.raises(FingerprintMismatch, match="pq-quantized memory .* accept the codec") as e:
        MemoryStore.open(stores["pq"], expected_fingerprint=fp)
    assert "\n" not in str(e.value)
    with pytest.raises(FingerprintMismatch):
        MemoryStore.open(stores["pq"], expected_fingerprint=fp, accept_codec="int8")
    assert MemoryStore.open(stores["pq"], expected_fingerprint=fp, accept_codec="pq").quantize["codec"] == "pq"
    pq_fp = MemoryStore.open(stores["pq"]).fingerprint
    assert MemoryStore.open(stores["pq"], expected_fingerprint=pq_fp).fingerprint == pq_fp
    with pytest.raises(FingerprintMismatch):
        MemoryStore.open(stores["raw"], expected_fingerprint=pq_fp)


def test_info_shows_codec_bytes_and_fidelity(stores):
    result = _cli("info", stores["pq"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("codec:"))
    assert "pq (PQ8x8), 8 B/token" in line and "cosine median 0." in line and "relative MSE" in line


def _flip(path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_verify_catches_a_flipped_byte_in_codes_and_in_the_codebook(stores, tmp_path):
    import shutil

    from premem.storage import MemoryStore
    from premem.storage.errors import StoreError
    from premem.storage.verify import verify_store

    store = tmp_path / "pq"
    shutil.copytree(stores["pq"], store)
    assert verify_store(store).ok
    _flip(store / "codes" / "c" / "1" / "0" / "0")
    report = verify_store(store)
    assert report.bad_shards == [1] and {p.kind for p in report.problems} == {"checksum"}, report.problems
    shutil.copytree(stores["pq"] / "codes", store / "codes", dirs_exist_ok=True)
    _flip(store / "codebook.faiss", at=200)
    report = verify_store(store)
    assert [p.kind for p in report.problems] == ["codebook"] and "damaged" in report.problems[0].what
    with pytest.raises(StoreError, match="codebook codebook.faiss is damaged") as e:
        MemoryStore.open(store).read([0])
    assert "\n" not in str(e.value)

    # `encode --repair` redoes the bad shard with the stored codebook: the store ends as it was
    from resilience_data import encode_args, fault_inject_module

    shutil.copy(stores["pq"] / "codebook.faiss", store / "codebook.faiss")
    _flip(store / "codes" / "c" / "2" / "0" / "0")
    result = _cli(*encode_args(stores["shards"], store, *PQ_ARGS, *MEAN, "--repair"))
    assert result.exit_code == 0 and "repair: 1 bad shards redone ([2])" in result.output, result.output
    assert fault_inject_module().compare_stores(stores["pq"], store) == [] and verify_store(store).ok


def test_sigkill_mid_quantized_encode_then_resume_gives_identical_codes(stores, tmp_path):
    import os
    import random
    import signal
    import time

    from resilience_data import encode_args, fault_inject_module, start_premem

    fault = fault_inject_module()
    store = tmp_path / "store"
    rng = random.Random(12)
    kills = 0
    for attempt in range(4):  # first while the codebook trains, then at random moments of the shards' encode
        proc = start_premem(*encode_args(stores["shards"], store, *PQ_ARGS, *MEAN), log=tmp_path / f"run{attempt}.log")
        if attempt == 0:
            delay = rng.uniform(2.0, 5.0)
        else:
            while not (store / "commits").exists() and proc.is_alive():
                time.sleep(0.01)
            delay = rng.uniform(0.0, 3.0)
        proc.join(timeout=delay)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join()
    assert kills >= 3
    result = _cli(*encode_args(stores["shards"], store, *PQ_ARGS, *MEAN))
    assert result.exit_code == 0, result.output
    assert fault.compare_stores(stores["pq"], store) == []  # codes, lengths, memory-mean vectors, metadata, markers
    assert (store / "codebook.faiss").read_bytes() == (stores["pq"] / "codebook.faiss").read_bytes()


def test_premem_quantize_equals_encode_quantize(stores, tmp_path):
    import json

    from resilience_data import fault_inject_module

    fault = fault_inject_module()
    out = tmp_path / "pq"
    result = _cli("quantize", stores["raw"], "--out", out, *PQ_ARGS, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "5 quantized" in result.output and "codec:    pq (PQ8x8)" in result.output
    assert (out / "codebook.faiss").read_bytes() == (stores["pq"] / "codebook.faiss").read_bytes()
    assert fault.compare_stores(stores["pq"], out) == []  # incl. memory-mean vectors: in-pass = of the decoded memory
    a, b = (json.loads((p / "manifest.json").read_text())["quantize"] for p in (stores["pq"], out))
    assert a["fingerprint"] == b["fingerprint"] and a["fidelity"] == b["fidelity"]
    again = _cli("quantize", stores["raw"], "--out", out, *PQ_ARGS, "--no-progress")  # resumes: nothing left to do
    assert again.exit_code == 0 and "5 already done, skipped; 0 quantized" in again.output, again.output


@pytest.mark.parametrize("extra, message", [
    (("--quantize", "pq", "--pq-bytes", "5"), "--pq-bytes 5 does not divide d=384"),
    (("--quantize", "pq", "--pq-bytes", "768"), "--pq-bytes 768 must be in 1..384"),
    (("--quantize", "pq", "--pq-factory", "PQ8x16", "--codebook-tokens", "100000"),
     "memory vectors are too few to train the PQ8x16 codebook"),
])
def test_bad_quantize_requests_are_one_line_and_write_nothing(stores, tmp_path, extra, message):
    from resilience_data import encode_args

    store = tmp_path / "store"
    result = _cli(*encode_args(stores["shards"], store, *extra))
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not store.exists()


def test_missing_or_damaged_codebook_and_requantizing_are_refused_in_one_line(stores, tmp_path):
    import shutil

    from resilience_data import encode_args

    store = tmp_path / "pq"
    shutil.copytree(stores["pq"], store)
    before = sorted(p.name for p in store.rglob("*"))
    (store / "codebook.faiss").unlink()
    result = _cli(*encode_args(stores["shards"], store, *PQ_ARGS))
    assert result.exit_code != 0 and "codebook codebook.faiss is missing" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    shutil.copy(stores["pq"] / "codebook.faiss", store / "codebook.faiss")
    _flip(store / "codebook.faiss", at=300)
    result = _cli("verify", store)
    assert result.exit_code != 0 and "[codebook]" in result.output
    result = _cli(*encode_args(stores["shards"], store, *PQ_ARGS))
    assert result.exit_code != 0 and "is damaged" in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in store.rglob("*")) == before  # nothing written (no lease either)

    out = tmp_path / "again"
    result = _cli("quantize", stores["pq"], "--out", out, "--quantize", "int8", "--no-progress")
    assert result.exit_code != 0 and "is already quantized (pq, PQ8x8)" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
