"""Store locations and their key-value stores: paths, reads, writes, compare-and-swap, JSON, listing.

Every file of a store (arrays, JSON, Parquet, index files) goes through a TensorStore kvstore, so a local
directory and ``gs://bucket/prefix`` behave the same.  Each helper turns a failure into a :class:`StoreError`
that names the key and the store, and for writes says what to do (disk full, read-only, no permission).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone

import tensorstore as ts

from premem.storage.errors import StoreError, one_line


def normalize_path(path: str | os.PathLike) -> str:
    """Canonical form of a store location: ``gs://bucket/prefix`` / ``s3://...`` or an absolute local path."""
    p = os.fspath(path)
    if not isinstance(p, str):
        p = p.decode()
    if p.startswith("file://"):
        p = p[len("file://"):]
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", p)
    if m:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme not in ("gs", "s3"):
            raise StoreError(f"unsupported store location {p!r}: use a local path or gs://bucket/prefix")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"store location {p!r} names no bucket: use {scheme}://bucket/prefix")
        prefix = prefix.strip("/")
        return f"{scheme}://{bucket}/{prefix}" if prefix else f"{scheme}://{bucket}"
    if not p:
        raise StoreError("empty store path: pass a directory or gs://bucket/prefix")
    return os.path.abspath(os.path.expanduser(p))


def is_local(path: str) -> bool:
    return "://" not in path


EMULATOR_TOKEN = "premem-storage-emulator"  # the bearer token TensorStore sends to a GCS emulator


def use_storage_emulator() -> str | None:
    """Points TensorStore's gcs kvstore at ``STORAGE_EMULATOR_HOST`` (the one variable Google's clients and Beam read),
    with a test token so it does not look for credentials; returns the emulator's URL, or None without one."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
    if not host:
        return None
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", EMULATOR_TOKEN)
    return url


_CREDENTIALS_FOUND = False


def check_gcs_credentials() -> None:
    """Without an emulator, gs:// needs Google credentials; with none, TensorStore would wait on the GCE metadata
    server instead of failing, so their absence is one line here."""
    global _CREDENTIALS_FOUND
    if _CREDENTIALS_FOUND or os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):
        return
    adc = os.path.join(os.environ.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud"),
                       "application_default_credentials.json")
    key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key and not os.path.isfile(key):
        raise StoreError(f"GOOGLE_APPLICATION_CREDENTIALS names {key}, which does not exist: point it at a "
                         "service-account key file or unset it")
    if key or os.path.isfile(adc) or os.environ.get("GCE_METADATA_HOST") or _on_gce():
        _CREDENTIALS_FOUND = True
        return
    raise StoreError("no Google Cloud credentials for gs:// paths: run `gcloud auth application-default login` or "
                     "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (for a local GCS emulator, "
                     "set STORAGE_EMULATOR_HOST)")


def _on_gce() -> bool:
    """A Compute Engine VM (Dataflow workers are): its metadata server holds the service account's credentials."""
    try:
        with open("/sys/class/dmi/id/product_name") as handle:
            return "Google" in handle.read()
    except OSError:
        return False


def kvstore_spec(path: str | os.PathLike, sub: str = "") -> dict:
    """TensorStore kvstore spec for ``path`` (local dir, ``gs://bucket/prefix``, ``s3://...``) joined with ``sub``.

    ``sub`` ending in ``/`` (or empty) gives a directory-like prefix whose keys are file names.
    """
    p = normalize_path(path)
    sub = sub.lstrip("/")
    if is_local(p):
        return {"driver": "file", "path": os.path.join(p, "") + sub}
    scheme, rest = p.split("://", 1)
    if scheme == "gs" and use_storage_emulator() is None:
        check_gcs_credentials()
    bucket, _, prefix = rest.partition("/")
    key = (prefix + "/" if prefix else "") + sub
    spec = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket, "path": key}
    if scheme == "gs":
        spec["context"] = gcs_context()
    return spec


def gcs_context() -> dict:
    """Requests in flight per process (a batch of random passages is hundreds of byte-range reads: they go out
    together) and retries of transient errors (429, 5xx, dropped connections) with exponential backoff, bounded so
    that an unreachable server fails the job in about a minute instead of retrying for a quarter of an hour.
    PREMEM_GCS_CONCURRENCY and PREMEM_GCS_RETRIES override the two."""
    return {
        "gcs_request_concurrency": {"limit": int(os.environ.get("PREMEM_GCS_CONCURRENCY", 64))},
        "gcs_request_retries": {"max_retries": int(os.environ.get("PREMEM_GCS_RETRIES", 6)),
                                "initial_delay": "0.5s", "max_delay": "16s"},
    }


def gcs_retries() -> int:
    """Requests to GCS this process has retried so far (TensorStore's own counter)."""
    found = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/gcs/retries")
    return sum(int(v.get("value", 0)) for m in found for v in m.get("values", []))


def check_not_a_file(path: str) -> None:
    if is_local(path) and os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"{path} is a file, not a premem store directory: pass a directory (or gs:// prefix)")


def open_kv(path: str) -> ts.KvStore:
    spec = kvstore_spec(path)
    try:
        return ts.KvStore.open(spec).result()
    except Exception as e:
        raise StoreError(f"cannot open store location {path} ({one_line(e)})") from e


def read(kv: ts.KvStore, key: str, path: str):
    """The kvstore's ReadResult for ``key`` (``.state == "value"`` when it exists)."""
    try:
        return kv.read(key).result()
    except Exception as e:
        found = _write_failure(e)
        if found is not None and found[0] == _UNREACHABLE[1]:
            raise StoreError(f"cannot read {key} of store {path}{found[0]} ({one_line(e)}): {found[1]}") from e
        raise StoreError(f"cannot read {key} of store {path} ({one_line(e)})") from e


def write(kv: ts.KvStore, key: str, value: bytes | None, path: str, if_equal: bytes | None = None):
    """Write (``value=None``: delete) ``key``; with ``if_equal`` a compare-and-swap on the key's generation
    (the result's ``generation`` is empty when another writer won)."""
    try:
        return kv.write(key, value, if_equal=if_equal).result()
    except Exception as e:
        if not is_local(path) and "NOT_FOUND" in str(e):  # an upload answered 404: no such bucket
            bucket = path.split("://", 1)[1].split("/", 1)[0]
            raise StoreError(f"cannot write {key} of store {path}: bucket {bucket} does not exist: create it "
                             f"(gcloud storage buckets create gs://{bucket}) or fix the bucket name") from e
        raise StoreError(
            f"cannot {'delete' if value is None else 'write'} {key} of store {path}{write_failure_hint(e)} "
            f"({one_line(e)}): {write_failure_fix(e)}"
        ) from e


def prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """Every key under ``prefix`` (which ends in ``/``), or exactly ``prefix`` and what extends it."""
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)) if prefix else ts.KvStore.KeyRange()


def list_keys(kv: ts.KvStore, prefix: str, path: str) -> list[str]:
    """Keys under ``prefix``, with the prefix stripped."""
    try:
        keys = kv.list(prefix_range(prefix), strip_prefix_length=len(prefix)).result()
    except Exception as e:
        raise StoreError(f"store {path}: cannot list {prefix or 'its files'} ({one_line(e)})") from e
    return [k.decode(errors="replace") for k in keys]


def delete_prefix(kv: ts.KvStore, prefix: str, path: str) -> None:
    try:
        kv.delete_range(prefix_range(prefix)).result()
    except Exception as e:
        raise StoreError(f"store {path}: cannot delete {prefix} ({one_line(e)}): {write_failure_fix(e)}") from e


def _split_url(url: str) -> tuple[str, str]:
    p = normalize_path(url)
    parent, _, name = p.rpartition("/")
    if not name or (not is_local(p) and "/" not in p.split("://", 1)[1]):
        raise StoreError(f"{url} names no file: pass a file path or gs://bucket/path/file")
    return parent, name


def read_file(url: str | os.PathLike) -> bytes | None:
    """The bytes of one file (local or gs://), or None when it does not exist."""
    parent, name = _split_url(os.fspath(url))
    res = read(open_kv(parent), name, parent)
    return res.value if res.state == "value" else None


def write_file(url: str | os.PathLike, data: bytes) -> None:
    """One file (local or gs://) written whole: an object store gets one upload under its final name."""
    parent, name = _split_url(os.fspath(url))
    write(open_kv(parent), name, data, parent)


def dump_json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def parse_json(raw: bytes, where: str) -> dict:
    try:
        obj = json.loads(raw)
    except Exception as e:
        raise StoreError(f"{where} is not valid JSON ({one_line(e)}): the store is damaged") from e
    if not isinstance(obj, dict):
        raise StoreError(f"{where} is not a JSON object: the store is damaged")
    return obj


def read_json(kv: ts.KvStore, key: str, path: str) -> dict | None:
    """The JSON object at ``key``, or None when it does not exist."""
    res = read(kv, key, path)
    return parse_json(res.value, f"{path}/{key}") if res.state == "value" else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_corruption(e: BaseException) -> bool:
    """TensorStore errors of stored bytes that fail their checksum / do not decode."""
    msg = str(e)
    return any(k in msg for k in ("DATA_LOSS", "Digest mismatch", "FAILED_PRECONDITION", "corrupt", "Corrupt"))


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


# An object store that stopped answering (TensorStore gave up retrying), on a read or a write.
_UNREACHABLE = (("UNAVAILABLE", "retry attempts failed", "Couldn't connect", "Connection refused", "DEADLINE_EXCEEDED"),
                ": the object store did not answer (retries exhausted)",
                "rerun the same command once it is reachable: committed shards are kept and the rest is redone")
# OS errors TensorStore reports on a failed write, and what they mean to the user.
_WRITE_FAILURES = (
    (("No space left", "ENOSPC", "os error 28", "OS error 28", "[28]"), ": the disk is full", "free space on the disk"),
    (("File too large", "EFBIG", "OS error 27", "[27]"), ": a file grew past the file size limit", "raise the file size limit"),
    (("Disk quota", "EDQUOT", "OS error 122"), ": the disk quota is exhausted", "free quota"),
    (("Read-only file system", "EROFS", "OS error 30"), ": the destination is read-only", "pass a writable --store"),
    (("Permission denied", "EACCES", "PERMISSION_DENIED", "OS error 13"), ": permission denied",
     "pass a --store this user may write"),
    _UNREACHABLE,
)


def _write_failure(e: BaseException) -> tuple[str, str] | None:
    msg = str(e)
    for needles, hint, fix in _WRITE_FAILURES:
        if any(n in msg for n in needles):
            return hint, fix
    return None


def write_failure_hint(e: BaseException) -> str:
    """': the disk is full' and the like for a failed write, or ''."""
    found = _write_failure(e)
    return found[0] if found else ""


def write_failure_fix(e: BaseException) -> str:
    """What to do about a failed write."""
    found = _write_failure(e)
    return found[1] if found else "check the destination"
