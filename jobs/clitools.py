"""What every `premem` command shares: its options checked (Apache Beam's passed through, any other unknown one an
error naming the nearest known option), quiet Beam, one-line user errors, progress."""
from __future__ import annotations

import argparse
import difflib
import functools
import logging
import sys
import time

import click

# Every command that writes a store takes over the writer lease of a dead job with this flag (storage/lease.py).
force_unlock_option = click.option(
    "--force-unlock", is_flag=True,
    help="Take the store's writer lease even if another job holds it (only when that job is dead).")

# Commands in the order data flows through them (`premem --help` lists them so); others follow, sorted.
PIPELINE_ORDER = ("shard", "encode", "quantize", "index", "retrieve", "search", "train-lumen", "train-melodi", "eval-melodi",
                  "compress", "info", "verify", "demo", "lumen-demo")

# The passage template's default, for help texts without importing premem.models (torch); the commands pass
# None on and the configs fill in premem.models.DEFAULT_TEMPLATE (tests/test_cli.py checks the two agree).
DEFAULT_TEMPLATE_TEXT = "title: {title} context: {text}"

# Lines Beam logs on import on every run that say nothing about the job (on the root logger, so no level hides them).
_BEAM_NOISE = (
    "apitools not found, and bigquery client libraries are not available",
)


class _DropBeamNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_BEAM_NOISE))


def quiet_beam() -> None:
    """Keeps Beam's import and option chatter off stderr; real errors still reach the user (once, from run_job)."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropBeamNoise) for f in root.filters):
        root.addFilter(_DropBeamNoise())
    # Errors reach the user once, from run_job; Beam would log each worker failure's traceback as well.
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)


class PrememGroup(click.Group):
    """`premem`: its commands listed in pipeline order, each a PrememCommand unless it says otherwise."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands)
        return [n for n in PIPELINE_ORDER if n in names] + sorted(names - set(PIPELINE_ORDER))


class PrememCommand(click.Command):
    """A command whose unknown options are errors naming the nearest known option."""

    beam = False  # BeamCommand: options premem does not know may be Apache Beam pipeline options

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            own, beam_args = split_beam_args(args, _own_options(self, ctx), beam=self.beam,
                                             strict=not ctx.resilient_parsing)
        except click.UsageError as e:
            if e.ctx is None:  # so click prints the usage line and "Try 'premem CMD --help'"
                e.ctx, e.cmd = ctx, self
            raise
        super().parse_args(ctx, own)
        ctx.args = beam_args
        return ctx.args


PrememGroup.command_class = PrememCommand  # `@main.command()` makes one


class BeamCommand(PrememCommand):
    """A command that runs a Beam pipeline: any Apache Beam pipeline option (`--runner=...`, `--direct_num_workers 2`,
    `--save_main_session`) is passed to Beam unchanged, in ctx.args; an option neither premem nor Beam knows is an
    error."""

    beam = True

    def invoke(self, ctx: click.Context):
        from premem.jobs.remote import refuse_local_paths

        try:  # before anything is read or written: remote workers cannot see this machine's files
            refuse_local_paths(ctx.command.name, ctx.params, ctx.args)
        except _user_errors() as err:
            fail(err)
        return super().invoke(ctx)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", "Any Apache Beam pipeline option is passed to Beam, e.g. --runner=DataflowRunner "
                                    "--project=P --region=R, or --direct_num_workers=2 "
                                    "--direct_running_mode=multi_processing.")
        super().__init__(*args, **kwargs)


Arity = int | str  # values an option takes: a count, "?" (one if the next token is not an option) or "*"


def _own_options(command: click.Command, ctx: click.Context) -> dict[str, Arity]:
    """premem's option strings of ``command`` (help included) -> how many values each takes."""
    own: dict[str, Arity] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            takes = 0 if (param.is_flag or param.count) else param.nargs
            for name in (*param.opts, *param.secondary_opts):
                own[name] = takes
    return own


@functools.lru_cache(maxsize=1)
def beam_option_parser() -> argparse.ArgumentParser:
    """One parser holding the arguments of every PipelineOptions class Beam defines (as Beam's get_all_options
    builds it, subclasses of subclasses included)."""
    quiet_beam()
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False, conflict_handler="resolve", exit_on_error=False)
    seen: dict[str, type] = {}
    todo = list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if str(cls) not in seen:
            seen[str(cls)] = cls
            todo.extend(cls.__subclasses__())
    for cls in seen.values():
        cls._add_argparse_args(parser)  # how Beam's get_all_options collects them
    return parser


def beam_options() -> dict[str, Arity]:
    """Beam's option strings -> how many values each takes."""
    out: dict[str, Arity] = {}
    for name, action in beam_option_parser()._option_string_actions.items():
        nargs = action.nargs
        out[name] = 1 if nargs is None else "*" if nargs in ("*", "+", argparse.REMAINDER) else nargs
    return out


def split_beam_args(tokens: list[str], own: dict[str, Arity], *, beam: bool = True,
                    strict: bool = True) -> tuple[list[str], list[str]]:
    """Splits a command line into premem's tokens (its options with their values, and positionals, in order) and
    Beam's (``--name=value``, ``--name value``, flags), checking each option against premem's ``own`` options and
    Beam's option classes.  An option neither knows is a click.UsageError naming the nearest known option (skipped
    when not ``strict``)."""
    mine: list[str] = []
    theirs: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":  # the rest are positionals
            mine.extend(tokens[i:])
            break
        if not token.startswith("-") or token == "-" or _is_number(token):
            mine.append(token)
            i += 1
            continue
        name, eq, _ = token.partition("=")
        if not token.startswith("--"):  # short options: -k 4, -k4
            name, eq = token[:2], "" if len(token) == 2 else "="
        if name in own:
            take = _values(own[name], eq, tokens, i)
            mine.extend(tokens[i:i + 1 + take])
            i += 1 + take
            continue
        known = beam_options() if beam and token.startswith("--") else {}
        if name in known:
            take = _values(known[name], eq, tokens, i)
            theirs.extend(tokens[i:i + 1 + take])
            i += 1 + take
            continue
        if strict:
            raise _no_such_option(name, [*own, *known] if beam else list(own), beam)
        i += 1
    if theirs and strict:
        try:
            beam_option_parser().parse_known_args(theirs)
        except argparse.ArgumentError as e:
            raise click.UsageError(f"Apache Beam option {e.argument_name}: {e.message}") from None
    return mine, theirs


def _values(arity: Arity, eq: str, tokens: list[str], i: int) -> int:
    """How many tokens after tokens[i] are its values."""
    if eq:
        return 0
    rest = tokens[i + 1:]
    if arity == "?":
        return int(bool(rest) and not rest[0].startswith("-"))
    if arity == "*":
        return next((j for j, t in enumerate(rest) if t.startswith("-")), len(rest))
    return min(int(arity), len(rest))


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _no_such_option(name: str, known: list[str], beam: bool) -> click.UsageError:
    longs = [k for k in known if k.startswith("--")] or known
    close = difflib.get_close_matches(name, longs, n=1)
    nearest = close or difflib.get_close_matches(name, longs, n=1, cutoff=0.0)
    what = "neither a premem option nor an Apache Beam pipeline option" if beam else "not an option of this command"
    hint = f" Did you mean {close[0]}?" if close else f" The nearest known option is {nearest[0]}." if nearest else ""
    return click.UsageError(f"No such option: {name} ({what}).{hint}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from premem.storage.errors import PrememError

    return PrememError, click.ClickException


def fail(err: BaseException) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


def run_job(fn, *args, **kwargs):
    """Runs a job: an error the user can fix (a PrememError) becomes one line and exit code 2, a click exception
    click's usual message; anything else is a bug and keeps its traceback."""
    from premem.jobs.remote import DryRunBuilt, echo_report

    try:
        return fn(*args, **kwargs)
    except DryRunBuilt as built:  # --dry_run=True on a remote runner: the job was built, not run
        echo_report(built.report, click.echo)
        sys.exit(0)
    except Exception as err:  # Beam wraps worker errors: unwrap the user-facing ones
        cause = _find_user_error(err)
        if cause is None:
            raise
        if isinstance(cause, click.ClickException):
            raise cause from None
        fail(cause)


def _find_user_error(err: BaseException) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, _user_errors()):
            return err
        err = err.__cause__ or err.__context__
    return None


def ranges(values) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def listing(items) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    items = [str(i) for i in items]
    return " and ".join(items) if len(items) <= 2 else f"{', '.join(items[:-1])} and {items[-1]}"


class ProgressBar:
    """A tqdm bar over committed shards, fed by the store watcher.  On a terminal it redraws on every update; into a
    file or pipe (a log) it writes at most one line per ``log_interval`` seconds, and the last one on close."""

    log_interval = 30.0

    def __init__(self, enabled: bool, *, file=None, clock=time.monotonic):
        self.enabled = enabled
        self.file = file
        self.clock = clock
        self.bar = None
        self.last = None

    def __enter__(self):
        return self.update if self.enabled else None

    def _tty(self) -> bool:
        stream = self.file or sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)())

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        tty, now = self._tty(), self.clock()
        if self.bar is None:  # drawn once here
            interval = 0.1 if tty else self.log_interval
            self.bar = tqdm(total=total, initial=done, unit="shard", desc="encode", file=self.file or sys.stderr,
                            mininterval=interval, maxinterval=max(interval, 10.0))
            self.last = now
            return
        self.bar.n = done
        if tty or now - self.last >= self.log_interval:
            self.last = now
            self.bar.refresh()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
