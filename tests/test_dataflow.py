"""Dataflow GPU jobs built offline (Beam's DataflowRunner with --dry_run=True) from the gs:// chain's outputs: the
steps, the GPU options that reach the workers, DoFns that unpickle, no local path, nothing written; and local paths
refused with a remote runner."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from gcs_chain import BUCKET

from premem.jobs.cli import main
from premem.storage import kv

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient", reason="pip install apache-beam[gcp]")

IMAGE = "us-docker.pkg.dev/my-project/premem/worker:0.1.0"
GPU = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
DATAFLOW = ["--runner=DataflowRunner", "--project=my-project", "--region=us-central1",
            f"--temp_location={BUCKET}/tmp", "--dry_run=True", f"--dataflow_service_options={GPU}",
            f"--sdk_container_image={IMAGE}", "--experiments=no_use_multiple_sdk_containers",
            "--machine_type=g2-standard-8", "--number_of_worker_harness_threads=1", "--max_num_workers=4"]


def objects(prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` with its generation."""
    store = kv.open_kv(prefix)
    return {k: kv.read(store, k, prefix).stamp.generation for k in kv.list_keys(store, "", prefix)}


def dry_run(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, *DATAFLOW])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


@pytest.mark.parametrize("command, steps, do_fn", [
    ("shard", ["Shard"], "WriteShardFn"),
    ("encode", ["Shards", "EncodeShards"], "EncodeShardFn"),
    ("index", ["Shards", "AddShards"], None),
    ("retrieve", ["Read", "Batch", "Search", "WriteParts", "AllRejects", "WriteRejects"], "SearchQuestionsFn"),
    ("compress", ["Compress"], None),
])
def test_dry_run_builds_the_gpu_job_and_writes_nothing(gcs_chains, command, steps, do_fn):
    base = gcs_chains["remote"]
    args = {
        "shard": ["shard", f"{base}/corpus.jsonl", "--out", f"{base}/dry-shards", "--tokenizer", f"{base}/t5"],
        "encode": ["encode", f"{base}/shards", "--store", f"{base}/dry-store", "--encoder", f"{base}/t5",
                   "--memory-layers", "1", "--retriever", "memory-mean"],
        "index": ["index", f"{base}/store", "--factory", "Flat"],
        "retrieve": ["retrieve", f"{base}/store", f"{base}/questions.jsonl", "--out", f"{base}/dry-neighbors.parquet"],
        "compress": ["compress", f"{base}/corpus.jsonl", "--store", f"{base}/dry-longterm", "--checkpoint",
                     f"{base}/melodi"],
    }[command]
    before = objects(base)
    out = dry_run(*args)
    assert objects(base) == before  # nothing written: no store, no lease, no index, no rejects, same generations
    assert "built, not submitted" in out
    lines = dict(line.strip().split(": ", 1) for line in out.splitlines()[1:] if ": " in line)
    assert lines["steps"].split(", ") == steps
    assert GPU in lines["service options"]
    assert "no_use_multiple_sdk_containers" in lines["experiments"]
    assert f"image {IMAGE}" in lines["workers"] and "machine g2-standard-8" in lines["workers"]
    assert "--number_of_worker_harness_threads=1" in out and "--max_num_workers=4" in out
    if do_fn:
        assert do_fn in lines["DoFns (pickled as workers load them)"]


def test_local_paths_are_refused_with_a_remote_runner(gcs_chains, tmp_path):
    base = gcs_chains["remote"]
    local_ckpt = tmp_path / "t5"
    local_ckpt.mkdir()
    result = CliRunner().invoke(main, ["encode", f"{base}/shards", "--store", f"{base}/never", "--encoder",
                                       str(local_ckpt), *DATAFLOW])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: --encoder {local_ckpt} is a local path, which DataflowRunner's workers cannot read: copy it to object "
        f"storage (gcloud storage cp -r {local_ckpt} gs://BUCKET/...) and pass the gs:// URL")
    result = CliRunner().invoke(main, ["index", str(tmp_path / "store"), *DATAFLOW])
    assert result.exit_code == 2 and "error: STORE " in result.output and "local path" in result.output
    assert objects(f"{base}/never") == {}
