"""`premem train-melodi` and `premem compress`: MELODI training and long-term memory pre-encoding."""
from __future__ import annotations

import json

import click

from premem.jobs.clitools import BeamCommand, PrememCommand, fail, force_unlock_option, run_job

# A small shape that trains on a CPU in minutes (bytes: vocab 257). Its attention scale starts at 8, not the
# reference's 1: in a short run the scale hardly moves from 1 and attention never gets sharp enough to recall
# anything from memory (benchmarks/melodi_recall.py).
SMALL = dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, W=128, S=32, Su=32, L=16, Q_max=16,
             long_term_layer=2, vocab_size=257, dropout=0.0, attn_scale_init=8.0)


def model_config(name: str, overrides: tuple[str, ...]):
    """--config: 'small' (above), a paper name ('base', 'S192+L32', ...; vocab set to bytes) or a JSON file;
    then --set key=value overrides (JSON values)."""
    from premem.models.melodi import MelodiConfig

    kw = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use key=value, e.g. --set L=8", param_hint="--set")
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value
    try:
        if name == "small":
            return MelodiConfig(**{**SMALL, **kw})
        if name.endswith(".json"):
            base = MelodiConfig.from_json(name).to_dict()
            return MelodiConfig(**{**base, **kw})
        return MelodiConfig.named(name, **{"vocab_size": 257, **kw})
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        fail(ValueError(f"--config {name} {' '.join(overrides)}: {e}"))


@click.command("train-melodi", cls=PrememCommand, short_help="Train MELODI on long documents (bytes or a HF tokenizer).")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, help="Checkpoint directory; an existing one is resumed.")
@click.option("--config", "config_name", default="small", show_default=True,
              help="'small', a paper setting ('base', 'S128+L64', 'no-long-term', ...) or a config JSON file.")
@click.option("--set", "overrides", multiple=True, help="Override a config field, e.g. --set L=0 --set S=16.")
@click.option("--steps", default=1000, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Documents read side by side.")
@click.option("--segment-windows", default=4, show_default=True, help="Windows per segment (truncated BPTT).")
@click.option("--optimizer", type=click.Choice(["adamw", "adafactor"]), default="adamw", show_default=True,
              help="adafactor: the paper's (decay 0.8, momentum 0.9); the paper's schedule is --optimizer adafactor "
                   "--lr 0.01 --warmup-steps 1000 --min-lr-ratio 0.1.")
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--warmup-steps", default=50, show_default=True)
@click.option("--min-lr-ratio", default=0.1, show_default=True, help="Cosine decay from --lr to lr * this.")
@click.option("--device", default="auto", show_default=True,
              help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N; under torchrun each process uses its "
                   "LOCAL_RANK's GPU.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPUs and CPUs with native bf16, else fp32.")
@click.option("--heldout", default=2, show_default=True, help="The last N documents are held out.")
@click.option("--eval-every", default=100, show_default=True)
@click.option("--eval-tokens", default=None, type=int,
              help="Held-out tokens scored per document (default: whole documents).")
@click.option("--checkpoint-every", default=100, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--tokenizer", default="bytes", show_default=True,
              help="'bytes' or a Hugging Face tokenizer directory (e.g. T5's; set vocab_size to fit), saved into the "
                   "checkpoint; compress and eval-melodi use the checkpoint's.")
@click.option("--text-field", default="text", show_default=True)
def train_melodi(inputs, out, config_name, overrides, steps, batch_size, segment_windows, optimizer, lr,
                 warmup_steps, min_lr_ratio, device, precision, heldout, eval_every, eval_tokens, checkpoint_every,
                 seed, tokenizer, text_field):
    """Train MELODI on long documents (INPUTS: .jsonl/.parquet/.txt, as for `premem shard`).

    Several GPUs (or CPU processes, gloo): `torchrun --nproc_per_node N -m premem.jobs.cli train-melodi ...`;
    --batch-size is the global batch, split over the processes."""
    from premem.jobs.melodi_run import run_train_melodi
    from premem.models.melodi_train import TrainConfig, resolve_device
    from premem.pipeline.encode import cpu_has_native_bf16
    from premem.pipeline.read import FieldNames

    config = model_config(config_name, overrides)
    dev = run_job(resolve_device, device)
    bf16 = precision == "bf16" or (precision == "auto" and (dev.type == "cuda" or cpu_has_native_bf16()))
    tc = TrainConfig(steps=steps, batch_size=batch_size, segment_windows=segment_windows, optimizer=optimizer,
                     lr=lr, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, bf16=bf16, device=device,
                     eval_every=eval_every, eval_tokens_per_doc=eval_tokens, checkpoint_every=checkpoint_every,
                     seed=seed)
    result = run_job(run_train_melodi, list(inputs), out, config, tc, heldout=heldout,
                     fields=FieldNames(text=text_field), log=lambda m: click.echo(m, err=True), tokenizer=tokenizer)
    h = result["heldout"]
    click.echo(f"{result['steps']} steps on {result['documents'] - heldout} documents "
               f"({result['train_tokens']} tokens, {result['rejected']} rejected); checkpoint {out} "
               f"(fingerprint {result['fingerprint'][:16]})")
    if h:
        click.echo(f"held-out ({', '.join(result['heldout_ids'])}), whole documents: loss {h['loss']:.4f} nats/token, "
                   f"perplexity {h['ppl']:.3f}"
                   + "".join(f"; windows {k}: {v['ppl']:.3f}" for k, v in h.get("buckets", {}).items()))


@click.command(cls=BeamCommand, short_help="Pre-encode MELODI long-term memory of documents into a store.")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--store", required=True, help="Long-term memory store directory (local or gs://) to create or resume.")
@click.option("--checkpoint", required=True, help="MELODI checkpoint directory (from `premem train-melodi`).")
@click.option("--docs-per-shard", default=16, show_default=True, help="Documents per shard (one Beam element).")
@click.option("--docs-per-batch", default=8, show_default=True, help="Documents run side by side.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="float32",
              show_default=True, help="Stored dtype of increments and end states.")
@click.option("--end-state/--no-end-state", default=True, show_default=True,
              help="Also store each document's full recurrent state after its last window (runs the upper "
                   "layers too, not the output head).")
@click.option("--device", default="auto", show_default=True, help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N.")
@click.option("--text-field", default="text", show_default=True)
@force_unlock_option
@click.pass_context
def compress(ctx, inputs, store, checkpoint, docs_per_shard, docs_per_batch, dtype, end_state, device, text_field,
             force_unlock):
    """Pre-encode the long-term memory of every window of the documents in INPUTS into STORE."""
    from premem.jobs.melodi_run import run_compress
    from premem.models.melodi_train import resolve_device
    from premem.pipeline.read import FieldNames

    device = str(run_job(resolve_device, device))
    s = run_job(run_compress, list(inputs), store, checkpoint, docs_per_shard=docs_per_shard,
                docs_per_batch=docs_per_batch, dtype=dtype, end_state=end_state, device=device,
                fields=FieldNames(text=text_field), pipeline_args=ctx.args, force_unlock=force_unlock)
    rejects = s["rejects"]
    click.echo(f"{s['documents'] + len(rejects)} input records = {s['documents']} documents + {len(rejects)} rejected"
               + (f" (see {s['rejects_path']})" if rejects else ""))
    echo_longterm_summary(s)


def echo_longterm_summary(s: dict) -> None:
    """`premem compress` / `premem info` on a long-term memory store."""
    c = s["config"]
    click.echo(f"{s['documents']} documents, {s['tokens']} tokens, {s['windows']} windows "
               f"({s['tail_tokens']} tail tokens after the last whole windows, not compressed) in "
               f"{s['committed_shards']}/{s['num_shards']} shards under {s['path']}"
               + ("" if s["complete"] else " (INCOMPLETE: resume with `premem compress`)"))
    click.echo(f"long-term memory: {s['bytes'] / 2**20:.2f} MiB ({s['bytes_per_token']:.1f} B/token, {s['dtype']}, "
               f"L={c['L']} x d={c['d_model']} per window of W={c['W']}, FIFO of Q_max={c['Q_max']} windows"
               f"{', with end states' if s['end_state'] else ''}), checkpoint fingerprint {s['fingerprint'][:16]}")


@click.command("eval-melodi", cls=PrememCommand, short_help="Perplexity of whole documents, by window position.")
@click.argument("checkpoint")
@click.argument("docs", nargs=-1, required=True)
@click.option("--segment-windows", default=8, show_default=True, help="Windows per forward call (state carried).")
@click.option("--batch-size", default=8, show_default=True, help="Documents read side by side.")
@click.option("--max-tokens", default=None, type=int, help="Score at most this many tokens per document.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="fp32", show_default=True,
              help="auto: bf16 autocast on GPUs.")
@click.option("--text-field", default="text", show_default=True)
def eval_melodi(checkpoint, docs, segment_windows, batch_size, max_tokens, device, precision, text_field):
    """Score the documents of DOCS whole, each from a fresh state with its windows carried through, and print the
    perplexity per token overall and by window position (0, 1-3, 4-15, 16-63, 64+)."""
    from premem.jobs.melodi_run import run_eval_melodi
    from premem.pipeline.read import FieldNames

    r = run_job(run_eval_melodi, checkpoint, list(docs), segment_windows=segment_windows, batch_size=batch_size,
                max_tokens=max_tokens, device=device, precision=precision, fields=FieldNames(text=text_field))
    click.echo(f"{r['documents']} documents, {r['tokens']} tokens scored ({r['rejected']} records rejected, "
               f"{r['too_short']} shorter than one window of W={r['W']} set aside) on {r['device']}: "
               f"loss {r['loss']:.4f} nats/token, perplexity {r['ppl']:.3f}")
    click.echo("| windows | tokens | loss (nats/token) | perplexity |")
    click.echo("|---|---:|---:|---:|")
    for name, b in r["buckets"].items():
        click.echo(f"| {name} | {b['tokens']} | {b['loss']:.4f} | {b['ppl']:.3f} |")
