"""premem shard + encode against the model alone, side by side in one run, every figure a whole process.

Unseen documents: consecutive --words-per-doc pieces of Shakespeare's plays, a fresh work directory per run.
Each row below is one process, started cold, in this order (interleaved so machine load hits them alike):

  model-only limit    transformers AutoModel cut to K, bf16, the job's own length-sorted token-budget batches
                      (read from the shards), outputs dropped: the encode step at the model's speed
  premem shard        corpus -> tokenized Parquet shards
  premem encode       --retriever none: memory only
  two-model limit     the same plus the retriever (full MiniLM, bf16) on its own inputs, outputs dropped
  premem encode       default: memory + MiniLM retrieval vectors
  naive loop          fp32, batches of 64 padded to max tokens, synchronous fp16 memmap writes
  Beam RunInference   PytorchModelHandlerTensor (fp32 state dict, passages padded to max tokens, Beam batching)

Ratios are limit wall / job wall (1.0 = as fast as the model alone).  A short run on --small-docs documents
measures each side's fixed cost (imports, Beam start-up, model load) and gives the corpus size above which the
job is within 10% of the model alone.

    python benchmarks/encode.py                      # 300 documents of 1600 words, MiniLM K=4, CPU
    python benchmarks/encode.py --docs 400 --peer-docs 100
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


# ----------------------------------------------------------------------------------------------------------------
# Child processes: each prints one JSON line {"loop_s": ..., "tokens": ...} as its last line.

def _cut(checkpoint: str, k: int | None):
    """transformers' AutoModel with only its first k layers (None: all), eval mode."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint)
    if k is not None:
        if model.config.model_type == "t5":
            model = model.encoder
            model.block = model.block[:k]
            model.final_layer_norm = torch.nn.Identity()
        else:
            model.encoder.layer = model.encoder.layer[:k]
    return model.eval()


def _shard_tables(shards: str, docs: int | None = None):
    import pyarrow.parquet as pq

    index = json.loads((Path(shards) / "index.json").read_text())
    tables = [pq.read_table(Path(shards) / entry["path"]) for entry in index["shards"]]
    if docs is not None:  # the passages of the first `docs` documents
        import pyarrow as pa
        import pyarrow.compute as pc

        table = pa.concat_tables(tables)
        first = pc.unique(table["doc_id"]).to_pylist()[:docs]
        tables = [table.filter(pc.is_in(table["doc_id"], pa.array(first)))]
    return index, tables


def child_limit(args) -> dict:
    """The model alone on the job's batches (and with --retriever, the retriever alone on its inputs)."""
    import numpy as np
    import torch

    from premem.models import resolve_checkpoint
    from premem.models.encoder import token_budget_batches
    from premem.storage.tensors import pad_sequences

    index, tables = _shard_tables(args.shards)
    model = _cut(str(resolve_checkpoint(args.encoder)), args.memory_layers).to(torch.bfloat16)
    retriever = tokenizer = None
    if args.retriever:
        local = resolve_checkpoint(args.retriever)
        retriever = _cut(str(local), None).to(torch.bfloat16)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local)
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for table in tables:
            ids, lengths = table["token_ids"].to_pylist(), table["length"].to_numpy()
            for batch in token_budget_batches(lengths, 16384):
                input_ids, mask = pad_sequences([ids[i] for i in batch], 0)
                model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state.float()
            tokens += int(lengths.sum())
            if retriever is not None:
                texts = [f"{t}: {x}" for t, x in zip(table["title"].to_pylist(), table["text"].to_pylist())]
                rids = tokenizer(texts, truncation=True, max_length=256)["input_ids"]
                for batch in token_budget_batches(np.array([len(r) for r in rids]), 8192):
                    input_ids, mask = pad_sequences([rids[i] for i in batch], 0)
                    hidden = retriever(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
                    torch.nn.functional.normalize((hidden.float() * mask[..., None]).sum(1), dim=-1)
                tokens += sum(len(r) for r in rids)
    return {"loop_s": time.perf_counter() - started, "tokens": tokens}


def child_naive(args) -> dict:
    """What users write by hand: fp32, fixed batches of 64 padded to max tokens, synchronous fp16 memmap writes."""
    import numpy as np
    import torch

    from premem.models import resolve_checkpoint

    index, tables = _shard_tables(args.shards, args.docs)
    ids = [row for table in tables for row in table["token_ids"].to_pylist()]
    model = _cut(str(resolve_checkpoint(args.encoder)), args.memory_layers)
    width = index["max_tokens"]
    out = np.lib.format.open_memmap(Path(args.work) / "naive.npy", mode="w+", dtype=np.float16,
                                    shape=(len(ids), width, model.config.hidden_size))
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(ids), 64):
            chunk = ids[start:start + 64]
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                input_ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            out[start:start + len(chunk)] = hidden.numpy().astype(np.float16)
            out.flush()
    return {"loop_s": time.perf_counter() - started, "tokens": sum(len(r) for r in ids)}


def _cut_encoder_class():
    import torch
    from transformers import AutoConfig, AutoModel

    class Cut(torch.nn.Module):
        """What PytorchModelHandlerTensor builds from model_class(**model_params) and a state dict."""

        def __init__(self, checkpoint: str, memory_layers: int):
            super().__init__()
            model = AutoModel.from_config(AutoConfig.from_pretrained(checkpoint))
            model.encoder.layer = model.encoder.layer[:memory_layers]
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, attention_mask=(input_ids != 0).long()).last_hidden_state

    return Cut


def child_runinference(args) -> dict:
    """Beam's own route: RunInference + PytorchModelHandlerTensor on passages padded to max tokens (fp32)."""
    import apache_beam as beam
    import torch
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
    from apache_beam.options.pipeline_options import PipelineOptions

    from premem.models import resolve_checkpoint

    index, tables = _shard_tables(args.shards, args.docs)
    ids = [row for table in tables for row in table["token_ids"].to_pylist()]
    checkpoint = str(resolve_checkpoint(args.encoder))
    state = Path(args.work) / "cut_state.pt"
    torch.save(_cut(checkpoint, args.memory_layers).state_dict(), state)
    width = index["max_tokens"]
    padded = [torch.tensor(row + [0] * (width - len(row))) for row in ids]
    Cut = _cut_encoder_class()
    handler = PytorchModelHandlerTensor(state_dict_path=str(state), model_class=Cut,
                                        model_params={"checkpoint": checkpoint, "memory_layers": args.memory_layers},
                                        max_batch_size=64)
    # PytorchModelHandlerTensor loads state_dict keys of model_class(); the cut AutoModel lives under .model
    torch.save({f"model.{k}": v for k, v in torch.load(state).items()}, state)
    started = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as p:
        _ = (p | beam.Create(padded) | RunInference(handler)
             | beam.Map(lambda r: 1) | beam.CombineGlobally(sum))
    return {"loop_s": time.perf_counter() - started, "tokens": sum(len(r) for r in ids)}


# ----------------------------------------------------------------------------------------------------------------
# The driver.

def plays_as_documents(out: Path, docs: int, words: int) -> Path:
    """`docs` documents of `words` consecutive words, cut from Shakespeare's plays in order."""
    from premem.jobs.sample import write_plays_jsonl

    plays = write_plays_jsonl(out.with_name("plays.jsonl"))
    written = 0
    with out.open("w") as handle:
        for record in map(json.loads, plays.read_text().splitlines()):
            text = record["text"].split()
            for part, start in enumerate(range(0, len(text) - words + 1, words)):
                if written == docs:
                    return out
                handle.write(json.dumps({"id": f"{record['id']}-{part}", "title": f"{record['title']} ({part + 1})",
                                         "text": " ".join(text[start:start + words])}) + "\n")
                written += 1
    if written < docs:
        raise SystemExit(f"the plays hold only {written} documents of {words} words: ask for fewer")
    return out


def timed(cmd: list[str], log: Path) -> dict:
    """Run one process; its wall seconds, peak RSS and (for the children) their own JSON report (also appended to
    timings.jsonl beside the log, so an interrupted run keeps what it measured)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    result = dict(json.loads(lines[-1]) if lines else {}, wall=wall, rss_mib=usage.ru_maxrss / 1024)
    with (log.parent / "timings.jsonl").open("a") as handle:
        handle.write(json.dumps(dict(result, log=log.name)) + "\n")
    return result


def premem(*args) -> list[str]:
    return [sys.executable, "-m", "premem.jobs.cli", *map(str, args)]


def child(mode: str, work: Path, shards: Path, args, *extra) -> list[str]:
    return [sys.executable, __file__, "--child", mode, "--work", str(work), "--shards", str(shards),
            "--encoder", args.encoder, "-k", str(args.memory_layers), *map(str, extra)]


def measure(work: Path, docs: int, args, everything: bool) -> dict:
    corpus = plays_as_documents(work / f"docs-{docs}.jsonl", docs, args.words_per_doc)
    shards, runs = work / f"shards-{docs}", {}
    runs["shard"] = timed(premem("shard", corpus, "--out", shards, "--tokenizer", args.encoder, "--max-tokens",
                                 args.max_tokens), work / f"shard-{docs}.log")
    runs["limit"] = timed(child("limit", work, shards, args), work / f"limit-{docs}.log")
    encode = ["encode", shards, "--encoder", args.encoder, "-k", args.memory_layers, "--no-progress"]
    runs["none"] = timed(premem(*encode, "--store", work / f"none-{docs}", "--retriever", "none"),
                         work / f"none-{docs}.log")
    if everything:
        runs["limit2"] = timed(child("limit", work, shards, args, "--retriever", "minilm"), work / "limit2.log")
        runs["default"] = timed(premem(*encode, "--store", work / f"default-{docs}"), work / "default.log")
        peer = ["--docs", args.peer_docs] if args.peer_docs else []
        runs["naive"] = timed(child("naive", work, shards, args, *peer), work / "naive.log")
        runs["runinference"] = timed(child("runinference", work, shards, args, *peer), work / "runinference.log")
    index = json.loads((shards / "index.json").read_text())
    runs["passages"], runs["tokens"] = index["rows"], index["tokens"]
    return runs


def report(big: dict, small: dict, docs: int, small_docs: int, args) -> None:
    tokens = big["tokens"]
    limit, limit2 = big["limit"]["wall"], big["limit2"]["wall"]
    shard_none = big["shard"]["wall"] + big["none"]["wall"]
    shard_default = big["shard"]["wall"] + big["default"]["wall"]
    print(f"\ncorpus: {docs} documents of {args.words_per_doc} words (Shakespeare), {big['passages']} passages, "
          f"{tokens} tokens; {args.encoder} K={args.memory_layers}; CPU, torch threads {os.cpu_count()} cores")
    print(f"{'whole process':48s} {'wall s':>8s} {'tokens/s':>9s} {'in loop':>9s} {'vs limit':>9s} {'peak RSS':>9s}")

    def row(name, run, wall, ref, n=tokens):
        loop = f"{run['tokens'] / run['loop_s']:9.0f}" if run and "loop_s" in run else f"{'':9s}"
        print(f"{name:48s} {wall:8.1f} {n / wall:9.0f} {loop} {ref / wall if ref else 0:9.2f} "
              f"{run['rss_mib'] if run else 0:8.0f}M")

    row("model-only limit (memory model, K layers)", big["limit"], limit, limit)
    row("premem shard", big["shard"], big["shard"]["wall"], None)
    row("premem encode --retriever none", big["none"], big["none"]["wall"], limit)
    row("  premem shard + encode --retriever none", None, shard_none, limit)
    t2 = big["limit2"]["tokens"]
    row("model-only limit, memory model + retriever", big["limit2"], limit2, limit2, t2)
    row("premem encode (default: + MiniLM vectors)", big["default"], big["default"]["wall"], limit2, t2)
    row("  premem shard + encode (default)", None, shard_default, limit2, t2)
    for key, name in (("naive", "naive loop (fp32, 64 x max tokens, memmap)"),
                      ("runinference", "Beam RunInference + PytorchModelHandlerTensor")):
        run = big[key]
        # Peers may run on fewer documents: compared by tokens/s against the limit's tokens/s.
        ratio = (run["tokens"] / run["wall"]) / (tokens / limit)
        print(f"{name:48s} {run['wall']:8.1f} {run['tokens'] / run['wall']:9.0f} "
              f"{run['tokens'] / run['loop_s']:9.0f} {ratio:9.2f} {run['rss_mib']:8.0f}M"
              + (f"   ({run['tokens']} tokens)" if run["tokens"] != tokens else ""))
    # Fixed cost F and rate r per side from the two sizes: wall = F + tokens / r.
    def line(big_wall, small_wall):
        rate = (tokens - small["tokens"]) / (big_wall - small_wall)
        return small_wall - small["tokens"] / rate, rate

    f_job, r_job = line(shard_none, small["shard"]["wall"] + small["none"]["wall"])
    f_lim, r_lim = line(limit, small["limit"]["wall"])
    print(f"\nfixed cost (from {small_docs} vs {docs} documents): job (shard + encode) {f_job:.1f} s, model alone "
          f"{f_lim:.1f} s; rate job {r_job:.0f} tokens/s, model alone {r_lim:.0f} tokens/s")
    if r_job > r_lim / 1.1:
        need = (f_job - 1.1 * f_lim) / (1.1 / r_lim - 1 / r_job)
        per_token = tokens / docs
        print(f"within 10% of the model alone above ~{max(need, 0):.0f} tokens (~{max(need, 0) / per_token:.0f} "
              f"documents of {args.words_per_doc} words)")
    else:
        print("the job's steady rate is more than 10% below the model's: no corpus size closes the gap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("-k", "--memory-layers", type=int, default=4)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--small-docs", type=int, default=10)
    parser.add_argument("--words-per-doc", type=int, default=1600)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--peer-docs", type=int, default=None, help="documents for the naive and Beam peers")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--retriever", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = {"limit": child_limit, "naive": child_naive, "runinference": child_runinference}[args.child](args)
        result["rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="premem-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    small = measure(work, args.small_docs, args, everything=False)
    big = measure(work, args.docs, args, everything=True)
    (work / "runs.json").write_text(json.dumps({"big": big, "small": small}, indent=1))
    report(big, small, args.docs, args.small_docs, args)
    print(f"(all runs: {work}/runs.json; the machine is shared: compare the ratios, not the absolute seconds)")


if __name__ == "__main__":
    main()
