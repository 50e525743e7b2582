"""One writer per store: a lease object with an expiry, taken and renewed with conditional writes.

The lease is one small JSON object, ``locks/writer.json``, beside the store's data.  Every change to it
is a TensorStore kvstore write with an ``if_equal`` generation precondition (an atomic compare-and-swap
on local disks and on ``gs://``: GCS ``ifGenerationMatch``), never check-then-write, so of two jobs
starting at once exactly one gets the lease.  The holder renews it from a heartbeat thread while the job
runs; a job that dies stops renewing, and its lease can be taken over once it has expired, at once when
the dead holder ran on this machine (same host and boot, its pid is gone), or by force (``--force-unlock``).

Only jobs take a lease (premem.jobs).  Writers that run elsewhere (Beam workers) get the holder's token with
their store handle (``lease_token``), and every commit checks it first (storage/commits.py), so a job whose
lease was taken over stops committing instead of writing under another job.  The lease applies to any store
kind: it only needs the store's location.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import tensorstore as ts

from premem.storage import kv, layout
from premem.storage.errors import LeaseHeld, LeaseLost, StoreError, one_line

__all__ = ["DEFAULT_TTL", "LeaseHeld", "LeaseInfo", "LeaseLost", "StoreLease", "check_lease", "read_lease"]

LEASE_KEY = layout.LEASE
DEFAULT_TTL = 60.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (tells a reused pid from the original), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _pid_start(pid) in (None, start)


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease object says about its holder."""

    token: str
    job: str
    host: str
    pid: int
    pid_start: str | None
    boot_id: str | None
    started_at: float
    renewed_at: float
    expires_at: float
    ttl: float

    @classmethod
    def parse(cls, raw: bytes, where: str) -> LeaseInfo:
        try:
            d = json.loads(raw)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except Exception as e:
            raise StoreError(
                f"{where} is not a premem writer lease ({one_line(e)}): if no job is writing, "
                f"rerun with --force-unlock"
            ) from e

    def dump(self) -> bytes:
        d = dict(self.__dict__)
        d.update(started=_iso(self.started_at), expires=_iso(self.expires_at))
        return (json.dumps(d, indent=2) + "\n").encode()

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def holder_is_dead_here(self) -> bool:
        """True when the holder ran on this very machine (same host and boot) and its process is gone."""
        return (
            self.host == socket.gethostname()
            and self.boot_id is not None
            and self.boot_id == _boot_id()
            and not _pid_alive(self.pid, self.pid_start)
        )

    def describe(self) -> str:
        left = self.expires_at - time.time()
        when = f"in {left:.0f} s" if left > 0 else f"{-left:.0f} s ago"
        return (
            f"{self.job} on host {self.host}, pid {self.pid}, started {_iso(self.started_at)}, "
            f"lease expires {_iso(self.expires_at)} ({when})"
        )


class StoreLease:
    """The writer lease of one store; use as a context manager around everything a job writes.

    ``ttl``: seconds a lease stays valid without renewal; the heartbeat renews it every ``ttl / 4``.
    ``force``: take the lease whatever it says (the user vouches that the holder is dead).
    """

    def __init__(self, path, *, job: str = "premem", ttl: float = DEFAULT_TTL, force: bool = False) -> None:
        if not ttl > 0:
            raise StoreError(f"lease ttl must be positive, got {ttl!r}")
        self.path = kv.normalize_path(path)
        self.job = job
        self.ttl = float(ttl)
        self.force = force
        self.token = uuid.uuid4().hex
        self.taken_over: LeaseInfo | None = None  # the stale lease this one replaced, if any
        self._kv: ts.KvStore | None = None
        self._info: LeaseInfo | None = None
        self._generation: bytes | None = None
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquire / renew / release ---------------------------------------------------------------

    def acquire(self) -> StoreLease:
        kv.check_not_a_file(self.path)
        self._kv = kv.open_kv(self.path)
        for _attempt in range(5):
            res = self._read()
            if res.state == "value":
                held = LeaseInfo.parse(res.value, f"{self.path}/{LEASE_KEY}") if not self.force else None
                if held is not None and not held.expired() and not held.holder_is_dead_here():
                    raise LeaseHeld(
                        f"store {self.path} is being written by another job: {held.describe()}. Wait for it to "
                        f"finish; if that job is dead, rerun after the expiry or now with --force-unlock"
                    )
                self.taken_over = held if held is not None else self.taken_over
            now = time.time()
            info = LeaseInfo(
                token=self.token, job=self.job, host=socket.gethostname(), pid=os.getpid(),
                pid_start=_pid_start(os.getpid()), boot_id=_boot_id(), started_at=now, renewed_at=now,
                expires_at=now + self.ttl, ttl=self.ttl,
            )
            gen = self._write(info.dump(), res.stamp.generation)
            if gen:  # the compare-and-swap won
                self._info, self._generation = info, gen
                return self
            # another job changed the lease between our read and write: look again
        raise LeaseHeld(f"store {self.path}: could not take the writer lease, other jobs keep changing it; retry later")

    def renew(self) -> None:
        """Extend the expiry by ``ttl``; raises :class:`LeaseLost` when another job holds the lease now."""
        with self._lock:
            self._require_held()
            now = time.time()
            info = LeaseInfo(**{**self._info.__dict__, "renewed_at": now, "expires_at": now + self.ttl})
            gen = self._write(info.dump(), self._generation)
            if not gen:
                self._lost = f"the writer lease of store {self.path} was taken over by another job"
                raise LeaseLost(f"{self._lost}: this job stopped writing; rerun it to finish the store")
            self._info, self._generation = info, gen

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this job still holds a valid lease (call before each commit)."""
        with self._lock:
            self._require_held()
        check_lease(self.path, self.token)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease object if it is still ours."""
        self._stop_heartbeat()
        with self._lock:
            if self._generation is not None and self._lost is None:
                try:
                    self._kv.write(LEASE_KEY, None, if_equal=self._generation).result()
                except Exception:
                    pass  # it expires on its own
            self._generation = None

    def _require_held(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"{self._lost}: this job stopped writing; rerun it to finish the store")
        if self._generation is None:
            raise StoreError(f"the writer lease of store {self.path} is not held: acquire it first")

    def _read(self):
        return kv.read(self._kv, LEASE_KEY, self.path)

    def _write(self, value: bytes, if_equal: bytes) -> bytes:
        return kv.write(self._kv, LEASE_KEY, value, self.path, if_equal=if_equal).generation

    # --- heartbeat ---------------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLost:
                return
            except StoreError:
                if self._info is not None and self._info.expired():
                    self._lost = f"the writer lease of store {self.path} expired (renewals failed)"
                    return

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self) -> StoreLease:
        if self._generation is None:
            self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="premem-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def read_lease(path) -> LeaseInfo | None:
    """The current lease of the store at ``path`` (None when nobody holds one)."""
    path = kv.normalize_path(path)
    res = kv.read(kv.open_kv(path), LEASE_KEY, path)
    return LeaseInfo.parse(res.value, f"{path}/{LEASE_KEY}") if res.state == "value" else None


def check_lease(path, token: str) -> None:
    """Raise :class:`LeaseLost` unless the lease of ``path`` is held by ``token`` and unexpired.

    Every commit of a store handle with a ``lease_token`` calls this first (storage/commits.py): a job whose lease
    was taken over stops there instead of committing under the new holder.
    """
    held = read_lease(path)
    if held is None or held.token != token:
        who = f"now held by {held.describe()}" if held is not None else "released"
        raise LeaseLost(f"the writer lease of store {kv.normalize_path(path)} is {who}: this job stopped writing")
    if held.expired():
        raise LeaseLost(
            f"the writer lease of store {kv.normalize_path(path)} expired at {_iso(held.expires_at)} (its job stopped "
            f"renewing it): this job stopped writing; rerun it to finish the store"
        )
