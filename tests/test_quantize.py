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
    codec = FaissCodec.train(factory, x)
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
    opq = fidelity(FaissCodec.train("OPQ2,PQ2x8", x), held)
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
