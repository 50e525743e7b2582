"""MELODI checkpoints (safetensors + config JSON), their fingerprint, and the byte tokenizer.

A checkpoint is a directory::

    config.json         MelodiConfig (every field; unknown keys are an error)
    model.safetensors   the weights
    tokenizer.json      {"kind": "bytes", ...}: which tokenizer the token ids come from
    trainer.json        optional: training progress (step, held-out loss history, arguments)
    trainer_state.pt    optional: optimizer, RNG and data-stream state, for resuming training

The fingerprint hashes the config and every weight tensor (name, dtype, shape, bytes), so a store written by
one checkpoint refuses to be read with another, whatever the files' layout.
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


def model_fingerprint(model: MelodiLM) -> str:
    """sha256 over the config JSON and every tensor of the state dict (sorted by name)."""
    h = hashlib.sha256()
    h.update(model.config.to_json().encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(model: MelodiLM, directory: str | Path, tokenizer: ByteTokenizer | None = None) -> str:
    """Write config.json + model.safetensors + tokenizer.json; returns the fingerprint."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or ByteTokenizer()
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = d / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "arch": "melodi"})
    tmp.replace(d / WEIGHTS_FILE)  # a reader never sees half a weights file
    model.config.to_json(d / CONFIG_FILE)
    (d / TOKENIZER_FILE).write_text(json.dumps(tok.to_dict()) + "\n")
    return model_fingerprint(model)


def load_tokenizer(path: str | Path) -> ByteTokenizer:
    """The tokenizer a checkpoint's token ids come from, without loading its weights."""
    local = resolve_checkpoint(str(path))
    tok_file = local / TOKENIZER_FILE
    tok_info = json.loads(tok_file.read_text()) if tok_file.is_file() else {"kind": "bytes"}
    if tok_info.get("kind") != "bytes":
        raise CheckpointError(f"checkpoint {path} uses tokenizer {tok_info.get('kind')!r}; premem reads 'bytes' only")
    return ByteTokenizer()


@dataclass
class LoadedCheckpoint:
    model: MelodiLM
    tokenizer: ByteTokenizer
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
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"checkpoint {path}: vocab_size {config.vocab_size} is smaller than the byte tokenizer's 257")
    return LoadedCheckpoint(model, tok, model_fingerprint(model), local)
