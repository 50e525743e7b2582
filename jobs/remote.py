"""Jobs on a remote runner (Dataflow): paths the workers cannot see refused, and dry runs that build the job offline.

A remote runner's workers share nothing with the driver but object storage, so a local checkpoint, corpus, shard
directory or store is refused before anything is built.  ``--dry_run=True`` builds the Dataflow job from the same
transforms the job runs (Beam's DataflowRunner, which then stops before it creates a client) and writes nothing:
the driver-side steps that write (the writer lease, the store's manifest, the trained index) are skipped.
"""
from __future__ import annotations

import json
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from premem.storage.errors import InputError

# Beam runners that run on this machine: every other runner's workers see only what the job stages or object storage.
LOCAL_RUNNERS = frozenset({"directrunner", "switchingdirectrunner", "bundlebaseddirectrunner", "fnapirunner",
                           "prismrunner", "interactiverunner"})
# Values of path options that are not paths: models packaged into the worker image, or no model.
NOT_PATHS = frozenset({"minilm", "memory-mean", "none"})
# The path parameters of each Beam command, as (click parameter, how the user spells it).
PATH_PARAMS = {
    "shard": (("inputs", "INPUTS"), ("out", "--out"), ("tokenizer", "--tokenizer")),
    "encode": (("shards", "SHARDS"), ("store", "--store"), ("encoder", "--encoder"), ("retriever", "--retriever")),
    "index": (("store", "STORE"),),
    "retrieve": (("store", "STORE"), ("questions", "QUESTIONS"), ("out", "--out")),
    "compress": (("inputs", "INPUTS"), ("store", "--store"), ("checkpoint", "--checkpoint")),
}


def runner_name(pipeline_args: list[str] | None) -> str:
    runner = PipelineOptions(list(pipeline_args or [])).view_as(StandardOptions).runner
    if runner is None:
        return "DirectRunner"
    return runner if isinstance(runner, str) else type(runner).__name__


def is_remote(pipeline_args: list[str] | None) -> bool:
    return runner_name(pipeline_args).rsplit(".", 1)[-1].lower() not in LOCAL_RUNNERS


def is_dry_run(pipeline_args: list[str] | None) -> bool:
    return bool(PipelineOptions(list(pipeline_args or [])).view_as(TestOptions).dry_run)


def refuse_local_paths(command: str, params: dict, pipeline_args: list[str] | None) -> None:
    """With a remote runner, a local path among the command's path parameters is a one-line InputError."""
    if not is_remote(pipeline_args):
        return
    runner = runner_name(pipeline_args)
    for name, spelled in PATH_PARAMS.get(command, ()):
        values = params.get(name)
        for value in (values if isinstance(values, (list, tuple)) else [values]):
            if value is None or str(value) in NOT_PATHS or "://" in str(value):
                continue
            raise InputError(
                f"{spelled} {value} is a local path, which {runner}'s workers cannot read: copy it to object storage "
                f"(gcloud storage cp -r {value} gs://BUCKET/...) and pass the gs:// URL")


def _dry_runner():
    """Beam's DataflowRunner with ``--dry_run=True``: the job is built (pipeline proto, environment) and returned.
    (Imported here: it needs apache-beam[gcp].  Named DataflowRunner so Beam validates the options as for Dataflow.)"""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    class _DryRun(DataflowRunner):
        def run_pipeline(self, pipeline, options):
            options.view_as(TestOptions).dry_run = True
            return super().run_pipeline(pipeline, options)

    _DryRun.__name__ = "DataflowRunner"
    return _DryRun()


class DryRunBuilt(Exception):
    """Raised by a job asked for ``--dry_run=True`` once its Dataflow job is built; carries the job's report."""

    def __init__(self, report: dict):
        super().__init__(report["job_name"])
        self.report = report


def dry_run_if_asked(pipeline_args: list[str] | None, build) -> None:
    """With ``--dry_run=True`` and a remote runner: ``build(pipeline)`` (the job's own transforms) is built into a
    Dataflow job, not submitted, and DryRunBuilt raised; otherwise nothing happens.  Jobs call this before anything
    they write."""
    if not (is_dry_run(pipeline_args) and is_remote(pipeline_args)):
        return
    pipeline = beam.Pipeline(runner=_dry_runner(), options=PipelineOptions(list(pipeline_args or [])))
    build(pipeline)
    report = job_report(pipeline.run().job)
    if report["local_paths"]:
        raise InputError(f"the job's workers would read local paths {', '.join(report['local_paths'])}: copy them to "
                         "object storage (gcloud storage cp -r PATH gs://BUCKET/...) and pass gs:// URLs")
    raise DryRunBuilt(report)


def job_report(job) -> dict:
    """What Dataflow would get: the job's steps, the worker environment and the options that reach the workers."""
    from apache_beam.internal import pickler
    from apache_beam.portability import common_urns, python_urns
    from apache_beam.portability.api import beam_runner_api_pb2
    from apache_beam.runners.dataflow.internal import apiclient

    proto = job.proto_pipeline
    transforms = proto.components.transforms
    steps = [transforms[t].unique_name for root in proto.root_transform_ids for t in transforms[root].subtransforms] \
        or [transforms[t].unique_name for t in proto.root_transform_ids]
    do_fns, local_paths = [], set()
    for t in transforms.values():
        if t.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
            if payload.do_fn.urn != python_urns.PICKLED_DOFN_INFO:
                continue
            fn = pickler.loads(payload.do_fn.payload)[0]  # every DoFn unpickles as a worker would
            do_fns.append(type(fn).__name__)
            local_paths |= _local_paths(vars(fn) if hasattr(fn, "__dict__") else {})
    env = apiclient.Environment(packages=[], options=job.options, environment_version="dry-run",
                                proto_pipeline_staged_url="", proto_pipeline=proto).proto
    pool = env.worker_pools[0] if env.worker_pools else None
    sent = json.loads(type(env).to_json(env)).get("sdkPipelineOptions", {}).get("options", {})
    return {
        "job_name": job.proto.name,
        "steps": steps,
        "do_fns": sorted(set(do_fns)),
        "service_options": list(env.service_options),
        "experiments": list(env.experiments),
        "machine_type": pool.machine_type if pool else None,
        "sdk_container_images": [c.container_image for c in pool.sdk_harness_container_images] if pool else [],
        "worker_options": {k: sent[k] for k in sorted(sent) if k in _SHOWN_OPTIONS},
        "local_paths": sorted(local_paths),
    }


_SHOWN_OPTIONS = ("project", "region", "temp_location", "machine_type", "sdk_container_image", "max_num_workers",
                  "number_of_worker_harness_threads", "dataflow_service_options", "experiments", "disk_size_gb")


def _local_paths(obj, depth: int = 0) -> set[str]:
    """Absolute local paths that exist on this machine, anywhere in a DoFn's attributes."""
    found: set[str] = set()
    if depth > 4:
        return found
    if isinstance(obj, (str, os.PathLike)):
        s = os.fspath(obj)
        if isinstance(s, str) and s.startswith("/") and os.path.exists(s):
            found.add(s)
    elif isinstance(obj, dict):
        for v in obj.values():
            found |= _local_paths(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            found |= _local_paths(v, depth + 1)
    elif hasattr(obj, "__dataclass_fields__") or (hasattr(obj, "__dict__") and type(obj).__module__.startswith("premem")):
        found |= _local_paths(vars(obj), depth + 1)
    return found


def echo_report(report: dict, echo) -> None:
    echo(f"dry run: Dataflow job {report['job_name']} built, not submitted; nothing was written")
    echo(f"  steps: {', '.join(report['steps'])}")
    echo(f"  DoFns (pickled as workers load them): {', '.join(report['do_fns'])}")
    echo(f"  workers: machine {report['machine_type'] or 'default'}, image "
         f"{', '.join(report['sdk_container_images']) or 'default'}")
    echo(f"  service options: {'; '.join(report['service_options']) or 'none'}")
    echo(f"  experiments: {', '.join(report['experiments'])}")
    for k, v in report["worker_options"].items():
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        echo(f"  --{k}={','.join(map(str, v)) if isinstance(v, list) else v}")


# ---------------------------------------------------------------------------------------------------------------
# Dry-run builds of the jobs whose drivers write before their pipeline (lease, manifest, trained index): the same
# transforms, over every shard of the input.

def encode_job(shards_dir: str, store_path: str, config, retriever=None):
    def build(pipeline):
        from premem.pipeline.encode import EncodeShards
        from premem.pipeline.shard import read_index
        from premem.storage import kv, layout

        index = read_index(shards_dir)
        store = kv.normalize_path(store_path)
        _ = (pipeline
             | "Shards" >> beam.Create(index["shards"])
             | "EncodeShards" >> EncodeShards(shards_dir, store, config, config.describe()["fingerprint"],
                                              f"{store}/{layout.FAILURES}", retriever=retriever))
    return build


def index_job(store_path: str):
    def build(pipeline):
        from premem.pipeline.index import AddShardsToIndex
        from premem.storage import MemoryStore
        from premem.storage.embeddings import embedding_committed_shards

        store = MemoryStore.open(store_path)
        _ = (pipeline
             | "Shards" >> beam.Create(sorted(embedding_committed_shards(store)))
             | "AddShards" >> AddShardsToIndex(store.path, None))
    return build


def compress_job(inputs: list[str], store_path: str, checkpoint: str, *, docs_per_shard: int, docs_per_batch: int,
                 end_state: bool, device: str, fields, max_doc_chars: int):
    def build(pipeline):
        from premem.models.melodi_ckpt import load_checkpoint
        from premem.pipeline.compress import CompressConfig, CompressDocuments
        from premem.pipeline.read import expand_inputs
        from premem.storage import kv, layout

        loaded = load_checkpoint(checkpoint)
        cfg = CompressConfig(checkpoint=checkpoint, fingerprint=loaded.fingerprint, W=loaded.model.config.W,
                             docs_per_shard=docs_per_shard, docs_per_batch=docs_per_batch, end_state=end_state,
                             device=device)
        store = kv.normalize_path(store_path)
        _ = pipeline | "Compress" >> CompressDocuments(expand_inputs(inputs), store, cfg, f"{store}/{layout.REJECTS}",
                                                       fields, max_doc_chars)
    return build
