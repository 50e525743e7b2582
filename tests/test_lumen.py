"""LUMEN's live side against its definitions: α=1 is FiD on the untouched T5, α=0 is MemoryFiD, and memory read
from a store gives what memory computed on the fly gives (up to the stored dtype's rounding)."""

from __future__ import annotations

import pytest
import torch
from lumen_helpers import make_full_t5_checkpoint, passages, write_store
from transformers import T5ForConditionalGeneration

from premem.models import CheckpointError
from premem.models.lumen import LumenModel, memory_layers_for
from premem.storage import FingerprintMismatch, MemoryStore
from premem.storage.tensors import pad_sequences as pad_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


QUESTIONS = ["who crossed the stone bridge", "what did my grandmother paint before the winter came"]
ANSWERS = ["the old fisherman", "a wooden boat"]


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def checkpoint(request, tmp_path_factory):
    return make_full_t5_checkpoint(tmp_path_factory.mktemp(f"t5full_{request.param}"), variant=request.param)


def _reference(checkpoint) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _inputs(model: LumenModel, k: int = 3):
    """Two questions (different lengths), k passages each, labels; all as padded tensors."""
    q_ids = model.question_ids(QUESTIONS)
    texts = passages(len(QUESTIONS) * k)
    p_ids = model.tokenizer(texts)["input_ids"]
    question_ids, question_mask = pad_batch(q_ids, 0)
    flat, flat_mask = pad_batch(p_ids, 0)
    passage_ids = flat.reshape(len(QUESTIONS), k, -1)
    passage_mask = flat_mask.reshape(len(QUESTIONS), k, -1)
    labels, _ = pad_batch(model.label_ids(ANSWERS), -100)
    return q_ids, p_ids, question_ids, question_mask, passage_ids, passage_mask, labels


def _fid_encoder_outputs(reference, q_ids, p_ids, k):
    """FiD (facebookresearch/FiD): encode question+passage per passage, view as [B, k·T, d]."""
    ids, mask = pad_batch([q_ids[i // k] + p for i, p in enumerate(p_ids)], 0)
    with torch.no_grad():
        hidden = reference.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    b = len(q_ids)
    return hidden.reshape(b, -1, hidden.shape[-1]), mask.reshape(b, -1)


def test_live_fraction_maps_to_memory_layers():
    assert [memory_layers_for(a, 24) for a in (0.0, 1 / 3, 0.5, 1.0)] == [24, 16, 12, 0]
    with pytest.raises(CheckpointError, match="out of range"):
        memory_layers_for(1.5, 24)


def test_alpha_one_is_fid(checkpoint):
    model = LumenModel.from_pretrained(str(checkpoint), live_fraction=1.0).eval()
    assert model.memory_layers == 0
    reference = _reference(checkpoint)
    q_ids, p_ids, question_ids, question_mask, passage_ids, passage_mask, labels = _inputs(model)
    memory = model.memory_from_tokens(passage_ids, passage_mask)
    with torch.no_grad():
        got = model(question_ids, question_mask, memory, passage_mask, labels=labels)
        hidden, mask = _fid_encoder_outputs(reference, q_ids, p_ids, k=3)
        want = reference(encoder_outputs=(hidden,), attention_mask=mask.long(), labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    # generate decodes from the same encoder outputs as HF generate on FiD's
    got_ids = model.generate(question_ids, question_mask, memory, passage_mask, max_new_tokens=6)
    want_ids = reference.generate(encoder_outputs=_base(hidden), attention_mask=mask.long(), max_new_tokens=6,
                                  do_sample=False)
    assert torch.equal(got_ids, want_ids)


def _base(hidden):
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=hidden)


def test_alpha_zero_is_memory_fid(checkpoint):
    """MemoryFiD: the decoder reads [encoder(question); encoder(passage)] per passage, both fully encoded alone."""
    model = LumenModel.from_pretrained(str(checkpoint), live_fraction=0.0).eval()
    assert model.memory_layers == model.num_layers
    reference = _reference(checkpoint)
    q_ids, p_ids, question_ids, question_mask, passage_ids, passage_mask, labels = _inputs(model)
    k = 3
    with torch.no_grad():
        memory = model.memory_from_tokens(passage_ids, passage_mask)
        got = model(question_ids, question_mask, memory, passage_mask, labels=labels)
        segments = []
        for i, p in enumerate(p_ids):
            q = reference.encoder(input_ids=torch.tensor([q_ids[i // k]])).last_hidden_state[0]
            m = reference.encoder(input_ids=torch.tensor([p])).last_hidden_state[0]
            segments.append(torch.cat([q, m]))
        t = max(len(s) for s in segments)
        hidden = torch.zeros(len(segments), t, model.d_model)
        mask = torch.zeros(len(segments), t, dtype=torch.long)
        for i, s in enumerate(segments):
            hidden[i, :len(s)], mask[i, :len(s)] = s, 1
        want = reference(encoder_outputs=(hidden.reshape(2, -1, model.d_model),), attention_mask=mask.reshape(2, -1),
                         labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_no_retrieval_is_t5_on_the_question(checkpoint):
    model = LumenModel.from_pretrained(str(checkpoint), live_fraction=0.5).eval()
    reference = _reference(checkpoint)
    _, _, question_ids, question_mask, _, _, labels = _inputs(model)
    with torch.no_grad():
        got = model(question_ids, question_mask, labels=labels)
        want = reference(input_ids=question_ids, attention_mask=question_mask.long(), labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_memory_equals_on_the_fly(checkpoint, tmp_path, dtype):
    """Precomputation changes nothing but cost: LUMEN on stored memory == LUMEN on memory computed now."""
    model = LumenModel.from_pretrained(str(checkpoint), live_fraction=0.5).eval()
    q_ids, p_ids, question_ids, question_mask, passage_ids, passage_mask, labels = _inputs(model)
    texts = passages(6)
    store = write_store(tmp_path / "store", checkpoint, texts, model.memory_layers, dtype=dtype)
    assert store.fingerprint == model.memory_fingerprint
    rows = torch.tensor([[5, 0, 3], [1, 4, 2]])  # any order
    batch = store.read(rows.reshape(-1))
    memory = batch.states.reshape(2, 3, *batch.states.shape[1:])
    memory_mask = batch.mask.reshape(2, 3, -1)
    ids, mask = pad_batch([p_ids[r] for r in rows.reshape(-1).tolist()], 0)
    with torch.no_grad():
        fly = model.memory_from_tokens(ids.reshape(2, 3, -1), mask.reshape(2, 3, -1))
        got = model(question_ids, question_mask, memory, memory_mask, labels=labels)
        rounded = model(question_ids, question_mask, fly.to(store.torch_dtype), memory_mask, labels=labels)
        exact = model(question_ids, question_mask, fly, memory_mask, labels=labels)
    # fp32 sums differ in the last bits between batched and single-passage encoding, so a bf16 value can round
    # one unit the other way: a few logits then differ at the 1e-4 level.
    close = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 1e-3, "atol": 1e-4}
    torch.testing.assert_close(got.logits, rounded.logits, **close)
    if dtype == "float32":
        torch.testing.assert_close(got.logits, exact.logits, rtol=1e-5, atol=1e-5)
    else:  # bf16 keeps 8 bits of mantissa: the logits move by about that much, not more
        torch.testing.assert_close(got.logits, exact.logits, rtol=0.05, atol=0.05)
        assert not torch.equal(got.logits, exact.logits)
    torch.testing.assert_close(got.loss, rounded.loss, **close)


def test_store_of_another_encoder_is_refused(tmp_path, checkpoint):
    model = LumenModel.from_pretrained(str(checkpoint), live_fraction=0.5)
    store = write_store(tmp_path / "store", checkpoint, passages(4), memory_layers=1)  # K=1, model wants K=2
    with pytest.raises(FingerprintMismatch, match="expected encoder"):
        MemoryStore.open(store.path, expected_fingerprint=model.memory_fingerprint)


def test_training_updates_live_parts_not_memory(checkpoint):
    model = LumenModel.from_pretrained(str(checkpoint), live_fraction=0.5).train()
    _, _, question_ids, question_mask, passage_ids, passage_mask, labels = _inputs(model)
    memory = model.memory_from_tokens(passage_ids, passage_mask)
    assert not memory.requires_grad
    model(question_ids, question_mask, memory, passage_mask, labels=labels).loss.backward()
    blocks = model.t5.encoder.block
    assert blocks[0].layer[0].SelfAttention.q.weight.grad is not None  # question encoder
    assert blocks[-1].layer[0].SelfAttention.q.weight.grad is not None  # live encoder
    assert model.t5.decoder.block[0].layer[1].EncDecAttention.q.weight.grad is not None
    assert all(p.grad is None for p in model.memory_encoder().parameters())
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and all(n.startswith("t5.") for n in names)


def test_encoder_only_checkpoint_is_a_clear_error(t5_v11_checkpoint):
    with pytest.raises(CheckpointError, match="full T5ForConditionalGeneration"):
        LumenModel.from_pretrained(str(t5_v11_checkpoint), live_fraction=0.5)
