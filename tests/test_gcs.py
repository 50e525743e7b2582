"""premem on gs:// against a real GCS JSON API (fake-gcs-server on loopback, tests/gcs_server.py): the whole chain
equal byte for byte to the same run on local disk, faults, and the one-line errors of bad object-storage input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse

import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.io.filesystems import FileSystems
from click.testing import CliRunner
from gcs_chain import BUCKET, cli, store_contents
from gcs_server import Proxy

from premem.jobs.cli import main
from premem.storage import MemoryStore, kv, layout, open_store
from premem.storage.lease import StoreLease
from premem.storage.verify import verify_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_chain_on_gcs_equals_local_byte_for_byte(gcs_chains):
    local, remote = gcs_chains["local"], gcs_chains["remote"]
    for sub in ("shards", "store", "longterm"):
        a, b = store_contents(f"{local}/{sub}", local), store_contents(f"{remote}/{sub}", remote)
        assert sorted(a) == sorted(b), sub
        for key in a:
            assert a[key] == b[key], f"{sub}/{key} differs"
    with FileSystems.open(f"{remote}/neighbors.parquet") as h, open(f"{local}/neighbors.parquet", "rb") as g:
        assert pq.read_table(h).equals(pq.read_table(g))
    assert sum(1 for k in store_contents(f"{remote}/store", remote) if k.startswith("memory/c/")) >= 2
    # train-lumen read the gs:// store, questions and neighbours through the loader: the same losses as on disk
    runs = [json.loads((gcs_chains["work"][w] / "train" / "metrics.json").read_text()) for w in ("local", "gcs")]
    assert runs[0]["curve"] and [p["loss"] for p in runs[0]["curve"]] == [p["loss"] for p in runs[1]["curve"]]


def test_store_reads_and_loader_on_gcs(gcs_chains):
    local, remote = gcs_chains["local"], gcs_chains["remote"]
    a, b = MemoryStore.open(f"{local}/store"), MemoryStore.open(f"{remote}/store")
    rows = [0, 5, 3, b.rows - 1]
    ma, mb = a.read(rows), b.read(rows)
    assert torch.equal(ma.lengths, mb.lengths) and torch.equal(ma.states.view(torch.int16), mb.states.view(torch.int16))
    lt_a, lt_b = open_store(f"{local}/longterm"), open_store(f"{remote}/longterm")
    docs = ["d0", "d7", "d11"]
    fa, fb = lt_a.long_term(docs, 1), lt_b.long_term(docs, 1)
    assert all(torch.equal(getattr(fa, f), getattr(fb, f)) for f in vars(fa) if isinstance(getattr(fa, f), torch.Tensor))
    ea, eb = lt_a.end_state(docs), lt_b.end_state(docs)
    assert torch.equal(ea.z, eb.z) and torch.equal(ea.fifo, eb.fifo) and torch.equal(ea.n_valid, eb.n_valid)


# ---------------------------------------------------------------------------------------------------------------
# Faults on gs://

def _encode_cmd(base: str, store: str) -> list[str]:
    return [sys.executable, "-m", "premem.jobs.cli", "encode", f"{base}/shards", "--store", store, "--encoder",
            f"{base}/t5", "--memory-layers", "1", "--compute-dtype", "float32", "--retriever", "memory-mean",
            "--no-progress"]


def _committed(store: str) -> int:
    return len(kv.list_keys(kv.open_kv(store), layout.COMMITS, store))


def _start_slowed(gcs, cmd: list[str], log, **env) -> tuple[subprocess.Popen, Proxy]:
    """``cmd`` in its own process group, every request of it 50 ms slower (a proxy), so it can be hit mid-job."""
    proxy = Proxy(gcs.url, latency=0.05)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url, "TENSORSTORE_GCS_HTTP_URL": proxy.url, **env}
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, proxy


def _wait_for_commits(proc, store: str, log, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while _committed(store) < 1:
        assert proc.poll() is None, open(log).read()
        assert time.monotonic() < deadline, open(log).read()
        time.sleep(0.05)
    return _committed(store)


def _same_as_chain(store: str, chain_store: str, base: str) -> None:
    a, b = store_contents(store, base), store_contents(chain_store, base)
    b = {k: v for k, v in b.items() if not k.startswith(layout.INDEX_DIR)}
    a[layout.MANIFEST].pop("index", None)
    b[layout.MANIFEST].pop("index", None)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == b[key], key


def test_sigkill_mid_encode_on_gcs_then_resume_is_identical(gcs, gcs_chains, tmp_path):
    base = gcs_chains["remote"]
    store = f"{base}/killed"
    proc, proxy = _start_slowed(gcs, _encode_cmd(base, store), tmp_path / "log")
    try:
        done = _wait_for_commits(proc, store, tmp_path / "log")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proxy.close()
    total = MemoryStore.open(f"{base}/store").num_shards
    assert 1 <= done < total
    info = CliRunner().invoke(main, ["info", store])  # progress of a store being written, from its markers alone
    assert info.exit_code == 0 and f"committed in {_committed(store)}/{total} shards (INCOMPLETE" in info.output
    cli(*_encode_cmd(base, store)[3:])  # the dead job's lease (this host, pid gone) is taken over at once
    _same_as_chain(store, f"{base}/store", base)


def test_server_down_mid_job_fails_in_one_line_and_the_rerun_completes(gcs, gcs_chains, tmp_path):
    base = gcs_chains["remote"]
    store = f"{base}/downed"
    proc, proxy = _start_slowed(gcs, _encode_cmd(base, store), tmp_path / "log", PREMEM_GCS_RETRIES="2")
    try:
        _wait_for_commits(proc, store, tmp_path / "log")
        gcs.stop()
        rc = proc.wait(timeout=240)
    finally:
        gcs.start()
        proxy.close()
    lines = [line for line in open(tmp_path / "log").read().splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, open(tmp_path / "log").read()
    assert "did not answer" in lines[0] and "rerun the same command" in lines[0], lines[0]
    report = verify_store(store)  # nothing half committed: every committed shard is whole
    assert report.committed_shards and not (set(report.bad_shards) - set(report.uncommitted_shards))
    cli(*_encode_cmd(base, store)[3:])
    _same_as_chain(store, f"{base}/store", base)


def test_lease_writes_send_generation_preconditions(gcs, monkeypatch):
    """fake-gcs-server ignores ifGenerationMatch, so what is shown is that every lease write sends one; real GCS
    refuses a write whose generation does not match (HTTP 412), which makes taking the lease a compare-and-swap."""
    proxy = Proxy(gcs.url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
    try:
        lease = StoreLease(f"{BUCKET}/leased", job="test", ttl=30)
        with lease:
            lease.renew()
            lease.check()
    finally:
        proxy.close()
    writes = [(m, path) for m, path, _ in proxy.take() if m in ("POST", "PUT", "DELETE", "PATCH")]
    lease_writes = [(m, path) for m, path in writes if "writer.json" in urllib.parse.unquote(path)]
    assert [m for m, _ in lease_writes] == ["POST", "POST", "DELETE"]  # take, renew, release
    for method, path in lease_writes:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        assert "ifGenerationMatch" in query, (method, path)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(lease_writes[0][1]).query)["ifGenerationMatch"] == ["0"]


def test_transient_errors_are_retried_with_backoff_and_counted(gcs, monkeypatch):
    proxy = Proxy(gcs.url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
    try:
        path = f"{BUCKET}/retried"
        kv.write_file(f"{path}/x.json", b"{}")
        before = kv.gcs_retries()
        proxy.fail, proxy.failures_left = (lambda record: record[0] == "GET"), 3
        proxy.fail_status = 503
        assert kv.read_file(f"{path}/x.json") == b"{}"
        proxy.failures_left, proxy.fail_status = 2, 429
        assert kv.read_file(f"{path}/x.json") == b"{}"
    finally:
        proxy.close()
    assert kv.gcs_retries() - before == 5


# ---------------------------------------------------------------------------------------------------------------
# Bad object-storage input: one line each, saying what to do

def _error(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, (args, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_gcs_input_is_one_line_each(gcs, gcs_chains):
    base = gcs_chains["remote"]
    assert _error("encode", f"{base}/shards", "--store", "gs://no-such-bucket-premem/store", "--encoder", f"{base}/t5",
                  "--memory-layers", "1", "--retriever", "none", "--no-progress") == (
        "error: cannot write locks/writer.json of store gs://no-such-bucket-premem/store: bucket no-such-bucket-premem "
        "does not exist: create it (gcloud storage buckets create gs://no-such-bucket-premem) or fix the bucket name")
    for missing in ("gs://no-such-bucket-premem/store", f"{base}/stroe"):
        assert _error("info", missing) == (
            f"error: no premem store at {missing} (manifest.json missing; or a bucket or path name is misspelt): "
            "run `premem encode` or `premem compress` first")
    assert _error("shard", f"{base}/corpus.jsnol", "--out", f"{base}/x", "--tokenizer", f"{base}/t5") == (
        f"error: no input file matches '{base}/corpus.jsnol': check the path or glob")
    other = _error("encode", f"{base}/shards", "--store", f"{base}/store", "--encoder", f"{base}/t5", "--memory-layers",
                   "2", "--retriever", "none", "--no-progress")
    assert other.startswith(f"error: store {base}/store holds memory of encoder ") and "use another --store" in other


def test_no_credentials_without_an_emulator_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                                           "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS")}
    env["HOME"] = str(tmp_path)
    env.pop("CLOUDSDK_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "premem.jobs.cli", "info", "gs://some-bucket/store"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: no Google Cloud credentials for gs:// paths: run `gcloud auth application-default login` or set "
        "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (for a local GCS emulator, set "
        "STORAGE_EMULATOR_HOST)")


def test_info_progress_rate_from_commit_markers():
    from premem.jobs.cli import _progress

    markers = [{"committed_at": f"2026-01-01T00:00:0{t}+00:00", "start": 8 * i, "stop": 8 * i + 8}
               for i, t in enumerate((0, 4, 8))]
    assert _progress(markers, {"rows": 48, "committed_rows": 24}) == {
        "rows_per_second": 2.0, "last_commit": "2026-01-01T00:00:08+00:00", "seconds_left": 12.0}
    assert _progress(markers[:1], {"rows": 48, "committed_rows": 8}) is None
