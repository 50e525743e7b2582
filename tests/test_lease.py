"""One writer per store: the lease refuses a second writer (naming the holder), expires, is renewed by its
heartbeat, is taken over from a dead holder, and stops a job that lost it from committing."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from resilience_data import encode_args, fault_inject_module, make_shards, start_premem, write_small_corpus

from premem.jobs.cli import main
from premem.storage import MemoryStore, StoreError
from premem.storage.lease import LEASE_KEY, LeaseHeld, LeaseLost, StoreLease, check_lease, read_lease
from premem.storage.verify import verify_store


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    store = tmp_path / "s"
    with StoreLease(store, job="premem encode") as first:
        with pytest.raises(LeaseHeld) as err:
            StoreLease(store, job="premem encode").acquire()
        msg = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in msg
        assert "lease expires" in msg and "--force-unlock" in msg and "premem encode" in msg
        assert read_lease(store).token == first.token
        check_lease(store, first.token)  # still ours
    assert read_lease(store) is None  # released
    StoreLease(store).acquire().release()  # free again


def test_only_one_of_many_simultaneous_writers_wins(tmp_path):
    store = tmp_path / "s"
    leases = [StoreLease(store) for _ in range(8)]
    won, refused = [], []
    start = threading.Barrier(len(leases))

    def take(lease):
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert read_lease(store).token == won[0].token
    won[0].release()


def test_expired_lease_is_taken_over_and_the_old_holder_stops(tmp_path):
    store = tmp_path / "s"
    old = StoreLease(store, ttl=0.3).acquire()  # no heartbeat: it stops renewing, like a hung job
    with pytest.raises(LeaseHeld):
        StoreLease(store).acquire()
    time.sleep(0.4)
    with pytest.raises(LeaseLost, match="expired"):
        check_lease(store, old.token)
    new = StoreLease(store).acquire()
    assert new.taken_over is not None and new.taken_over.token == old.token
    with pytest.raises(LeaseLost, match="taken over"):
        old.renew()
    with pytest.raises(LeaseLost, match="now held by"):
        check_lease(store, old.token)
    old.release()  # must not delete the new holder's lease
    assert read_lease(store).token == new.token
    new.release()


def test_heartbeat_keeps_a_running_job_s_lease(tmp_path):
    store = tmp_path / "s"
    with StoreLease(store, ttl=0.4) as lease:
        time.sleep(1.0)  # 2.5 ttls: alive only because the heartbeat renewed it
        with pytest.raises(LeaseHeld):
            StoreLease(store).acquire()
        check_lease(store, lease.token)
        assert read_lease(store).renewed_at > read_lease(store).started_at


def test_force_unlock_and_damaged_lease(tmp_path):
    store = tmp_path / "s"
    held = StoreLease(store, ttl=3600).acquire()
    forced = StoreLease(store, force=True).acquire()
    with pytest.raises(LeaseLost):
        held.renew()
    forced.release()
    (store / LEASE_KEY).write_text("not json")
    with pytest.raises(StoreError, match="not a premem writer lease.*--force-unlock"):
        StoreLease(store).acquire()
    StoreLease(store, force=True).acquire().release()
    (store / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        StoreLease(store / "file").acquire()


def test_a_writer_that_lost_its_lease_commits_nothing(tmp_path):
    path = tmp_path / "s"
    store = MemoryStore.create(path, rows=4, max_tokens=3, d_model=2, shard_size=2, fingerprint="f" * 64, encoder={})
    lease = StoreLease(path).acquire()
    store.lease_token = lease.token  # what a job hands its writers: every commit checks it first
    with store.shard_writer(0) as w:
        w.write([0, 1], np.ones((2, 3, 2), np.float32), [3, 2])
    StoreLease(path, force=True).acquire()  # another job takes over
    with pytest.raises(LeaseLost):
        with store.shard_writer(1) as w:
            w.write([2, 3], np.ones((2, 3, 2), np.float32), [3, 2])
    assert store.committed_shards() == {0} and not (path / "memory" / "c" / "1").exists()


def test_lease_of_a_killed_job_on_this_machine_is_taken_over_at_once(tmp_path):
    from resilience_data import _forkserver

    store = tmp_path / "s"
    ctx = _forkserver()  # a separate process, without paying for the imports again
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lease, args=(str(store), ready))
    proc.start()
    assert ready.wait(60)
    with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
        StoreLease(store).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    lease = StoreLease(store).acquire()  # an hour before expiry, but its holder is gone
    assert lease.taken_over.pid == proc.pid
    lease.release()


def _hold_lease(store: str, ready) -> None:
    StoreLease(store, ttl=3600).acquire()
    ready.set()
    time.sleep(600)


def test_two_concurrent_encode_jobs(tmp_path):
    """A real `premem encode` process holds the store; a second one is refused; the store verifies after."""
    fault = fault_inject_module()
    shards = make_shards(tmp_path / "shards", write_small_corpus(tmp_path / "plays.jsonl", words=300), shard_size=4)
    store = tmp_path / "store"
    first = start_premem(*encode_args(shards, store), log=tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while not (store / LEASE_KEY).exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = CliRunner().invoke(main, [str(a) for a in encode_args(shards, store)])
    first.join()
    assert first.exitcode == 0, (tmp_path / "first.log").read_text()
    assert second.exit_code == 2, second.output
    line = second.output.strip()
    assert line.startswith(f"error: store {store} is being written by another job: premem encode on host ")
    assert f"pid {first.pid}" in line and "--force-unlock" in line and len(line.splitlines()) == 1
    assert verify_store(store).ok
    assert fault.committed(store) == MemoryStore.open(str(store)).num_shards


def test_index_and_compress_jobs_take_the_lease_first(tmp_path):
    from premem.jobs.index import build_index
    from premem.jobs.melodi_run import run_compress

    store = tmp_path / "s"
    with StoreLease(store, job="premem encode"):
        with pytest.raises(LeaseHeld, match=r"being written by another job: premem encode on host"):
            build_index(str(store))
        with pytest.raises(LeaseHeld, match=r"being written by another job: premem encode on host"):
            run_compress([str(tmp_path / "docs.jsonl")], str(store), str(tmp_path / "ckpt"))
