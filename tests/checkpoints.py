"""Small random Hugging Face checkpoints with a real (tiny, offline-trained) tokenizer, for tests."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer

_SUBJECTS = ["the old fisherman", "a young teacher", "the city council", "my grandmother", "the small dog",
             "a famous painter", "the research team", "our neighbours", "the river", "a quiet student"]
_VERBS = ["crossed", "described", "painted", "repaired", "visited", "ignored", "measured", "followed",
          "celebrated", "built"]
_OBJECTS = ["the stone bridge", "a wooden boat", "the northern hills", "every window of the house",
            "the annual report", "a forgotten garden", "the new museum", "two long letters", "the railway station",
            "the harbour"]
_ENDINGS = ["in the morning", "before the winter came", "with great care", "after the long meeting",
            "near the old market", "without saying a word", "during the summer festival", "for the first time"]


def english_sentences(count: int = 400, seed: int = 0) -> list[str]:
    """Simple, varied English sentences (lower case, like the tokenizer's training text)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
        for _ in range(count)
    ]


@functools.cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """A Unigram vocabulary with T5's special ids: <pad>=0, </s>=1, <unk>=2."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(english_sentences(), trainer)
    return tuple((piece, score) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"])


def make_t5_tokenizer() -> T5Tokenizer:
    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0)


def make_t5_checkpoint(directory: Path, variant: str = "v1.0", layers: int = 4, seed: int = 0) -> Path:
    """Save a random T5 encoder checkpoint plus tokenizer into `directory` and return it.

    v1.0: ReLU feed-forward, tied embeddings, saved as a full T5ForConditionalGeneration.
    v1.1: gated-GELU feed-forward, untied embeddings, saved as a T5EncoderModel.
    """
    if variant not in ("v1.0", "v1.1"):
        raise ValueError(f"unknown T5 variant {variant!r}: use 'v1.0' or 'v1.1'")
    tokenizer = make_t5_tokenizer()
    v10 = variant == "v1.0"
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_heads=4,
        num_layers=layers,
        feed_forward_proj="relu" if v10 else "gated-gelu",
        tie_word_embeddings=v10,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config) if v10 else T5EncoderModel(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
