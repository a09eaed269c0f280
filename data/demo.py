"""The embedded demo: a generated BEIR-layout dataset, a WordPiece tokenizer trained on it and a
small randomly initialised BERT, so the whole pipeline runs with no download.

The world behind the data: entities, and concepts grouped into topics. Each concept has three
surface forms (synonyms). A document describes one entity on one topic; a query names the entity
and two of the document's concepts, each in a form that differs from the document's with
probability ``synonym_rate``. The entity's other documents (other topics) are the natural hard
negatives, and some of them carry the query's exact forms as noise words, so BM25 is misled
exactly where it cannot see synonymy. A model that learns which forms belong to which topic
solves the task; lexical overlap alone does not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from data.fields import bounded

DEMO_FORMAT_VERSION = 1
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the generated world; the defaults keep every stage of the demo under a minute."""

    seed: int = bounded(13, ge=0)
    n_entities: int = bounded(240, ge=1)
    n_topics: int = bounded(6, ge=1)
    concepts_per_topic: int = bounded(12, ge=2, note="at least key_concepts")
    forms_per_concept: int = bounded(3, ge=2)
    n_fillers: int = bounded(40, ge=1)
    key_concepts: int = bounded(3, ge=2)  # a query names two of them
    noise_words: int = bounded(2, ge=0)
    filler_words: int = bounded(12, ge=0)
    synonym_rate: float = bounded(0.6, ge=0, le=1)
    n_train_queries: int = bounded(800, ge=1)
    n_test_queries: int = bounded(200, ge=1)
    vocab_size: int = bounded(2000, ge=len(SPECIAL_TOKENS) + 1)
    hidden_size: int = bounded(64, ge=1, note="a multiple of num_heads")
    num_layers: int = bounded(2, ge=1)
    num_heads: int = bounded(2, ge=1)
    max_positions: int = bounded(128, ge=8)


def _pseudo_words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def generate_beir(spec: DemoSpec) -> tuple[list[dict], list[dict], dict[str, list[tuple[str, str, int]]]]:
    """Corpus rows, query rows and qrels per split, deterministic from ``spec.seed``."""
    rng = np.random.default_rng(spec.seed)
    taken: set[str] = set()
    n_concepts = spec.n_topics * spec.concepts_per_topic
    forms = np.array(_pseudo_words(rng, n_concepts * spec.forms_per_concept, taken)).reshape(
        n_concepts, spec.forms_per_concept
    )  # (concepts, forms)
    entities = _pseudo_words(rng, spec.n_entities, taken)
    fillers = _pseudo_words(rng, spec.n_fillers, taken)
    all_forms = forms.reshape(-1)

    corpus, doc_concepts = [], []
    for e, entity in enumerate(entities):
        for topic in range(spec.n_topics):
            first = topic * spec.concepts_per_topic
            concepts = first + rng.choice(spec.concepts_per_topic, spec.key_concepts, replace=False)
            chosen = [forms[c, rng.integers(spec.forms_per_concept)] for c in concepts]
            noise = rng.choice(all_forms, spec.noise_words).tolist()
            words = chosen + noise + rng.choice(fillers, spec.filler_words).tolist()
            rng.shuffle(words)
            doc_id = f"d{e:04d}t{topic}"
            corpus.append({"_id": doc_id, "title": f"{entity} {rng.choice(fillers)}", "text": " ".join(words)})
            doc_concepts.append((entity, concepts, chosen))

    # Plant the forms a query will use into sibling documents, so lexical matching is misled.
    queries, qrels = [], {"train": [], "test": []}
    n_queries = spec.n_train_queries + spec.n_test_queries
    for q in range(n_queries):
        d = int(rng.integers(len(corpus)))
        entity, concepts, chosen = doc_concepts[d]
        picked = rng.choice(spec.key_concepts, 2, replace=False)
        words = [entity]
        for k in picked:
            form = chosen[k]
            if rng.random() < spec.synonym_rate:
                others = [f for f in forms[concepts[k]] if f != form]
                form = others[rng.integers(len(others))]
            words.append(form)
        words += rng.choice(fillers, 2).tolist()
        sibling = d - d % spec.n_topics + int(rng.integers(spec.n_topics))
        if sibling != d:
            corpus[sibling]["text"] += " " + " ".join(words[1:3])
        query_id = f"q{q:04d}"
        queries.append({"_id": query_id, "text": " ".join(words)})
        split = "train" if q < spec.n_train_queries else "test"
        qrels[split].append((query_id, corpus[d]["_id"], 1))
    return corpus, queries, qrels


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A lower-casing WordPiece tokenizer trained with the ``tokenizers`` library, wrapped for transformers.

    >>> tok = train_tokenizer(["alpha beta", "beta gamma"], vocab_size=60)
    >>> tok.convert_ids_to_tokens(tok("beta")["input_ids"])
    ['[CLS]', 'beta', '[SEP]']
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    texts = list(texts)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # The trainer breaks ties in hash-map order, which changes between processes, so the learned
    # intermediate pieces and all ids vary from run to run. Keep what is determined by the texts
    # (characters, and the whole words the trainer completed) and number it canonically, so the
    # same texts always give the same tokenizer and the same trained models. (This holds when
    # vocab_size lets the trainer complete every word, as the demo's default does.)
    learned = set(tok.get_vocab()) - set(SPECIAL_TOKENS)
    words = {w for text in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))}
    kept = sorted(t for t in learned if len(t.removeprefix("##")) == 1 or t in words)
    tok.model = models.WordPiece({t: i for i, t in enumerate(SPECIAL_TOKENS + kept)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tiny_bert(vocab_size: int, spec: DemoSpec = DemoSpec()):
    """A randomly initialised ``BertForMaskedLM`` (seeded), small enough to train on 2 CPU cores."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=4 * spec.hidden_size,
        max_position_embeddings=spec.max_positions,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return BertForMaskedLM(config)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _write_demo(root: Path, spec: DemoSpec) -> None:
    corpus, queries, qrels = generate_beir(spec)
    data_dir = root / "data"
    (data_dir / "qrels").mkdir(parents=True)
    _write_jsonl(data_dir / "corpus.jsonl", corpus)
    _write_jsonl(data_dir / "queries.jsonl", queries)
    for split, rows in qrels.items():
        with open(data_dir / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
    texts = [f"{row['title']} {row['text']}" for row in corpus] + [row["text"] for row in queries]
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    model = tiny_bert(len(tokenizer), spec)
    tokenizer.save_pretrained(root / "model")
    model.save_pretrained(root / "model")
    (root / "demo.json").write_text(json.dumps({"version": DEMO_FORMAT_VERSION, **asdict(spec)}, indent=1))


def built_demo(root: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> tuple[Path, Path] | None:
    """(data dir, model dir) of the demo already built under ``root`` from ``spec``; None if there is none."""
    root = Path(root)
    marker = root / "demo.json"
    if marker.exists() and json.loads(marker.read_text()) == {"version": DEMO_FORMAT_VERSION, **asdict(spec)}:
        return root / "data", root / "model"
    return None


def ensure_demo(root: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> tuple[Path, Path]:
    """Build the demo under ``root`` unless an identical one is there; returns (data dir, model dir).

    Built in a temporary sibling folder and renamed into place, so an interrupted build never
    leaves a half-written demo behind.
    """
    root = Path(root)
    built = built_demo(root, spec)
    if built is not None:
        return built
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write_demo(staging, spec)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / "data", root / "model"
