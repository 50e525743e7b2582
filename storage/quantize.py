"""Compressed memory: int8 codes with one absmax scale per token, or faiss product-quantized codes (MEMORY-VQ).

A quantized store holds codes instead of states (layout.CODES, plus layout.SCALES for int8) and, for a faiss
codec, the trained codec itself (layout.CODEBOOK, its sha256 in the manifest and in the store's fingerprint).
Training and encoding are faiss's (``index_factory`` + ``train`` / ``sa_encode``); decoding is a gather from the
PQ centroids (plus the OPQ rotation) in torch, so it runs on the reader's device and only codes cross the disk,
the bus and the page cache.  The torch decode equals faiss's ``sa_decode`` (tests/test_quantize.py).

The codebook is trained on a seeded sample of the corpus's memory vectors, taken the same way from shards being
encoded (``premem encode --quantize``) and from a stored store (``premem quantize``): the shards in a seeded
order until the sample is full, their real tokens in row order, then a seeded draw of held-out and training
tokens.  So both routes train on the same vectors and write the same codes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from premem.storage.errors import InputError, StoreError, one_line

NONE, INT8, PQ = "none", "int8", "pq"
QUANTIZE = (NONE, INT8, PQ)


def default_factory(pq_bytes: int) -> str:
    """OPQ + 8-bit PQ: at 16x on MiniLM states the rotation lifts cosine median from 0.91 to 0.96 (issue 12), and
    8-bit codes train on a sample of ~10^5 tokens where 16-bit ones need 65536 centroids x 39 points each."""
    return f"OPQ{pq_bytes},PQ{pq_bytes}x8"


@dataclass(frozen=True)
class QuantizeConfig:
    """What `--quantize` asks for; ``resolve(d)`` checks it against the model width and gives the manifest spec."""

    codec: str = NONE
    pq_bytes: int | None = None  # bytes per token; default d/8 (16x against bf16)
    factory: str | None = None  # a faiss index_factory string; default default_factory(pq_bytes)
    seed: int = 0
    train_tokens: int = 65536
    heldout_tokens: int = 8192

    @property
    def enabled(self) -> bool:
        return self.codec != NONE

    def resolve(self, d: int) -> dict:
        if self.codec not in QUANTIZE:
            raise InputError(f"--quantize {self.codec!r} is not one of {', '.join(QUANTIZE)}")
        if self.codec == INT8:
            if self.pq_bytes is not None or self.factory is not None:
                raise InputError("--pq-bytes and --pq-factory go with --quantize pq, not int8")
            return {"codec": INT8, "factory": None, "code_dtype": "int8", "code_width": d, "bytes_per_token": d + 2,
                    "seed": self.seed, "train_tokens": 0, "heldout_tokens": self.heldout_tokens}
        if self.train_tokens < 1 or self.heldout_tokens < 1:
            raise InputError("the codebook sample needs train_tokens and heldout_tokens >= 1")
        pq_bytes = d // 8 if self.pq_bytes is None else int(self.pq_bytes)
        if self.factory is None:
            if not 1 <= pq_bytes <= d:
                raise InputError(f"--pq-bytes {pq_bytes} must be in 1..{d} (the model width d={d}): "
                                 f"d/8 = {max(1, d // 8)} is 16x smaller than bf16")
            if d % pq_bytes:
                raise InputError(f"--pq-bytes {pq_bytes} does not divide d={d}: pick a divisor of {d}, "
                                 f"e.g. {_divisor_near(d, pq_bytes)}")
        factory = self.factory or default_factory(pq_bytes)
        index = _make_index(d, factory)
        width = int(index.sa_code_size())
        if self.pq_bytes is not None and self.factory is not None and width != pq_bytes:
            raise InputError(f"--pq-factory {factory!r} makes {width} bytes per token, --pq-bytes says {pq_bytes}: "
                             f"drop one of them")
        return {"codec": PQ, "factory": factory, "code_dtype": "uint8", "code_width": width, "bytes_per_token": width,
                "seed": self.seed, "train_tokens": self.train_tokens, "heldout_tokens": self.heldout_tokens}


def _divisor_near(d: int, n: int) -> int:
    return min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: (abs(k - n), k))


def _make_index(d: int, factory: str):
    import faiss

    try:
        index = faiss.index_factory(d, factory)
    except Exception as e:
        raise InputError(f"--pq-factory {factory!r} is not a faiss index_factory string for d={d} "
                         f"({one_line(e)}): e.g. {default_factory(max(1, d // 8))}") from e
    if index.sa_code_size() <= 0:
        raise InputError(f"--pq-factory {factory!r} is not a standalone faiss codec (no sa_encode): use e.g. "
                         f"{default_factory(max(1, d // 8))}, PQ{max(1, d // 8)}x8 or SQ8")
    for part in _parts(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False  # only reorders the codes, and takes minutes
    return index


def _parts(index) -> list:
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        return [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())] + \
            [faiss.downcast_index(index.index)]
    return [index]


# --------------------------------------------------------------------------------------------
# codecs


class Int8Codec:
    """int8 codes [..., d] and a float16 scale per token (absmax / 127): error per value <= scale / 2."""

    name = INT8
    has_scales = True

    def __init__(self, d: int) -> None:
        self.d = d
        self.code_width = d
        self.factory = None

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        scales = (np.abs(x).max(axis=-1) / 127).astype(np.float16)
        s = scales.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.rint(x / s), 0)
        return np.clip(q, -127, 127).astype(np.int8), scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (codes.to(torch.float32) * scales.to(torch.float32)[..., None]).to(dtype)


class FaissCodec:
    """A trained faiss codec: ``encode`` is faiss's ``sa_encode``; ``decode`` gathers in torch (PQ / OPQ+PQ) on the
    codes' device, or falls back to faiss's ``sa_decode`` on the CPU for other faiss codecs."""

    name = PQ
    has_scales = False

    def __init__(self, index, factory: str) -> None:
        self.index = index
        self.factory = factory
        self.d = int(index.d)
        self.code_width = int(index.sa_code_size())
        self._tables: dict[str, tuple] = {}
        self._gather = _gather_plan(index)

    @classmethod
    def train(cls, factory: str, x: np.ndarray) -> FaissCodec:
        x = np.ascontiguousarray(x, dtype=np.float32)
        index = _make_index(x.shape[1], factory)
        need = min_train_vectors(index)
        if len(x) < need:
            raise InputError(f"{len(x)} memory vectors are too few to train the {factory} codebook (it needs at least "
                             f"{need}): use a larger corpus, fewer bits per code or --quantize int8")
        try:
            index.train(x)
        except Exception as e:
            raise InputError(f"training the {factory} codebook on {len(x)} vectors failed ({one_line(e)}): use a "
                             f"larger corpus or --quantize int8") from e
        return cls(index, factory)

    @classmethod
    def from_bytes(cls, data: bytes, factory: str) -> FaissCodec:
        import faiss

        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy()), factory)

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, None]:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.d)
        return self.index.sa_encode(x), None

    def faiss_decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, self.code_width))

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The PQ centroids [M, ksub, dsub] and the OPQ rotation [d_out, d_in] (None without one), on ``device``."""
        key = str(device)
        if key not in self._tables:
            centroids, rotation = self._gather[1:]
            self._tables[key] = (torch.from_numpy(centroids).to(device),
                                 None if rotation is None else torch.from_numpy(rotation).to(device))
        return self._tables[key]

    def decode(self, codes: torch.Tensor, scales=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = codes.shape[:-1]
        flat = codes.reshape(-1, self.code_width)
        if self._gather is None:  # a faiss codec the gather does not cover: faiss decodes on the CPU
            x = torch.from_numpy(self.faiss_decode(flat.cpu().numpy())).to(codes.device)
            return x.reshape(*shape, self.d).to(dtype)
        nbits = self._gather[0]
        centroids, rotation = self.tables(codes.device)
        m = centroids.shape[0]
        if nbits == 8:
            idx = flat.to(torch.int64)
        else:  # 16-bit codes: little-endian uint16 per subquantizer
            b = flat.to(torch.int64).reshape(-1, m, 2)
            idx = b[..., 0] | (b[..., 1] << 8)
        y = centroids[torch.arange(m, device=codes.device)[None, :], idx]  # [n, M, dsub]
        y = y.reshape(len(flat), -1)
        if rotation is not None:  # OPQ: y = A x with A orthonormal rows, so x = A^T y
            y = y @ rotation
        return y.reshape(*shape, self.d).to(dtype)


def _gather_plan(index):
    """(nbits, centroids, rotation) when the torch gather decodes ``index`` exactly, else None."""
    import faiss

    parts = _parts(index)
    pq_index = parts[-1]
    if not isinstance(pq_index, faiss.IndexPQ) or pq_index.pq.nbits not in (8, 16):
        return None
    transforms = parts[:-1]
    rotation = None
    if transforms:
        if len(transforms) != 1 or not isinstance(transforms[0], faiss.LinearTransform):
            return None
        vt = transforms[0]
        bias = faiss.vector_to_array(vt.b)
        if not vt.is_orthonormal or (bias.size and np.any(bias != 0)):
            return None
        rotation = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in).astype(np.float32)
    pq = pq_index.pq
    centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub).astype(np.float32)
    return int(pq.nbits), centroids, rotation


def min_train_vectors(index) -> int:
    """k-means needs at least one vector per centroid."""
    import faiss

    pq_index = _parts(index)[-1]
    if isinstance(pq_index, faiss.IndexPQ):
        return 1 << int(pq_index.pq.nbits)
    return 1


def load_codec(spec: dict, codebook: bytes | None):
    """The codec a store's manifest ``quantize`` spec names (with its codebook bytes for a faiss codec)."""
    if spec["codec"] == INT8:
        return Int8Codec(int(spec["code_width"]))
    if codebook is None:
        raise StoreError("a pq store needs its codebook")
    return FaissCodec.from_bytes(codebook, spec["factory"])


def codebook_digest(data: bytes) -> dict:
    import crc32c

    return {"bytes": len(data), "crc32c": crc32c.crc32c(data), "sha256": hashlib.sha256(data).hexdigest()}


def memory_fingerprint(encoder_fingerprint: str, spec: dict, codebook_sha256: str | None) -> str:
    """The fingerprint of quantized memory: the encoder's, the codec and its codebook (the memory is not the same)."""
    text = f"{encoder_fingerprint}|{spec['codec']}|{spec.get('factory')}|{codebook_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# sampling and fidelity


def sample_shards(shard_tokens: dict[int, int], spec: dict) -> list[int]:
    """Shards in a seeded order, as many as the sample (train + held-out tokens) needs."""
    want = int(spec["train_tokens"]) + int(spec["heldout_tokens"])
    order = sorted(shard_tokens)
    order = [order[i] for i in np.random.default_rng(int(spec["seed"])).permutation(len(order))]
    chosen, have = [], 0
    for s in order:
        if have >= want:
            break
        chosen.append(s)
        have += int(shard_tokens[s])
    return chosen


def draw_sample(vectors: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(training vectors, held-out vectors): a seeded draw from the sample shards' real tokens."""
    n = len(vectors)
    heldout = min(int(spec["heldout_tokens"]), max(1, n // 10))
    perm = np.random.default_rng(int(spec["seed"]) + 1).permutation(n)
    train = perm[heldout:heldout + int(spec["train_tokens"])]
    return vectors[np.sort(train)], vectors[np.sort(perm[:heldout])]


def fidelity(codec, x: np.ndarray) -> dict:
    """Reconstruction quality on held-out vectors: relative MSE and the cosine's median, p1 and min."""
    x = np.asarray(x, dtype=np.float32)
    codes, scales = codec.encode(x)
    y = codec.decode(torch.from_numpy(codes), None if scales is None else torch.from_numpy(scales)).numpy()
    err = float(((x - y) ** 2).sum() / max(float((x ** 2).sum()), 1e-30))
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
    return {"tokens": int(len(x)), "relative_mse": round(err, 6), "cosine_median": round(float(np.median(cos)), 5),
            "cosine_p1": round(float(np.percentile(cos, 1)), 5), "cosine_min": round(float(cos.min()), 5)}


def train_codec(spec: dict, vectors: np.ndarray) -> tuple[object, dict]:
    """The store's codec trained on the sample ``vectors`` (float32 [n, d]), and its fidelity on held-out ones."""
    train, heldout = draw_sample(vectors, spec)
    codec = Int8Codec(vectors.shape[1]) if spec["codec"] == INT8 else FaissCodec.train(spec["factory"], train)
    return codec, fidelity(codec, heldout)
