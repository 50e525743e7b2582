"""Split a Hugging Face encoder into a frozen memory encoder (layers [0, K)) and its live layers ([K, L)).

The memory encoder runs on each passage alone and its output (the raw residual stream after layer K, before
any final norm) is what premem stores. The live layers finish the encoder later, on that memory, possibly with
question tokens prepended. Both halves call the Hugging Face submodules directly, so they match the untouched
model; they build the attention mask (and for T5 the relative position bias) themselves, because Hugging Face
builds both once at the top of the stack and only T5 block 0 owns the position bias table.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

if TYPE_CHECKING:  # the modeling modules cost seconds to import: `premem shard` only tokenizes
    from transformers import PreTrainedModel
    from transformers.models.t5.modeling_t5 import T5Attention
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .checkpoint import CheckpointError, one_line, resolve_checkpoint, weight_names, weights_digest

DEFAULT_TEMPLATE = "title: {title} context: {text}"

_ARCH = {"t5": "t5", "mt5": "t5", "bert": "bert"}  # model_type -> arch; umt5 has a bias table in every block
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.txt")
# Config values that change the computation without changing any weight shape.
_HASHED_CONFIG = {
    "t5": (
        "feed_forward_proj",
        "layer_norm_epsilon",
        "num_heads",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
    ),
    "bert": ("hidden_act", "layer_norm_eps", "num_attention_heads"),
}
_LAYER_PARAM = re.compile(r"encoder\.(?:block|layer)\.(\d+)\.")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer saved with the checkpoint at `path`."""
    return load_tokenizer_dir(resolve_checkpoint(path))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what the tokenizer does, independent of where it was loaded from.

    The padding/truncation settings are dropped: transformers changes them on every padded call, and the
    serialisation is re-keyed with sorted keys because the Rust side writes some maps in hash order.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_full_encoder(path: str) -> PreTrainedModel:
    """The untouched Hugging Face encoder (T5EncoderModel or BertModel), fp32, eval mode: the reference."""
    return load_encoder_dir(resolve_checkpoint(path))[0]


def load_live_layers(
    path: str, memory_layers: int, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LiveLayers:
    """Layers [memory_layers, L) of the checkpoint at `path` plus its final norm, in eval mode.

    Unlike the memory encoder they stay trainable: a LUMEN live encoder fine-tunes them.
    """
    model, arch = load_encoder_dir(resolve_checkpoint(path))
    layers = _encoder_layers(model)
    k = resolve_memory_layers(memory_layers, None, len(layers))
    if arch == "t5":
        stack = LayerStack(layers[k:], _T5PositionBias(layers[0].layer[0].SelfAttention))
        final_norm: nn.Module = nn.Sequential(model.encoder.final_layer_norm, model.encoder.dropout)
    else:
        stack, final_norm = LayerStack(layers[k:], None), nn.Identity()
    live = LiveLayers(stack, final_norm, arch=arch, num_layers=len(layers), memory_layers=k)
    return live.to(device=device, dtype=dtype).eval()


class MemoryEncoder(nn.Module):
    """Embeddings and layers [0, K) of an encoder, frozen; `forward` gives the residual stream after layer K."""

    def __init__(
        self,
        embed: nn.Module,
        stack: LayerStack,
        *,
        arch: str,
        model_type: str,
        num_layers: int,
        d_model: int,
        tokenizer: PreTrainedTokenizerBase,
        tokenizer_hash: str,
        template: str,
        checkpoint: str,
        fingerprint: str,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.stack = stack
        self.arch = arch
        self.model_type = model_type
        self.num_layers = num_layers
        self.memory_layers = len(stack.layers)
        self.d_model = d_model
        self.tokenizer = tokenizer
        self.tokenizer_fingerprint = tokenizer_hash
        self.template = template
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        memory_layers: int | None = None,
        live_fraction: float | None = None,
        template: str = DEFAULT_TEMPLATE,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MemoryEncoder:
        """Load the checkpoint at `path` and keep its first K layers.

        Give exactly one of `memory_layers` (K) or `live_fraction` (α, K = round((1 - α) · L)).
        """
        local = resolve_checkpoint(path)
        tokenizer = load_tokenizer_dir(local)
        # The same function the job driver calls: a worker's model has exactly the fingerprint the driver expects.
        info = memory_encoder_info(path, memory_layers=memory_layers, live_fraction=live_fraction, template=template,
                                   tokenizer=tokenizer)
        model, arch = load_encoder_dir(local)
        layers = _encoder_layers(model)
        k = info["memory_layers"]
        if arch == "t5":
            embed: nn.Module = nn.Sequential(model.shared, model.encoder.dropout)
            stack = LayerStack(layers[:k], _T5PositionBias(layers[0].layer[0].SelfAttention))
        else:
            embed, stack = model.embeddings, LayerStack(layers[:k], None)
        encoder = cls(
            embed,
            stack,
            arch=arch,
            model_type=model.config.model_type,
            num_layers=len(layers),
            d_model=model.config.hidden_size,
            tokenizer=tokenizer,
            tokenizer_hash=info["tokenizer_fingerprint"],
            template=template,
            checkpoint=path,
            fingerprint=info["fingerprint"],
        )
        return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids and keep-mask (bool or 0/1) -> [B, T, d_model] residual stream after layer K.

        Positions start at 0 in every row; rows may be right-padded.
        """
        return self.stack(self.embed(input_ids), attention_mask)

    def live_layers(self) -> LiveLayers:
        """The complementary layers [K, L) + final norm, reloaded from the checkpoint on this device and dtype."""
        weight = next(self.parameters())
        return load_live_layers(self.checkpoint, self.memory_layers, device=weight.device, dtype=weight.dtype)

    def info(self) -> dict[str, Any]:
        """JSON-serialisable description, stored next to the memory it produced."""
        return {
            "checkpoint": self.checkpoint,
            "arch": self.arch,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "memory_layers": self.memory_layers,
            "d_model": self.d_model,
            "template": self.template,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "fingerprint": self.fingerprint,
        }


class LiveLayers(nn.Module):
    """Layers [K, L) plus the final norm: finishes the encoder on memory states (alone or after a question)."""

    def __init__(self, stack: LayerStack, final_norm: nn.Module, *, arch: str, num_layers: int, memory_layers: int):
        super().__init__()
        self.stack = stack
        self.final_norm = final_norm
        self.arch = arch
        self.num_layers = num_layers
        self.memory_layers = memory_layers

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T, d] states after layer K and [B, T] keep-mask -> the encoder's last hidden state.

        The T5 position bias is computed for this T, positions from 0, so a concatenation works as one sequence.
        """
        return self.final_norm(self.stack(hidden, attention_mask))


class LayerStack(nn.Module):
    """Runs a slice of Hugging Face encoder layers given only a [B, T] keep-mask."""

    def __init__(self, layers: nn.ModuleList, position_bias: _T5PositionBias | None) -> None:
        super().__init__()
        self.layers = layers
        self.position_bias = position_bias  # T5 only

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = _additive_mask(attention_mask.to(hidden.device), hidden.dtype)
        if self.position_bias is None:
            for layer in self.layers:
                hidden = layer(hidden, attention_mask=mask)
            return hidden
        # Padding folded into the bias: eager attention adds it, SDPA uses it as its float mask.
        bias = self.position_bias(hidden.shape[1]) + mask
        for block in self.layers:
            hidden = block(hidden, position_bias=bias)[0]
        return hidden


class _T5PositionBias(nn.Module):
    """Bidirectional relative position bias, a copy of block 0's table, for any sequence length."""

    def __init__(self, attention: T5Attention) -> None:
        super().__init__()
        self.table = copy.deepcopy(attention.relative_attention_bias)
        self.num_buckets = attention.relative_attention_num_buckets
        self.max_distance = attention.relative_attention_max_distance

    def forward(self, length: int) -> torch.Tensor:
        """[1, heads, length, length] bias, as T5Attention.compute_bias for an encoder."""
        position = torch.arange(length, device=self.table.weight.device)
        from transformers.models.t5.modeling_t5 import T5Attention

        buckets = T5Attention._relative_position_bucket(
            position[None, :] - position[:, None],
            bidirectional=True,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.table(buckets).permute(2, 0, 1).unsqueeze(0)


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] keep-mask -> [B, 1, 1, T] float mask (0 keep, dtype-min drop) added to every query's scores."""
    drop = ~attention_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(drop.shape, dtype=dtype, device=drop.device).masked_fill(drop, torch.finfo(dtype).min)


def load_tokenizer_dir(local: Path) -> PreTrainedTokenizerBase:
    """The fast tokenizer of a local checkpoint directory (a clear error when there is none)."""
    # Checked first: for a T5 directory without tokenizer files AutoTokenizer quietly builds an empty vocabulary.
    if not any((local / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"checkpoint {local} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): "
            "save the tokenizer into the checkpoint directory with tokenizer.save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
    except Exception as e:  # malformed files surface as many types, plain Exception from the Rust side included
        raise CheckpointError(
            f"cannot load the tokenizer of checkpoint {local} ({one_line(e)}): "
            "re-save it with tokenizer.save_pretrained"
        ) from e
    if not tokenizer.is_fast:
        raise CheckpointError(
            f"checkpoint {local} has no fast tokenizer: add a tokenizer.json (tokenizer.save_pretrained of a fast one)"
        )
    return tokenizer


@contextlib.contextmanager
def quiet_loading():
    """No per-load progress bar: a job loads the model in every worker and reports its own progress."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_encoder_dir(local: Path) -> tuple[PreTrainedModel, str]:
    """The checkpoint's encoder in fp32 eval mode, and its arch ("t5" or "bert")."""
    from transformers import BertModel, T5EncoderModel

    model_type = _model_type(local)
    arch = _ARCH[model_type]
    try:
        config = AutoConfig.from_pretrained(local, local_files_only=True)
        model_class = T5EncoderModel if arch == "t5" else BertModel
        # SDPA accepts the float masks built here; T5EncoderModel reads the encoder of a full T5 checkpoint too.
        with quiet_loading():
            model, loading = model_class.from_pretrained(
                local,
                config=config,
                dtype=torch.float32,
                attn_implementation="sdpa",
                local_files_only=True,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot load the weights of checkpoint {local} ({one_line(e)}): copy the checkpoint again"
        ) from e
    # Missing weights would be silently random-initialised; the BERT pooler is the only part never used.
    missing = sorted(key for key in loading["missing_keys"] if not key.startswith("pooler."))
    if missing:
        raise CheckpointError(
            f"checkpoint {local} lacks {len(missing)} encoder weights (e.g. {missing[0]}): "
            f"pass a complete {model_type} checkpoint"
        )
    return model.eval(), arch


def _model_type(local: Path) -> str:
    try:
        model_type = json.loads((local / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {local} has an unreadable config.json or no model_type in it: pass a Hugging Face checkpoint"
        ) from e
    if model_type not in _ARCH:
        raise CheckpointError(
            f"checkpoint {local} has model_type {model_type!r}, which premem cannot split: "
            f"use one of {', '.join(_ARCH)}"
        )
    return model_type


def _encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.encoder.block if _ARCH[model.config.model_type] == "t5" else model.encoder.layer


def resolve_memory_layers(
    memory_layers: int | None, live_fraction: float | None, num_layers: int, *, min_layers: int = 1
) -> int:
    """K, the frozen layers [0, K) whose output is stored, from exactly one of K or the live fraction α.

    The one rule: K = round((1 - α) · L) for α in [0, 1], and K must lie in ``min_layers..L``.  α = 1 means
    K = 0 (no memory layer, all layers live: FiD); only a caller that runs without stored memory accepts it
    (LUMEN's live side, ``min_layers=0``).  A memory encoder needs K >= 1 (the default), so for it α ranges
    over [0, 1) and an α that rounds K down to 0 on a shallow encoder is refused as leaving no memory layer.
    Raises CheckpointError with the option names of `premem encode` / `premem train-lumen`.
    """
    if (memory_layers is None) == (live_fraction is None):
        raise CheckpointError(
            "pass exactly one of --memory-layers (K, layers run once and stored) "
            "or --live-fraction (α, share of layers left live)"
        )
    if memory_layers is not None:
        if isinstance(memory_layers, bool) or not 0 <= min_layers <= memory_layers <= num_layers:
            raise CheckpointError(
                f"--memory-layers {memory_layers} is out of range for this {num_layers}-layer encoder: "
                f"pick {min_layers}..{num_layers}"
            )
        return int(memory_layers)
    alpha = float(live_fraction)
    top_open = min_layers > 0  # α = 1 gives K = 0, which only a caller without a memory encoder accepts
    if not (0.0 <= alpha < 1.0 if top_open else 0.0 <= alpha <= 1.0):
        raise CheckpointError(
            f"--live-fraction {live_fraction} is out of range: pick a value in [0, 1{')' if top_open else ']'}"
        )
    k = round((1.0 - alpha) * num_layers)
    if k < min_layers:
        raise CheckpointError(
            f"--live-fraction {live_fraction} leaves no memory layer of this {num_layers}-layer encoder: "
            "pick a smaller fraction"
        )
    return k


def check_template(template: str, what: str = "template") -> None:
    """A passage template renders {text} and optionally {title}, nothing else (the one rule for the memory encoder,
    the retriever and `premem shard`)."""
    try:
        ok = "\0" in template.format(title="", text="\0")
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(
            f"{what} {template!r} is invalid: use {{text}} for the passage and optionally {{title}}, "
            "with literal braces doubled"
        )


def render_passage(template: str, title: str, text: str) -> str:
    """A passage as the encoder reads it (FiD's input format: title and text through the template)."""
    try:
        return template.format(title=title, text=text)
    except (KeyError, IndexError, ValueError):
        check_template(template)  # says what is wrong with it
        raise


def memory_encoder_info(
    path: str,
    *,
    memory_layers: int | None = None,
    live_fraction: float | None = None,
    template: str = DEFAULT_TEMPLATE,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """``MemoryEncoder.from_pretrained(...).info()`` read from the checkpoint's config, tokenizer and weight files,
    without building the model: a job driver learns the fingerprint its workers' models will have."""
    check_template(template)
    local = resolve_checkpoint(path)
    arch, config = encoder_arch(local), load_config(local)
    num_layers = int(config.num_layers if arch == "t5" else config.num_hidden_layers)
    k = resolve_memory_layers(memory_layers, live_fraction, num_layers)
    tokenizer_hash = tokenizer_fingerprint(tokenizer or load_tokenizer_dir(local))
    header = {
        "arch": arch,
        "model_type": config.model_type,
        "memory_layers": k,
        "config": {name: getattr(config, name, None) for name in _HASHED_CONFIG[arch]},
        "tokenizer": tokenizer_hash,
        "template": template,
    }
    used = {name: stored for name, stored in encoder_weight_names(local, arch, num_layers).items()
            if _used_by_memory(name, k)}
    header["weights"] = weights_digest(local, used)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    return {
        "checkpoint": path,
        "arch": arch,
        "model_type": config.model_type,
        "num_layers": num_layers,
        "memory_layers": k,
        "d_model": int(config.hidden_size),
        "template": template,
        "tokenizer_fingerprint": tokenizer_hash,
        "fingerprint": digest.hexdigest(),
    }


def encoder_arch(local: Path) -> str:
    """"t5" or "bert": how premem runs the checkpoint at `local` (a clear error for any other model type)."""
    return _ARCH[_model_type(local)]


def load_config(local: Path):
    """The checkpoint's transformers config (no weights)."""
    try:
        return AutoConfig.from_pretrained(local, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the config of checkpoint {local} ({one_line(e)}): copy the checkpoint again") from e


def encoder_weight_names(local: Path, arch: str, num_layers: int) -> dict[str, str]:
    """The encoder's parameters as T5EncoderModel / BertModel name them -> the names the checkpoint stores them under.

    A full T5 checkpoint also holds a decoder, a BERT task checkpoint prefixes ``bert.``; the BERT pooler and
    position-id buffer are never used.  Refuses a checkpoint that lacks the embeddings or one of the layers.
    """
    stored = weight_names(local)
    names: dict[str, str] = {}
    for name in stored:
        canonical = name.removeprefix("bert.") if arch == "bert" else name
        if canonical == "encoder.embed_tokens.weight":  # T5's tied alias of shared.weight
            if "shared.weight" in stored:
                continue
            canonical = "shared.weight"
        if canonical.startswith(("shared.", "embeddings.", "encoder.")) and not canonical.endswith("position_ids"):
            names[canonical] = name
    embedding = "shared.weight" if arch == "t5" else "embeddings.word_embeddings.weight"
    layers = {int(m.group(1)) for m in map(_LAYER_PARAM.match, names) if m}
    lacking = [embedding] if embedding not in names else [f"layer {i}" for i in range(num_layers) if i not in layers]
    if lacking:
        raise CheckpointError(f"checkpoint {local} lacks encoder weights ({lacking[0]}): pass a complete checkpoint")
    return names


def _used_by_memory(parameter: str, memory_layers: int) -> bool:
    """Embeddings and layers below K; T5 block 0 includes the relative position bias table."""
    layer = _LAYER_PARAM.match(parameter)
    if layer:
        return int(layer.group(1)) < memory_layers
    return parameter.startswith(("shared.", "embeddings."))


def token_budget_batches(lengths: np.ndarray, tokens_per_batch: int) -> list[np.ndarray]:
    """Index batches over length-sorted passages, each at most `tokens_per_batch` padded tokens.

    Sorting keeps padding small; the budget (not a count) keeps every batch
    the same cost, so short passages go through in large batches.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, tokens_per_batch // longest)
        batches.append(order[start:start + size])
        start += size
    return batches
