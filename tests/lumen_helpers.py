"""Helpers shared by the LUMEN and reader tests: full random T5 checkpoints and small stores written directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from checkpoints import english_sentences, make_t5_tokenizer
from transformers import T5Config, T5ForConditionalGeneration

from premem.models import MemoryEncoder
from premem.storage import MemoryStore


def make_full_t5_checkpoint(directory: Path, variant: str = "v1.1", layers: int = 4, seed: int = 0) -> Path:
    """A random T5ForConditionalGeneration (encoder + decoder) with the test tokenizer, v1.0 or v1.1 style."""
    tokenizer = make_t5_tokenizer()
    v10 = variant == "v1.0"
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=layers,
        num_decoder_layers=2, feed_forward_proj="relu" if v10 else "gated-gelu", tie_word_embeddings=v10,
        decoder_start_token_id=tokenizer.pad_token_id, relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def passages(count: int, seed: int = 1) -> list[str]:
    """Rendered passages of varied length, as `premem shard` renders them."""
    sentences = english_sentences(count * 3, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(1, 4))
        out.append(f"title: doc {i} context: " + " ".join(sentences[3 * i:3 * i + n]))
    return out


def write_store(path: Path, checkpoint: Path, texts: list[str], memory_layers: int, dtype: str = "float32",
                shard_size: int = 8) -> MemoryStore:
    """A committed store holding the memory encoder's output for `texts` (what `premem encode` writes)."""
    encoder = MemoryEncoder.from_pretrained(str(checkpoint), memory_layers=memory_layers)
    ids = encoder.tokenizer(texts)["input_ids"]
    max_tokens = max(len(x) for x in ids)
    store = MemoryStore.create(str(path), rows=len(texts), max_tokens=max_tokens, d_model=encoder.d_model,
                               dtype=dtype, shard_size=shard_size, fingerprint=encoder.fingerprint,
                               encoder=encoder.info())
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        with store.shard_writer(shard) as writer:
            for row in rows:
                with torch.no_grad():
                    states = encoder(torch.tensor([ids[row]]), torch.ones(1, len(ids[row]), dtype=torch.bool))
                writer.write([row], states, [len(ids[row])])
        store.write_metadata(shard, pa.table({"row": pa.array(list(rows), pa.int64()),
                                              "text": [texts[r] for r in rows]}))
    store.finalize()
    return MemoryStore.open(str(path), expected_fingerprint=encoder.fingerprint)
