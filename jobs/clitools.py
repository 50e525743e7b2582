"""What every `premem` command shares: Beam argument pass-through, one-line user errors, progress."""
from __future__ import annotations

import sys

import click

BEAM_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True}


def _user_errors() -> tuple[type[BaseException], ...]:
    from premem.jobs.run import JobError
    from premem.models import CheckpointError
    from premem.pipeline.read import InputError
    from premem.storage import StoreError

    return JobError, CheckpointError, InputError, StoreError, FileNotFoundError, ValueError


def fail(err: BaseException) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


def run_job(fn, *args, **kwargs):
    """Runs a job, turning the errors a user can fix into one line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except _user_errors() as err:
        fail(err)
    except Exception as err:  # Beam wraps worker errors: unwrap the user-facing ones
        cause = _find_user_error(err)
        if cause is None:
            raise
        fail(cause)


def _find_user_error(err: BaseException) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, _user_errors()):
            return err
        err = err.__cause__ or err.__context__
    return None


def split_beam_args(tokens: list[str]) -> tuple[list[str], list[str]]:
    inputs = [t for t in tokens if not t.startswith("--")]
    beam_args = [t for t in tokens if t.startswith("--")]
    if not inputs:
        raise click.UsageError("give at least one input file, directory or glob")
    return inputs, beam_args


class ProgressBar:
    """A tqdm bar over committed shards, fed by the store watcher."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        return self.update if self.enabled else None

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="shard", desc="encode", file=sys.stderr)
        self.bar.n = done
        self.bar.refresh()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
