"""LUMEN's live side: question encoder, live encoder and Fusion-in-Decoder decoder over stored passage memory.

From one T5 checkpoint (T5ForConditionalGeneration layout) with L encoder layers and live fraction α,
K = round((1 - α) · L):

- question encoder: embeddings and encoder layers [0, K), fine-tuned, run on the question alone;
- live encoder: layers [K, L) and the final layer norm, fine-tuned, run per passage on the question's states
  followed by the passage memory (the output of the frozen layers [0, K), as `premem encode` stores it), with
  the T5 relative position bias computed over the concatenated length;
- decoder: the checkpoint's decoder, cross-attending to the live outputs of all k passages laid end to end.

α = 1 (K = 0) is exactly FiD: the "memory" is the passage's token embeddings and all layers run live on
question + passage. α = 0 (K = L) is exactly MemoryFiD: the live encoder is only the final norm, applied to the
fully encoded question next to the fully pre-encoded passage.

Question and passage are packed per passage (question tokens, then passage tokens, then padding), so a
result does not depend on how long the other questions of the batch are.  Questions are tokenized without
the end-of-sequence token: question + passage then reads like FiD's "question: ... title: ... context: ...</s>".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import T5Attention
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .checkpoint import CheckpointError, one_line, resolve_checkpoint
from .encoder import (
    DEFAULT_TEMPLATE,
    LayerStack,
    MemoryEncoder,
    load_tokenizer_dir,
    quiet_loading,
    resolve_memory_layers,
)

DEFAULT_QUESTION_TEMPLATE = "question: {question}"


def memory_layers_for(live_fraction: float, num_layers: int) -> int:
    """K = round((1 - α) · L) for live fraction α in [0, 1] (α = 1: K = 0, FiD); see `resolve_memory_layers`."""
    return resolve_memory_layers(None, live_fraction, num_layers, min_layers=0)


class _SharedT5Bias:
    """Block 0's relative position bias for any length, sharing (not copying) its table.

    One T5 encoder owns one table; question and live encoders both use it, as the untouched encoder does.
    A plain object, not a module, so the table is registered once (under the T5 model).
    """

    def __init__(self, attention: T5Attention) -> None:
        self.attention = attention

    def __call__(self, length: int) -> torch.Tensor:
        table = self.attention.relative_attention_bias
        position = torch.arange(length, device=table.weight.device)
        buckets = T5Attention._relative_position_bucket(
            position[None, :] - position[:, None],
            bidirectional=True,
            num_buckets=self.attention.relative_attention_num_buckets,
            max_distance=self.attention.relative_attention_max_distance,
        )
        return table(buckets).permute(2, 0, 1).unsqueeze(0)


class LumenModel(nn.Module):
    """LUMEN over one T5 checkpoint: `forward` (loss with labels) and `generate` from question + passage memory.

    Passage memory is `[B, k, P, d]` with a `[B, k, P]` keep-mask (right-padded), in any float dtype (the
    store's bf16 is cast to the model's dtype); pass `memory=None` for a no-retrieval run on the question alone.
    """

    def __init__(
        self,
        t5: T5ForConditionalGeneration,
        *,
        memory_layers: int,
        tokenizer: PreTrainedTokenizerBase,
        checkpoint: str,
        template: str = DEFAULT_TEMPLATE,
        question_template: str = DEFAULT_QUESTION_TEMPLATE,
    ) -> None:
        super().__init__()
        blocks = t5.encoder.block
        memory_layers = resolve_memory_layers(memory_layers, None, len(blocks), min_layers=0)
        self.t5 = t5
        self.num_layers = len(blocks)
        self.memory_layers = memory_layers
        self.d_model = t5.config.d_model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.template = template
        self.question_template = question_template
        bias = _SharedT5Bias(blocks[0].layer[0].SelfAttention)
        # Views on the T5 encoder's own blocks, split where the memory ends; kept out of the module tree so
        # every parameter has one name (under t5) and save_pretrained writes a plain T5 checkpoint.
        object.__setattr__(self, "question_layers", LayerStack(blocks[:memory_layers], bias))
        object.__setattr__(self, "live_layers", LayerStack(blocks[memory_layers:], bias))
        self._memory_encoder: MemoryEncoder | None = None
        self._memory_fingerprint: str | None = None

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        live_fraction: float | None = None,
        memory_layers: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        question_template: str = DEFAULT_QUESTION_TEMPLATE,
        dtype: torch.dtype = torch.float32,
    ) -> LumenModel:
        """Load a T5ForConditionalGeneration checkpoint; give one of `live_fraction` (α) or `memory_layers` (K)."""
        if (live_fraction is None) == (memory_layers is None):  # fails before loading; same rule and message
            resolve_memory_layers(memory_layers, live_fraction, 0, min_layers=0)
        if "{question}" not in question_template:
            raise CheckpointError(f"question template {question_template!r} lacks {{question}}: add it")
        local = resolve_checkpoint(path)
        tokenizer = load_tokenizer_dir(local)
        t5 = _load_t5(local)
        layers = len(t5.encoder.block)
        k = resolve_memory_layers(memory_layers, live_fraction, layers, min_layers=0)
        model = cls(t5, memory_layers=k, tokenizer=tokenizer, checkpoint=str(path), template=template,
                    question_template=question_template)
        return model.to(dtype=dtype)

    @property
    def live_fraction(self) -> float:
        return (self.num_layers - self.memory_layers) / self.num_layers

    # --- memory ---------------------------------------------------------------------------------

    def memory_encoder(self) -> MemoryEncoder:
        """The frozen memory encoder (layers [0, K) of the untouched checkpoint), loaded on first use."""
        if self.memory_layers == 0:
            raise CheckpointError("with --live-fraction 1 (K = 0) there is no memory encoder: passages run fully live")
        if self._memory_encoder is None:
            weight = next(self.parameters())
            encoder = MemoryEncoder.from_pretrained(
                self.checkpoint, memory_layers=self.memory_layers, template=self.template,
                device=weight.device, dtype=weight.dtype,
            )
            self._memory_fingerprint = encoder.fingerprint
            # Kept outside the module tree: it is frozen, never saved, never moved by the optimiser.
            object.__setattr__(self, "_memory_encoder", encoder)
        return self._memory_encoder

    @property
    def memory_fingerprint(self) -> str:
        """Fingerprint of the memory this model reads: pass it to MemoryStore.open(expected_fingerprint=...)."""
        if self._memory_fingerprint is None:
            self._memory_fingerprint = self.memory_encoder().fingerprint
        return self._memory_fingerprint

    def memory_from_tokens(self, passage_ids: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        """On-the-fly memory of `[B, k, P]` passage token ids: what the store would hold, `[B, k, P, d]`.

        K = 0 (FiD): the passages' token embeddings, through the trainable embedding table.
        """
        b, k, p = passage_ids.shape
        flat_ids, flat_mask = passage_ids.reshape(b * k, p), passage_mask.reshape(b * k, p)
        if self.memory_layers == 0:
            states = self.t5.encoder.dropout(self.t5.shared(flat_ids))
        else:
            with torch.no_grad():
                states = self.memory_encoder()(flat_ids, flat_mask)
            states = states * flat_mask[..., None].to(states.dtype)
        return states.reshape(b, k, p, -1)

    # --- encoder side ---------------------------------------------------------------------------

    def encode_question(self, question_ids: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """[B, Q] ids -> [B, Q, d] states after the question encoder (layers [0, K), positions from 0)."""
        embedded = self.t5.encoder.dropout(self.t5.shared(question_ids))
        return self.question_layers(embedded, question_mask)

    def encode(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's input: live outputs `[B, k·T, d]` of all k passages end to end, and their keep-mask."""
        question_mask = question_mask.to(torch.bool)
        question = self.encode_question(question_ids, question_mask)
        if memory is None or memory.shape[1] == 0:  # no retrieval: the question alone goes through the live layers
            hidden, mask = question, question_mask
            return self._finish(self.live_layers(hidden, mask)), mask
        _check_memory(memory, memory_mask, question, self.d_model)
        hidden, mask = _pack(question, question_mask, memory.to(question.dtype), memory_mask.to(torch.bool))
        b, k, t, d = hidden.shape
        live = self._finish(self.live_layers(hidden.reshape(b * k, t, d), mask.reshape(b * k, t)))
        return live.reshape(b, k * t, d), mask.reshape(b, k * t)

    def _finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.t5.encoder.dropout(self.t5.encoder.final_layer_norm(hidden))

    # --- heads ----------------------------------------------------------------------------------

    def forward(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        """Logits (and the mean token cross-entropy when `labels` is given; -100 marks ignored label positions)."""
        hidden, mask = self.encode(question_ids, question_mask, memory, memory_mask)
        return self.t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask.to(torch.long),
            labels=labels,
            decoder_input_ids=decoder_input_ids,
        )

    @torch.no_grad()
    def generate(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Answer token ids (greedy unless `generate_kwargs` say otherwise), decoding from the live outputs."""
        hidden, mask = self.encode(question_ids, question_mask, memory, memory_mask)
        generate_kwargs.setdefault("max_new_tokens", 32)
        generate_kwargs.setdefault("do_sample", False)
        return self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask.to(torch.long),
            **generate_kwargs,
        )

    # --- text helpers ---------------------------------------------------------------------------

    def question_ids(self, questions: list[str]) -> list[list[int]]:
        """Token ids of the rendered questions, without end-of-sequence (the passage follows them)."""
        texts = [self.question_template.format(question=q) for q in questions]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def label_ids(self, answers: list[str]) -> list[list[int]]:
        """Token ids of the answers, with end-of-sequence."""
        return self.tokenizer(answers)["input_ids"]

    def save_pretrained(self, directory: str | Path) -> None:
        """A plain T5ForConditionalGeneration checkpoint (fine-tuned weights) plus tokenizer and LUMEN settings."""
        directory = Path(directory)
        self.t5.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        settings = {"memory_layers": self.memory_layers, "num_layers": self.num_layers, "template": self.template,
                    "question_template": self.question_template}
        (directory / "lumen.json").write_text(json.dumps(settings, indent=2) + "\n")


def _check_memory(memory: torch.Tensor, memory_mask: torch.Tensor | None, question: torch.Tensor, d: int) -> None:
    if memory.ndim != 4 or memory.shape[-1] != d or memory.shape[0] != question.shape[0]:
        raise ValueError(
            f"memory must be [B={question.shape[0]}, k, P, d={d}], got {list(memory.shape)}: "
            "read it from a store encoded with this checkpoint"
        )
    if memory_mask is None or tuple(memory_mask.shape) != tuple(memory.shape[:3]):
        raise ValueError(f"memory_mask must be [B, k, P] = {list(memory.shape[:3])}, got "
                         f"{None if memory_mask is None else list(memory_mask.shape)}")


def _pack(
    question: torch.Tensor, question_mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per passage: the question's real tokens, then the passage's, then padding -> [B, k, T, d], [B, k, T].

    Masks are right-padded keep-masks; T is the longest question + passage of the batch.
    """
    b, k, p, d = memory.shape
    q = question.shape[1]
    q_len = question_mask.sum(1)  # [B]
    p_len = memory_mask.sum(2)  # [B, k]
    total = q_len[:, None] + p_len  # [B, k]
    t = max(int(total.max()), 1)
    source = torch.cat([question[:, None].expand(b, k, q, d), memory], dim=2)  # [B, k, Q + P, d]
    position = torch.arange(t, device=memory.device)
    from_question = position[None, :] < q_len[:, None]  # [B, T]
    index = torch.where(from_question, position[None, :], q + position[None, :] - q_len[:, None])
    index = index.clamp(max=q + p - 1)[:, None, :].expand(b, k, t)
    mask = position[None, None, :] < total[..., None]  # [B, k, T]
    packed = torch.gather(source, 2, index[..., None].expand(b, k, t, d))
    return packed * mask[..., None].to(packed.dtype), mask


def _load_t5(local: Path) -> T5ForConditionalGeneration:
    """The full T5 (encoder + decoder) in fp32; a checkpoint without a decoder is a clear error."""
    try:
        with quiet_loading():
            t5, loading = T5ForConditionalGeneration.from_pretrained(
                local, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load checkpoint {local} as a T5 encoder-decoder ({one_line(e)})") from e
    tied = t5.config.tie_word_embeddings
    missing = sorted(key for key in loading["missing_keys"] if key != "lm_head.weight" or not tied)
    if missing:
        raise CheckpointError(
            f"checkpoint {local} lacks {len(missing)} T5 weights (e.g. {missing[0]}): LUMEN needs a full "
            "T5ForConditionalGeneration checkpoint (encoder and decoder)"
        )
    return t5.train()
