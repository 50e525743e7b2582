"""Kill a real `premem encode` with SIGKILL at random moments, resume it, and compare with a clean run.

    PREMEM_CACHE=/tmp/pcache python scripts/fault_inject.py --workdir /tmp/fault --kills 5

Steps: Shakespeare's plays -> `premem shard` -> a clean `premem encode` (timed) -> the same encode into a
second store, started and SIGKILLed (the whole process group, Beam workers included) at a random moment
of its remaining run, `--kills` times -> one last run to completion -> the two stores' `memory/` and
`lengths/` (and retrieval `embeddings/`) arrays compared byte for byte, their passage metadata and commit
markers compared, and
`premem verify` run on the resumed store.  Exit status 0 only when everything is identical.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tensorstore as ts


def premem(*args: str) -> list[str]:
    return [sys.executable, "-m", "premem.jobs.cli", *map(str, args)]


def encode_cmd(shards: Path, store: Path, extra: list[str]) -> list[str]:
    return premem("encode", shards, "--store", store, "--encoder", "minilm", "-k", 4, "--no-progress", *extra)


def run_to_end(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def committed(store: Path) -> int:
    return len(list((store / "commits").glob("shard-*.json"))) if (store / "commits").is_dir() else 0


def kill_at(cmd: list[str], delay: float) -> tuple[bool, str]:
    """Start ``cmd`` in its own process group and SIGKILL the group after ``delay`` s; (killed, stdout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=delay)
        return False, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return True, ""


def kill_and_resume(shards: Path, store: Path, num_shards: int, clean_seconds: float, kills: int, rng: random.Random,
                    extra: list[str], log=print) -> dict:
    """SIGKILL `premem encode` ``kills`` times at random moments of its remaining run, then let it finish."""
    cmd = encode_cmd(shards, store, extra)
    done_kills, attempts, events = 0, 0, []
    while done_kills < kills and attempts < 4 * kills:
        attempts += 1
        # At most a fifth of a clean run per attempt (start-up included), so all `kills` land before it completes.
        delay = rng.uniform(0.02, 0.2) * clean_seconds
        before = committed(store)
        killed, out = kill_at(cmd, delay)
        after = committed(store)
        partial = _partial_shards(store)
        events.append({"delay_s": round(delay, 2), "killed": killed, "committed_before": before,
                       "committed_after": after, "partial_left": partial})
        log(f"  run {attempts}: {'SIGKILL' if killed else 'finished'} after {delay:.1f} s, committed shards "
            f"{before} -> {after}/{num_shards}, partial shards left {partial}")
        if killed:
            done_kills += 1
        else:
            break  # finished before the kill: nothing more to interrupt
    seconds, out = run_to_end(cmd)
    line = next((x for x in out.splitlines() if x.startswith("shards:")), "")
    log(f"  final run ({seconds:.1f} s): {line}")
    return {"kills": done_kills, "events": events, "final_run": line, "final_seconds": seconds}


def _partial_shards(store: Path) -> list[int]:
    done = {int(m.group(1)) for p in (store / "commits").glob("*.json") if (m := re.match(r"shard-(\d+)", p.name))} \
        if (store / "commits").is_dir() else set()
    found = set()
    for p in (store / "memory" / "c").glob("*") if (store / "memory" / "c").is_dir() else []:
        found.add(int(p.name))
    for p in (store / "meta").glob("shard-*.parquet") if (store / "meta").is_dir() else []:
        found.add(int(p.name[6:11]))
    return sorted(found - done)


def read_array(store: Path, name: str) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / name) + "/"}}
    return ts.open(spec, open=True).result().read().result()


def compare_stores(a: Path, b: Path) -> list[str]:
    """Differences between two stores' arrays (byte for byte), metadata tables and commit markers."""
    diffs = []
    arrays = sorted(p.parent.name for p in a.glob("*/zarr.json"))  # memory, lengths, embeddings (retrieval)
    if arrays != sorted(p.parent.name for p in b.glob("*/zarr.json")):
        diffs.append(f"arrays differ: {arrays}")
    for name in arrays:
        x, y = read_array(a, name), read_array(b, name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            bad = int((x.view(np.uint8) != y.view(np.uint8)).reshape(x.shape[0], -1).any(axis=1).sum()) \
                if x.shape == y.shape else -1
            diffs.append(f"{name}/ differs ({bad} rows)")
    metas = sorted(p.name for p in (a / "meta").glob("*.parquet"))
    if metas != sorted(p.name for p in (b / "meta").glob("*.parquet")):
        diffs.append("meta/ files differ")
    for m in metas:
        if not pq.read_table(a / "meta" / m).equals(pq.read_table(b / "meta" / m)):
            diffs.append(f"meta/{m} differs")
    drop = ("committed_at", "commit_seconds")  # when, not what
    for markers in sorted({p.parent.name for p in a.glob("*commits/*.json")}):  # commits/, embedding-commits/
        names = sorted(p.name for p in (a / markers).glob("*.json"))
        if names != sorted(p.name for p in (b / markers).glob("*.json")):
            diffs.append(f"{markers}/ holds other markers")
        for name in names:
            q = b / markers / name
            ma, mb = json.loads((a / markers / name).read_text()), json.loads(q.read_text()) if q.exists() else {}
            if {k: v for k, v in ma.items() if k not in drop} != {k: v for k, v in mb.items() if k not in drop}:
                diffs.append(f"{markers}/{name} differs")
    if committed(a) != committed(b):
        diffs.append(f"{committed(a)} vs {committed(b)} committed shards")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="out/fault", type=Path)
    ap.add_argument("--plays", type=int, default=None, help="first N plays (default: all)")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean-store", type=Path, default=None,
                    help="compare with this store (made, or still being made, by another `premem encode` of the same "
                         "shards) instead of running the clean encode first; the kill loop then runs alongside it")
    ap.add_argument("--time-scale", type=float, default=None,
                    help="seconds an uninterrupted encode takes (kill moments are drawn from it); with --clean-store")
    ap.add_argument("--continue-faulty", action="store_true",
                    help="keep killing and resuming an existing faulty store of an interrupted earlier invocation")
    ap.add_argument("beam_args", nargs="*", help="passed to premem encode, e.g. --direct_num_workers=2")
    args = ap.parse_args()
    from premem.jobs.sample import write_plays_jsonl

    work = args.workdir
    clean = args.clean_store or work / "clean"
    if args.clean_store is not None and not args.time_scale:
        raise SystemExit("--clean-store needs --time-scale")
    for path in ([] if args.clean_store else [clean]) + ([] if args.continue_faulty else [work / "faulty"]):
        if path.exists():
            raise SystemExit(f"{path} exists: use a fresh --workdir")
    t_all = time.perf_counter()
    corpus = write_plays_jsonl(work / "plays.jsonl", limit=args.plays)
    shards = work / "shards"
    if not (shards / "index.json").exists():
        run_to_end(premem("shard", corpus, "--out", shards, "--tokenizer", "minilm", "--shard-size", args.shard_size))
    index = json.loads((shards / "index.json").read_text())
    n = index["num_shards"]
    print(f"corpus: {len(index['inputs'])} file(s), {index['rows']} passages in {n} shards of {args.shard_size}")
    if args.clean_store is None:
        clean_s, out = run_to_end(encode_cmd(shards, clean, args.beam_args))
        print(f"clean encode: {clean_s:.1f} s")
    else:
        clean_s = args.time_scale
    t0 = time.perf_counter()
    result = kill_and_resume(shards, work / "faulty", n, clean_s, args.kills, random.Random(args.seed), args.beam_args)
    faulty_s = time.perf_counter() - t0
    if args.clean_store is not None:
        while (clean / "locks" / "writer.json").exists() or not (clean / "manifest.json").exists():
            time.sleep(5)  # the other encode is still writing the clean store
        m = json.loads((clean / "manifest.json").read_text())
        print(f"clean store {clean}: created {m['created_at']}, finalized {m.get('finalized_at')}")
    diffs = compare_stores(clean, work / "faulty")
    verify = subprocess.run(premem("verify", work / "faulty"), capture_output=True, text=True)
    print(f"killed {result['kills']} times; killed + resumed runs took {faulty_s:.1f} s in all "
          f"({'clean run' if args.clean_store is None else 'time scale'} {clean_s:.1f} s); whole script "
          f"{time.perf_counter() - t_all:.1f} s")
    print("verify: " + (verify.stdout.strip().splitlines() or ["?"])[-1])
    arrays = ", ".join(sorted(p.parent.name for p in clean.glob("*/zarr.json")))
    print(f"arrays identical to the clean run ({arrays} byte for byte; meta/ and commit markers equal)" if not diffs
          else "DIFFERENT: " + "; ".join(diffs))
    return 0 if not diffs and verify.returncode == 0 and result["kills"] >= args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
