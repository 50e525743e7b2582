"""premem.models."""

from .checkpoint import CheckpointError, resolve_checkpoint
from .encoder import (
    DEFAULT_TEMPLATE,
    LiveLayers,
    MemoryEncoder,
    check_template,
    load_full_encoder,
    load_live_layers,
    load_tokenizer,
    render_passage,
    resolve_memory_layers,
    tokenizer_fingerprint,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "CheckpointError",
    "LiveLayers",
    "MemoryEncoder",
    "check_template",
    "load_full_encoder",
    "load_live_layers",
    "load_tokenizer",
    "render_passage",
    "resolve_checkpoint",
    "resolve_memory_layers",
    "tokenizer_fingerprint",
]
