"""MELODI checkpoints (safetensors + config JSON), their fingerprint, and their tokenizer (bytes or Hugging Face).

A checkpoint is a directory::

    config.json         MelodiConfig (every field; unknown keys are an error)
    model.safetensors   the weights
    tokenizer.json      {"kind": "bytes" | "hf", ...}: which tokenizer the token ids come from
    tokenizer/          a Hugging Face tokenizer's own files (kind "hf"), so the checkpoint stands alone
    trainer.json        optional: training progress (step, held-out loss history, arguments)
    trainer_state.pt    optional: optimizer, RNG and data-stream state, for resuming training

The fingerprint hashes the config, every weight tensor (name, dtype, shape, bytes) and a Hugging Face
tokenizer's description (with the sha256 of its vocabulary), so a store written by one checkpoint refuses to be read
with another, whatever the files' layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, one_line, resolve_checkpoint
from .melodi import MelodiConfig, MelodiLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 1, id 0 is padding. No training, no files, no unknown tokens."""

    pad_id: int = 0
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def encode_tensor(self, text: str) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        return raw.long() + 1

    def decode(self, ids) -> str:
        return bytes(int(i) - 1 for i in ids if int(i) > 0).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "bytes", "pad_id": self.pad_id, "vocab_size": self.vocab_size}


class HFTokenizer:
    """A Hugging Face tokenizer directory (e.g. T5's 32k sentencepiece vocabulary); no special tokens added."""

    TOKENIZER_DIR = "tokenizer"

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise CheckpointError(f"--tokenizer {path}: not a Hugging Face tokenizer directory ({one_line(e)}): "
                                  f"pass 'bytes' or a directory saved with save_pretrained") from e
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.vocab_size = len(self.tok)
        # what the ids mean, unchanged by save_pretrained round trips (the files themselves are rewritten)
        vocab = json.dumps(sorted(self.tok.get_vocab().items()), ensure_ascii=False)
        self.vocab_sha256 = hashlib.sha256(vocab.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"kind": "hf", "class": type(self.tok).__name__, "pad_id": self.pad_id, "vocab_size": self.vocab_size,
                "vocab_sha256": self.vocab_sha256}

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory / self.TOKENIZER_DIR))


Tokenizer = ByteTokenizer | HFTokenizer


def make_tokenizer(spec: str | None) -> Tokenizer:
    """--tokenizer: 'bytes' (default) or a Hugging Face tokenizer directory."""
    return ByteTokenizer() if spec in (None, "", "bytes") else HFTokenizer(spec)


def model_fingerprint(model: MelodiLM, tokenizer: Tokenizer | None = None) -> str:
    """sha256 over the config JSON, every tensor of the state dict (sorted by name) and, for a Hugging Face
    tokenizer, its description (bytes-as-tokens checkpoints hash as before)."""
    h = hashlib.sha256()
    h.update(model.config.to_json().encode())
    if isinstance(tokenizer, HFTokenizer):
        h.update(json.dumps(tokenizer.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(model: MelodiLM, directory: str | Path, tokenizer: Tokenizer | None = None) -> str:
    """Write config.json + model.safetensors + tokenizer.json; returns the fingerprint."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or ByteTokenizer()
    check_tokenizer(tok, model.config, f"checkpoint {directory}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = d / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "arch": "melodi"})
    tmp.replace(d / WEIGHTS_FILE)  # a reader never sees half a weights file
    model.config.to_json(d / CONFIG_FILE)
    if isinstance(tok, HFTokenizer):
        tok.save(d)
    (d / TOKENIZER_FILE).write_text(json.dumps(tok.to_dict()) + "\n")
    return model_fingerprint(model, tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a checkpoint's token ids come from, without loading its weights."""
    local = resolve_checkpoint(str(path))
    tok_file = local / TOKENIZER_FILE
    tok_info = json.loads(tok_file.read_text()) if tok_file.is_file() else {"kind": "bytes"}
    if tok_info.get("kind") == "bytes":
        return ByteTokenizer()
    if tok_info.get("kind") != "hf":
        raise CheckpointError(f"checkpoint {path} uses tokenizer kind {tok_info.get('kind')!r}: premem reads 'bytes' "
                              f"and 'hf'")
    tok = HFTokenizer(local / HFTokenizer.TOKENIZER_DIR)
    if tok.to_dict() != tok_info:
        raise CheckpointError(f"checkpoint {path}: its {HFTokenizer.TOKENIZER_DIR}/ files do not match {TOKENIZER_FILE} "
                              f"(the tokenizer was changed after training): restore the files saved with the model")
    return tok


def check_tokenizer(tokenizer: Tokenizer, config: MelodiConfig, where: str) -> None:
    """The tokenizer's ids must fit the model's vocabulary."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                              f"{config.vocab_size}: use --set vocab_size={tokenizer.vocab_size} (or more)")


@dataclass
class LoadedCheckpoint:
    model: MelodiLM
    tokenizer: Tokenizer
    fingerprint: str
    path: Path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a MELODI checkpoint (local directory or gs:// URL, mirrored once) in eval mode, fp32.

    Raises CheckpointError, with what to do, when the directory is not a MELODI checkpoint or when its
    config.json does not describe its weights (missing, unexpected or differently shaped tensors).
    """
    local = resolve_checkpoint(str(path))
    try:
        config = MelodiConfig.from_json(local / CONFIG_FILE)
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path}: config.json is not a MELODI config ({one_line(e)}): pass a directory written by "
            f"`premem train-melodi`"
        ) from e
    weights = local / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {WEIGHTS_FILE}: pass a directory written by `premem train-melodi`")
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: {WEIGHTS_FILE} is unreadable ({one_line(e)})") from e
    tok = load_tokenizer(local)
    model = MelodiLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} tensors of another shape (first: {shapes[0]}, weights vs config)")
        if missing:
            parts.append(f"{len(missing)} tensors missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        raise CheckpointError(
            f"checkpoint {path}: config.json does not match {WEIGHTS_FILE}: {'; '.join(parts)}: "
            f"restore the config.json saved with these weights"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    model.eval().to(device)
    check_tokenizer(tok, config, f"checkpoint {path}")
    return LoadedCheckpoint(model, tok, model_fingerprint(model, tok), local)
