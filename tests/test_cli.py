"""The `premem` command line: unknown options are errors naming the nearest known one, Beam's own options pass
through, help is fast and in pipeline order, progress into a log is throttled."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from premem.jobs import clitools
from premem.jobs.cli import main
from premem.jobs.clitools import PIPELINE_ORDER, ProgressBar, split_beam_args

# Each command with its minimal required arguments, and a typo of one of its real options.
COMMANDS = {
    "shard": (["in.jsonl", "--out", "o", "--tokenizer", "minilm"], "--tokenzier", "--tokenizer"),
    "encode": (["sh", "--store", "st", "--encoder", "minilm", "-k", "4"], "--encodr", "--encoder"),
    "index": (["st"], "--factroy", "--factory"),
    "retrieve": (["st", "q.jsonl", "--out", "n.parquet"], "--question-feild", "--question-field"),
    "search": (["st", "a", "query"], "--widht", "--width"),
    "train-lumen": (["--checkpoint", "c", "--store", "st", "--questions", "q", "--neighbors", "n", "--out", "o"],
                    "--batch-sise", "--batch-size"),
    "compress": (["in.jsonl", "--store", "st", "--checkpoint", "c"], "--docs-per-shrd", "--docs-per-shard"),
    "train-melodi": (["in.jsonl", "--out", "o"], "--segment-window", "--segment-windows"),
    "eval-melodi": (["ck", "in.jsonl"], "--batch-sise", "--batch-size"),
    "info": (["st"], "--jsno", "--json"),
    "verify": (["st"], "--sampel", "--sample"),
    "demo": ([], "--workdri", "--workdir"),
    "lumen-demo": ([], "--stpes", "--steps"),
    "quantize": (["st", "--out", "o"], "--pq-byts", "--pq-bytes"),
}


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="premem")


def test_every_command_is_covered():
    assert set(COMMANDS) == set(main.list_commands(None))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_option_is_an_error_naming_the_nearest(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were: here
    args, typo, real = COMMANDS[command]
    started = time.perf_counter()
    result = _invoke(command, *args, "--definitely-not-an-option=1")
    assert result.exit_code == 2, result.output
    assert "No such option: --definitely-not-an-option" in result.output
    assert "nearest known option is --" in result.output or "Did you mean --" in result.output

    result = _invoke(command, *args, typo, "x")
    assert result.exit_code == 2, result.output
    assert f"No such option: {typo}" in result.output and f"Did you mean {real}?" in result.output
    assert f"premem {command} --help" in result.output
    assert time.perf_counter() - started < 30  # before any model loads or job runs (Beam's options: one import)
    assert list(tmp_path.iterdir()) == []


def test_quantize_is_not_silently_ignored():
    result = _invoke("encode", "sh", "--store", "st", "--encoder", "minilm", "-k", "4", "--quantize", "int4")
    assert result.exit_code == 2
    assert "'int4' is not one of 'none', 'int8', 'pq'" in result.output


def test_beam_option_typo_and_bad_value():
    result = _invoke("shard", "in.jsonl", "--out", "o", "--tokenizer", "t", "--direct-num-workers=2")
    assert result.exit_code == 2 and "Did you mean --direct_num_workers?" in result.output
    result = _invoke("shard", "in.jsonl", "--out", "o", "--tokenizer", "t", "--direct_num_workers=two")
    assert result.exit_code == 2 and "--direct_num_workers" in result.output and "invalid int value" in result.output
    result = _invoke("info", "st", "--runner=DirectRunner")  # not a Beam job: no Beam options
    assert result.exit_code == 2 and "No such option: --runner" in result.output


def test_split_beam_args_forms_and_positionals():
    own = {"--out": 1, "-k": 1, "--repair": 0, "--help": 0}
    tokens = ["a.jsonl", "--runner", "DirectRunner", "b.jsonl", "--save_main_session", "--direct_num_workers=2",
              "--out", "o", "-k", "4", "-k5", "--repair", "c.jsonl", "--direct_running_mode", "in_memory"]
    mine, beam = split_beam_args(tokens, own)
    assert mine == ["a.jsonl", "b.jsonl", "--out", "o", "-k", "4", "-k5", "--repair", "c.jsonl"]
    assert beam == ["--runner", "DirectRunner", "--save_main_session", "--direct_num_workers=2",
                    "--direct_running_mode", "in_memory"]
    # premem's own options never need Beam (so a command that is given none of Beam's never imports it)
    assert split_beam_args(["x", "--out=o"], own, beam=False) == (["x", "--out=o"], [])
    assert split_beam_args(["--", "--runner"], own) == (["--", "--runner"], [])


def test_beam_options_pass_through(tmp_path, minilm_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "title": f"T{i}", "text": f"word{i} " * (10 + i)}) + "\n"
                              for i in range(3)))
    second = tmp_path / "d.jsonl"
    second.write_text(json.dumps({"id": "e", "title": "E", "text": "more words here"}) + "\n")
    import premem.jobs.run as run

    seen = {}
    original = run.run_shard

    def run_shard(inputs, out, config, pipeline_args=None):
        seen["inputs"], seen["beam"] = inputs, pipeline_args
        return original(inputs, out, config, pipeline_args)

    monkeypatch.setattr(run, "run_shard", run_shard)
    # `--direct_num_workers 1` takes the next token; d.jsonl after a Beam flag is still an input
    result = _invoke("shard", corpus, "--direct_num_workers", "1", "--runner=DirectRunner", "--save_main_session",
                     second, "--out", tmp_path / "shards", "--tokenizer", minilm_path)
    assert result.exit_code == 0, result.output
    assert "4 input records = 4 accepted + 0 rejected" in result.output
    assert seen["inputs"] == [str(corpus), str(second)]
    assert seen["beam"] == ["--direct_num_workers", "1", "--runner=DirectRunner", "--save_main_session"]


def test_help_lists_commands_in_pipeline_order():
    result = _invoke("--help")
    assert result.exit_code == 0
    lines = result.output.split("Commands:")[1].splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert listed == [c for c in PIPELINE_ORDER if c in COMMANDS]
    assert all("..." not in line for line in lines)  # each help one whole line


def test_help_imports_nothing_heavy_and_warns_nothing():
    for args in (["--help"], ["encode", "--help"], ["shard", "--help"], ["train-lumen", "--help"]):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "premem.jobs.cli", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not imported & {"torch", "transformers", "apache_beam"}, args
        noise = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
        assert noise == [], noise
        assert "Usage: premem" in proc.stdout


def test_template_help_matches_the_models_default():
    from premem.models import DEFAULT_TEMPLATE

    assert clitools.DEFAULT_TEMPLATE_TEXT == DEFAULT_TEMPLATE


def test_beam_import_noise_is_filtered():
    import logging

    clitools.quiet_beam()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logging.warning("apitools not found, and bigquery client libraries are not available despite the import "
                        "not raising an ImportError.")
        logging.warning("a real warning")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue() == "a real warning\n"


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_is_throttled_when_not_a_tty():
    out, clock = io.StringIO(), _Clock()
    bar = ProgressBar(True, file=out, clock=clock)
    with bar as update:
        for done in range(1, 50):
            update(done, 100)
            clock.now += 0.5  # 49 updates over 24.5 s: the first line only
        assert out.getvalue().count("\r") == 1
        clock.now += 6  # 30 s after the first line
        update(60, 100)
        assert out.getvalue().count("\r") == 2 and "60/100" in out.getvalue()
        update(61, 100)
        assert out.getvalue().count("\r") == 2
    assert out.getvalue().endswith("\n") and "61/100" in out.getvalue().splitlines()[-1]  # the last state on close


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_on_a_tty():
    out, clock = _Terminal(), _Clock()
    with ProgressBar(True, file=out, clock=clock) as update:
        for done in range(1, 11):
            update(done, 10)
    assert out.getvalue().count("10/10") >= 1 and out.getvalue().count("\r") >= 10
    with ProgressBar(False) as update:
        assert update is None


def test_summary_without_hints(capsys):
    from premem.jobs.cli import _echo_summary

    summary = {"path": "st", "committed_rows": 4, "rows": 4, "committed_shards": 1, "num_shards": 1, "tokens": 41,
               "max_tokens": 256, "d_model": 384, "dtype": "bfloat16", "logical_bytes": 1000,
               "logical_bytes_per_token": 768, "fingerprint": "0" * 64, "encoder": {}}
    _echo_summary(summary)
    assert "add them with" in capsys.readouterr().out
    _echo_summary(summary, hints=False)
    out = capsys.readouterr().out
    assert "vectors:  none\n" in out and "index:    none\n" in out and "add them with" not in out


def test_run_job_errors():
    from premem.storage.errors import InputError, StoreError

    def raises(err):
        def job():
            raise err
        return job

    with pytest.raises(SystemExit) as exit_:
        clitools.run_job(raises(StoreError("no store at x: create it with `premem encode`")))
    assert exit_.value.code == 2
    try:  # as Beam wraps a worker's error
        raise InputError("bad line 3 of q.jsonl")
    except InputError as cause:
        wrapped = RuntimeError("Pipeline failed")
        wrapped.__cause__ = cause
    with pytest.raises(SystemExit):
        clitools.run_job(raises(wrapped))
    with pytest.raises(ValueError, match="a bug"):  # not a PrememError: a bug, its traceback kept
        clitools.run_job(raises(ValueError("a bug")))
    with pytest.raises(FileNotFoundError):
        clitools.run_job(raises(FileNotFoundError("x")))
