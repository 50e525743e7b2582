"""`premem verify STORE`: prove a store is whole, or name exactly which shards and rows are not."""
from __future__ import annotations

import json
import sys

import click

from premem.jobs.clitools import PrememCommand, fail, run_job
from premem.jobs.clitools import ranges as _ranges


def run_verify(store_path: str, *, sample: int = 0, seed: int = 0, device: str = "cpu", progress=None):
    """Structure + every chunk's checksum (premem.storage.verify), then ``sample`` rows re-encoded and compared."""
    from premem.storage import MemoryStore
    from premem.storage.verify import verify_store

    report = verify_store(store_path, progress=progress)
    if sample > 0 and report.kind == "lumen-memory" and report.committed_shards:
        from premem.jobs.recheck import recheck_rows, sample_rows

        store = MemoryStore.open(store_path)
        rows = sample_rows(store, sample, seed, exclude=report.bad_rows)
        bad_shards = set(report.bad_shards)
        rows = [int(r) for r in rows if store.shard_of(int(r)) not in bad_shards]
        result = recheck_rows(store, rows, device=device)
        report.sample = {"rows": len(result.rows), "max_error": result.max_error, "tolerance": result.tolerance,
                         "seed": seed}
        if result.problem:
            report.add("values", result.problem)
        for r, err in zip(result.rows, result.errors, strict=True):
            if r in result.bad_rows:
                report.add("values", f"re-encoded memory differs from the stored one: relative error {err:.3g} > "
                                     f"{result.tolerance:g}", shard=store.shard_of(r), rows=[r],
                           key=f"memory/c/{store.shard_of(r)}/0/0")
    return report


@click.command(cls=PrememCommand, short_help="Check a store is whole, or name its bad shards and rows.")
@click.argument("store")
@click.option("--sample", type=int, default=0, show_default=True,
              help="Also re-encode N random rows with the recorded encoder and compare them with the store.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --sample choice.")
@click.option("--device", default="cpu", show_default=True, help="Device for --sample re-encoding.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify(store, sample, seed, device, as_json):
    """Check a STORE: manifest against arrays, commit markers, every chunk's checksum, lengths, metadata.

    Exit code 0 when the store is whole, 1 when anything is wrong (each bad shard and row is listed), 2 when
    there is no store to check.
    """
    if sample < 0:
        fail(click.BadParameter(f"--sample must be >= 0, got {sample}"))
    report = run_job(run_verify, store, sample=sample, seed=seed, device=device)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        sys.exit(0 if report.ok else 1)
    click.echo(f"store:    {report.path} ({report.kind})")
    shards = (f"{len(report.committed_shards)}/{report.num_shards} committed shards, {report.checked_rows} rows, "
              if report.num_shards else "")  # kinds without a specific verifier: their arrays only
    click.echo(f"checked:  {shards}{report.checked_chunks} chunks decoded and checksummed, arrays "
               f"{', '.join(report.checked_arrays)} in {report.seconds:.1f} s")
    if report.sample is not None:
        s = report.sample
        click.echo(f"sample:   {s['rows']} rows re-encoded (seed {s['seed']}), max relative error {s['max_error']:.2e} "
                   f"(tolerance {s['tolerance']:g})")
    uncommitted = [p for p in report.problems if p.kind == "uncommitted"]
    others = [p for p in report.problems if p.kind != "uncommitted"]
    for p in others:
        click.echo(f"BAD {p.line()}")
    if uncommitted:
        shards = [p.shard for p in uncommitted]
        click.echo(f"INCOMPLETE: {len(shards)} shards not committed ({_ranges(shards)}): resume `premem encode`")
    if report.ok:
        click.echo("OK: the store is whole")
        return
    if others:
        bad = sorted({p.shard for p in others if p.shard is not None})
        click.echo(f"FAILED: {len(others)} problems in {len(bad)} shards ({_ranges(bad)}), rows "
                   f"{_ranges(sorted({r for p in others for r in p.rows})) or '-'}; rerun the encode command with "
                   f"--repair to redo exactly those shards")
    sys.exit(1)

