"""`premem train-lumen` and `premem lumen-demo`: LUMEN fine-tuning on stored memory."""
from __future__ import annotations

import click

from premem.jobs.clitools import PrememCommand, run_job
from premem.jobs.quantize import quantize_options, quantize_request


@click.command("train-lumen", cls=PrememCommand, short_help="Fine-tune a LUMEN model on stored memory.")
@click.option("--checkpoint", required=True, help="T5 checkpoint directory (T5ForConditionalGeneration layout).")
@click.option("--store", required=True, help="Memory store encoded from the same checkpoint (`premem encode`).")
@click.option("--questions", required=True,
              help="Questions: JSONL or FiD's JSON array with question, answers (or answer) and optionally id.")
@click.option("--neighbors", required=True, help="Neighbours Parquet file of the questions (`premem retrieve`).")
@click.option("--out", required=True, help="Directory for metrics.json and the fine-tuned model.")
@click.option("--eval-questions", default=None, help="Questions to evaluate exact match on (same formats).")
@click.option("--eval-neighbors", default=None, help="Neighbours file of --eval-questions (default: --neighbors).")
@click.option("-k", "k", type=int, default=None, help="Passages per question (default: all in the file; 0: none).")
@click.option("--memory-layers", type=int, default=None, help="K (default: the store's).")
@click.option("--steps", default=300, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--warmup-steps", default=20, show_default=True)
@click.option("--num-workers", default=0, show_default=True, help="DataLoader worker processes (spawned).")
@click.option("--prefetch", default=2, show_default=True, help="Batches read ahead of the step.")
@click.option("--device", default="auto", show_default=True)
@click.option("--eval-every", default=0, show_default=True, help="Steps between evaluations (0: at the end).")
@click.option("--seed", default=0, show_default=True)
@click.option("--accept-codec", type=click.Choice(["int8", "pq"]), default=None,
              help="Train on a quantized store's decoded memory (`premem encode --quantize`): its memory is not the "
                   "checkpoint's own states, so it is refused unless accepted.")
def train_lumen_command(checkpoint, store, questions, neighbors, out, eval_questions, eval_neighbors, k,
                        memory_layers, steps, batch_size, lr, warmup_steps, num_workers, prefetch, device, eval_every,
                        seed, accept_codec):
    """Fine-tune a LUMEN (question encoder, live encoder, FiD decoder) on stored memory; the frozen layers never run."""
    from premem.jobs.train_lumen import TrainConfig, train_lumen

    config = TrainConfig(checkpoint=checkpoint, store=store, questions=questions, neighbors=neighbors, out=out,
                         eval_questions=eval_questions, eval_neighbors=eval_neighbors, k=k,
                         memory_layers=memory_layers, steps=steps, batch_size=batch_size, lr=lr,
                         warmup_steps=warmup_steps, num_workers=num_workers, prefetch=prefetch, device=device,
                         eval_every=eval_every, seed=seed, accept_codec=accept_codec)
    result = run_job(train_lumen, config, progress=lambda p: click.echo(
        f"step {p['step']:>6}  loss {p['loss']:.4f}  ({p['seconds']:.0f} s)"))
    train = result["train"]
    click.echo(f"questions: {train['joined']} trained on ({train['without_neighbors']} without neighbours, "
               f"{train['rejected_lines']} bad lines set aside)")
    click.echo(f"steps: {result['steps']} at {result['step_seconds'] * 1000:.0f} ms/step, waiting for data "
               f"{result['data_wait_share']:.1%} of the time")
    for e in result.get("eval", []):
        click.echo(f"eval at step {e['step']}: exact match {e['exact_match']:.1%} on {e['questions']} questions, "
                   f"loss {e['loss']:.4f}")
    click.echo(f"metrics: {out}/metrics.json, model: {out}/model")


@click.command("lumen-demo", cls=PrememCommand,
               short_help="Shakespeare LUMEN demo: training with and without retrieval.")
@click.option("--workdir", default="out/lumen-demo", show_default=True)
@click.option("--plays", default=8, show_default=True, help="Plays in the corpus (at most 8).")
@click.option("--steps", default=150, show_default=True)
@click.option("-k", "k", default=4, show_default=True, help="Retrieved passages per question.")
@click.option("--live-fraction", default=0.5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True,
              help="torch intra-op threads (1: a tiny model on a shared CPU runs fastest on one).")
@quantize_options
def lumen_demo_command(workdir, plays, steps, k, live_fraction, seed, threads, quantize, pq_bytes, pq_factory,
                       quantize_seed, codebook_tokens):
    """Train a small random-T5 LUMEN on Shakespeare "which play has this line" questions, with and without retrieval."""
    import torch

    from premem.jobs.lumen_demo import run_lumen_demo

    torch.set_num_threads(threads)

    summary = run_job(run_lumen_demo, workdir, plays=plays, steps=steps, k=k, live_fraction=live_fraction, seed=seed,
                      log=click.echo,
                      quantize=quantize_request(quantize, pq_bytes, pq_factory, quantize_seed, codebook_tokens))
    click.echo(f"{'run':<14}{'first loss':>11}{'last loss':>11}{'eval EM':>9}")
    for name, run in summary["runs"].items():
        click.echo(f"{name:<14}{run['curve'][0]['loss']:>11.3f}{run['curve'][-1]['loss']:>11.3f}"
                   f"{run['eval'][-1]['exact_match']:>9.1%}")
    click.echo(f"details: {workdir}/demo.json")
