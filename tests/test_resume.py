"""Resume after crashes: real `premem encode` processes SIGKILLed at random moments, a crash between a
shard's data and its commit marker, and a write failure mid-shard; every rerun ends identical to a clean run."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
from click.testing import CliRunner
from resilience_data import (
    encode_args,
    fault_inject_module,
    make_shards,
    start_premem,
    write_small_corpus,
)

from premem.jobs.cli import main
from premem.storage import MemoryStore
from premem.storage.verify import verify_store

fault = fault_inject_module()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    return make_shards(work / "shards", write_small_corpus(work / "plays.jsonl", words=900), shard_size=4)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, shards):
    """An uninterrupted run, in process; returns (store, seconds)."""
    store = tmp_path_factory.mktemp("clean") / "store"
    t0 = time.perf_counter()
    result = _cli(*encode_args(shards, store))
    assert result.exit_code == 0, result.output
    return store, time.perf_counter() - t0


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _shards_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("shards:"))


def test_sigkill_at_random_moments_then_resume_is_identical(tmp_path, shards, clean):
    clean_store, clean_seconds = clean
    store = tmp_path / "store"
    num_shards = MemoryStore.open(str(clean_store)).num_shards
    rng = random.Random(7)
    kills, seen = 0, []
    for attempt in range(6):
        proc = start_premem(*encode_args(shards, store), log=tmp_path / f"run{attempt}.log")
        if attempt == 0:  # once while it starts (model load, store creation) ...
            delay = rng.uniform(0.2, 2.0)
        else:  # ... then at a random moment of the work left, once the job holds the store
            deadline = time.monotonic() + 120
            while not (store / "locks" / "writer.json").exists() and proc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            delay = rng.uniform(0.0, 0.8) * clean_seconds * (1 - fault.committed(store) / num_shards)
        proc.join(timeout=delay)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join()
        seen.append((proc.exitcode, fault.committed(store), fault._partial_shards(store)))
    assert kills >= 5, seen
    assert [code for code, *_ in seen].count(-signal.SIGKILL) == kills

    result = _cli(*encode_args(shards, store))
    assert result.exit_code == 0, result.output
    line = _shards_line(result.output)
    assert line.startswith(f"shards: {num_shards} ({seen[-1][1]} already committed, skipped; "), (line, seen)
    assert fault.compare_stores(clean_store, store) == []
    report = verify_store(store)
    assert report.ok, [p.line() for p in report.problems]
    assert not (store / "locks" / "writer.json").exists()  # released at the end


class _Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it)."""


def test_crash_between_data_and_marker_redoes_the_shard(tmp_path, shards, clean, monkeypatch):
    import premem.storage.kv as kv_module

    store = tmp_path / "store"
    real_write = kv_module.write

    def dying_write(kv, key, value, path, if_equal=None):
        if key == "commits/shard-00002.json":  # shard 2's data is committed, its marker not yet
            raise _Crash()
        return real_write(kv, key, value, path, if_equal)

    monkeypatch.setattr(kv_module, "write", dying_write)
    with pytest.raises(BaseException, match="_Crash"):  # Beam re-raises it wrapped
        main.main([str(a) for a in encode_args(shards, store)], standalone_mode=False)
    monkeypatch.setattr(kv_module, "write", real_write)
    assert (store / "memory" / "c" / "2").exists() and not (store / "commits" / "shard-00002.json").exists()
    assert verify_store(store).uncommitted_shards  # the store is incomplete, and says so

    result = _cli(*encode_args(shards, store))
    assert result.exit_code == 0, result.output
    assert "1 redone after a partial write" in _shards_line(result.output), result.output
    assert fault.compare_stores(clean[0], store) == []


def test_write_failure_mid_shard_is_not_committed_and_rerun_completes(tmp_path, shards, clean):
    store = tmp_path / "store"
    # Every file may grow to 48 KiB: markers, metadata and small shards fit, the first memory shard does not.
    proc = start_premem(*encode_args(shards, store), log=tmp_path / "log", file_size_limit=48 << 10)
    proc.join()
    assert proc.exitcode == 2, (tmp_path / "log").read_text()
    lines = (tmp_path / "log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "file size limit" in lines[0] and "not committed" in lines[0] and "rerun `premem encode`" in lines[0]
    failed = int(lines[0].split("committing shard ")[1].split()[0])
    assert not (store / "commits" / f"shard-{failed:05d}.json").exists()

    result = _cli(*encode_args(shards, store))
    assert result.exit_code == 0, result.output
    assert "1 redone after a partial write" in _shards_line(result.output)  # its metadata was already written
    assert fault.compare_stores(clean[0], store) == []
    assert verify_store(store).ok
