"""Model cards: a ``README.md`` in every saved dual-encoder and cross-encoder, generated from the run.

The format is the one sentence-transformers writes (YAML front matter with ``library_name``,
``pipeline_tag``, ``tags`` and a ``model-index`` of the evaluation; then description, usage,
evaluation, training details, framework versions), so the Hugging Face Hub and
sentence-transformers read them as their own. Everything in a card comes from the run: the
config, the stages and their hashes, the data sizes and the metrics the stages measured.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Sequence

from data.beir import BeirData
from pipeline.config import DEMO, PipelineConfig
from pipeline.io import write_text_atomic
from pipeline.plan import PlannedStage
from pipeline.report import LABELS

DUAL_ENCODER_TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense-retrieval",
                     "knowledge-distillation"]
CARD_KEYS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "recall@1000")
CROSS_ENCODER_TAGS = ["sentence-transformers", "cross-encoder", "reranker", "knowledge-distillation"]
CITATION = """@article{lu2022erniesearch,
  title = {ERNIE-Search: Bridging Cross-Encoder with Dual-Encoder via Self On-the-fly Distillation for Dense Passage Retrieval},
  author = {Lu, Yuxiang and Liu, Yiding and Liu, Jiaxiang and Shi, Yunsheng and Huang, Zhengjie and Feng, Shikun and Sun, Yu and Tian, Hao and Wu, Hua and Wang, Shuaiqiang and Yin, Dawei and Wang, Haifeng},
  journal = {arXiv preprint arXiv:2205.09153},
  year = {2022}
}"""
WHAT_STAGES_TRAIN = {
    "posttrain": "the encoder, masked-LM on the corpus",
    "teacher": "the cross-encoder on (query, positive, hard negatives) groups",
    "scores": "nothing: a frozen hybrid teacher scores every training query's candidates once",
    "warmup": "the dual-encoder from the cross-encoder (ERNIE-Search's CE -> DE stage)",
    "refresh": "nothing: new hard negatives mined with the latest dual-encoder",
    "distill": "cross-encoder, ColBERT and dual-encoder jointly (CE -> ColBERT -> DE cascade)",
}


def write_model_cards(config: PipelineConfig, stages: Sequence[PlannedStage], name: str, results: dict,
                      data: BeirData, model_path: str) -> list[Path]:
    """Write ``README.md`` into the models stage ``name`` saved; returns the cards written.

    ``stages`` are the run's stages (those up to ``name`` are described); ``results`` holds the
    metrics measured so far, ``name`` included.
    """
    upto = list(stages)[: [s.name for s in stages].index(name) + 1]
    final = upto[-1].folder / "final"
    context = _Context(config, upto, results, data, model_path)
    cards = []
    if (final / "dual_encoder" / "modules.json").is_file():
        cards.append(final / "dual_encoder" / "README.md")
        write_text_atomic(cards[-1], dual_encoder_card(context, final / "dual_encoder"))
    for folder in (final / "cross_encoder", final):  # a distill stage's, or the teacher stage's
        config_file = folder / "config.json"
        if config_file.is_file() and "ForSequenceClassification" in "".join(json.loads(config_file.read_text()).get("architectures", [])):
            cards.append(folder / "README.md")
            write_text_atomic(cards[-1], cross_encoder_card(context, folder))
    return cards


class _Context:
    """What every card says about the run."""

    def __init__(self, config: PipelineConfig, stages: list[PlannedStage], results: dict, data: BeirData, model_path: str):
        self.config, self.stages, self.results, self.data, self.model_path = config, stages, results, data, model_path
        self.stage = stages[-1]

    @property
    def base_model(self) -> str | None:
        """A hub id, which the Hub links; None for a local folder or the demo."""
        name = self.config.model.name_or_path
        return None if name == DEMO or Path(name).exists() or name.startswith((".", "/", "~")) else name

    @property
    def base_model_text(self) -> str:
        name = self.config.model.name_or_path
        if name == DEMO:
            demo = self.config.demo
            return (f"the embedded demo's randomly initialised BERT ({demo.num_layers} layers, hidden {demo.hidden_size}, "
                    f"vocabulary {demo.vocab_size}; `{self.model_path}`)")
        return f"[{name}](https://huggingface.co/{name})" if self.base_model else f"`{name}`"

    @property
    def data_name(self) -> str:
        return "embedded demo (generated)" if self.config.data.path == DEMO else Path(self.config.data.path).name

    def eval_rows(self, model: str) -> str:
        """Every model the run measured so far, this one's row in bold."""
        keys = list(CARD_KEYS)
        lines = ["| stage / model | " + " | ".join(LABELS[k] for k in keys) + " |",
                 "| --- | " + " | ".join("---:" for _ in keys) + " |"]
        for stage, models in self.results.items():
            for label, metrics in models.items():
                cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys]
                this = stage == self.stage.name and label == model
                if this:
                    cells = [f"**{c}**" if c != "-" else c for c in cells]
                lines.append(f"| {stage} / {label}{' (this model)' if this else ''} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def front_matter(self, tags: list[str], pipeline_tag: str, model: str, title: str) -> str:
        from huggingface_hub import EvalResult, ModelCardData

        metrics = self.results[self.stage.name].get(model, {})
        split = self.config.eval.split
        card = ModelCardData(
            library_name="sentence-transformers", pipeline_tag=pipeline_tag, tags=tags, base_model=self.base_model,
            model_name=title, metrics=[k for k in CARD_KEYS if k in metrics],
            eval_results=[EvalResult(task_type="information-retrieval", task_name="Information Retrieval",
                                     dataset_type="beir", dataset_name=self.data_name, dataset_split=split,
                                     metric_type=k, metric_value=round(metrics[k], 4), metric_name=LABELS[k])
                          for k in CARD_KEYS if k in metrics] or None,
        )
        return "---\n" + card.to_yaml() + "\n---\n"

    def training_data(self) -> str:
        config, data = self.config, self.data
        train = data.judged_queries(config.data.train_split)
        negatives = next((s for s in reversed(self.stages[:-1]) if s.name == "refresh"), None)
        source = (f"{config.negatives.depth} BM25 hard negatives per query" if negatives is None else
                  f"hard negatives mined by the dual-encoder of `{negatives.folder.name}` (depth {config.refresh.depth})")
        held = f"; {config.data.dev_queries} judged training queries held out as `dev`" if config.data.dev_queries else ""
        return "\n".join([
            f"#### {self.data_name}", "",
            f"* Dataset: {'generated by `data/demo.py` (`demo` config section)' if config.data.path == DEMO else f'`{config.data.path}` (BEIR layout)'}",
            f"* Size: {len(train):,} training queries (split `{config.data.train_split}`{held}), "
            f"{len(data.corpus['_id']):,} passages",
            f"* Columns: query, positive passage, hard negatives ({source})",
            f"* Evaluated on: split `{config.eval.split}`, {len(data.judged_queries(config.eval.split)):,} judged queries",
        ])

    def stage_table(self) -> str:
        lines = ["| stage | folder | trains | loss terms (weight) | epochs | batch | lr |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
        for stage in self.stages:
            section = getattr(self.config, stage.name)
            train = getattr(section, "train", None)
            epochs = f"{train.epochs} (stopped at {train.max_steps} steps)" if train and train.max_steps else str(getattr(train, "epochs", "-"))
            numbers = [epochs, str(section.batch_size), f"{train.lr:g}"] if train else ["-", "-", "-"]
            lines.append(f"| {stage.name} | `{stage.folder.name}` | {WHAT_STAGES_TRAIN[stage.name]} | "
                         f"{_terms(stage.name, section)} | " + " | ".join(numbers) + " |")
        return "\n".join(lines)

    def hyperparameters(self) -> str:
        section = asdict(getattr(self.config, self.stage.name))
        shared = {f"{k}.{key}": v for k in ("model", "eval") for key, v in _flat(asdict(getattr(self.config, k))).items()}
        lines = [f"- `{self.stage.name}.{k}`: {v}" for k, v in _flat(section).items()]
        lines += [f"- `{k}`: {v}" for k, v in shared.items()] + [f"- `run.seed`: {self.config.run.seed}",
                                                                 f"- `run.mixed_precision`: {self.config.run.mixed_precision}"]
        return "<details><summary>Click to expand</summary>\n\n" + "\n".join(lines) + "\n\n</details>"

    def example(self) -> tuple[str, list[str]]:
        """A judged query of the eval split with its first relevant passage and one other passage."""
        split = self.config.eval.split
        query = self.data.judged_queries(split)[0]
        relevant = next(d for d, s in self.data.qrels[split][query].items() if s > 0)
        ids = list(self.data.corpus["_id"])
        texts = self.data.passage_texts()
        other = next(i for i, d in enumerate(ids) if d not in self.data.qrels[split][query])
        short = lambda text: text if len(text) <= 160 else text[:157] + "..."  # noqa: E731
        return short(self.data.query_texts([query])[0]), [short(texts[ids.index(relevant)]), short(texts[other])]


def dual_encoder_card(ctx: _Context, folder: Path) -> str:
    config, stage = ctx.config, ctx.stage
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text()) if (folder / "1_Pooling").is_dir() else {}
    modules = json.loads((folder / "modules.json").read_text())
    settings = json.loads((folder / "sentence_bert_config.json").read_text())
    architecture = json.loads((folder / "config.json").read_text()).get("architectures", ["?"])[0]
    normalized = any(m["type"].endswith("Normalize") for m in modules)
    dim = pooling.get("word_embedding_dimension", "?")
    mode = "mean over tokens" if pooling.get("pooling_mode_mean_tokens") else "[CLS] token"
    title = f"Dual-encoder, run {config.run.name}, stage {stage.folder.name}"
    query, passages = ctx.example()
    lines_of_modules = []
    for i, module in enumerate(modules):
        kind = module["type"].rsplit(".", 1)[-1]
        detail = {"Transformer": {**settings, "architecture": architecture}, "Pooling": pooling}.get(kind)
        lines_of_modules.append(f"  ({i}): {kind}({detail if detail is not None else ''})")
    return f"""{ctx.front_matter(DUAL_ENCODER_TAGS, "sentence-similarity", "dual-encoder", title)}
# {title}

This is a [sentence-transformers](https://www.SBERT.net) model trained by this project's ERNIE-Search-style pipeline, finetuned from {ctx.base_model_text} on the {ctx.data_name} dataset. It maps queries and passages to a {dim}-dimensional dense vector space and can be used for retrieval.

## Model Details

### Model Description
- **Model Type:** Sentence Transformer (dual-encoder, one tower shared by queries and passages)
- **Base model:** {ctx.base_model_text}
- **Maximum Sequence Length:** {settings.get('max_seq_length', '?')} tokens (passages were trained and evaluated at {config.eval.passage_max_len} content tokens + [CLS] and [SEP]; queries at {config.eval.query_max_len})
- **Output Dimensionality:** {dim} dimensions
- **Pooling:** {mode}{', L2-normalised' if normalized else ''}
- **Similarity Function:** {'Cosine Similarity (the vectors are normalised: the dot product the model was trained with)' if normalized else 'Dot Product'}
- **Training Dataset:** {ctx.data_name}

### Full Model Architecture

```
SentenceTransformer(
{chr(10).join(lines_of_modules)}
)
```

## Usage

### Direct Usage (Sentence Transformers)

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{folder}")
queries = model.encode({json.dumps([query])})
passages = model.encode({json.dumps(passages)})
print(model.similarity(queries, passages))
```

### With this project

```python
from models.dual_encoder import DualEncoder

model = DualEncoder.from_pretrained("{folder}")  # encode_queries / encode_passages on data.collate batches
```

```bash
python run_pipeline.py evaluate {folder} --data <BEIR folder>   # the stage's own evaluation on any dataset
```

The project truncates queries at `eval.query_max_len` and passages at `eval.passage_max_len` content tokens; sentence-transformers truncates both at the maximum sequence length above.

## Evaluation

### Metrics

#### Information Retrieval
* Dataset: `{ctx.data_name}`, split `{config.eval.split}`
* Evaluated with this project's evaluation (`pipeline/evaluate.py`): the corpus encoded, a FAISS `{config.eval.index.kind}` index, top {config.eval.top_k} per query; re-rankers score the dual-encoder's top {config.eval.rerank_depth}. Metrics as trec_eval computes them.

{ctx.eval_rows("dual-encoder")}

## Training Details

### Training Dataset

{ctx.training_data()}

### Training Stages

{ctx.stage_table()}

Loss terms are defined in the project's README (listwise contrastive `ce`/`col`/`de`, KL distillation `kl_*` between score distributions over each query's candidates, `attn` attention-map distillation, `dualreg` dropout consistency). Each stage folder's `train_log.jsonl` holds every term at every logging step.

### Training Hyperparameters

{ctx.hyperparameters()}

{_versions()}

## Citation

### BibTeX

```bibtex
{CITATION}
```
"""


def cross_encoder_card(ctx: _Context, folder: Path) -> str:
    config, stage = ctx.config, ctx.stage
    model_row = next((m for m in ctx.results[stage.name] if m.startswith("cross-encoder")), "cross-encoder")
    title = f"Cross-encoder, run {config.run.name}, stage {stage.folder.name}"
    query, passages = ctx.example()
    pairs = json.dumps([[query, p] for p in passages])
    return f"""{ctx.front_matter(CROSS_ENCODER_TAGS, "text-ranking", model_row, title)}
# {title}

This is a [Cross Encoder](https://www.sbert.net/docs/cross_encoder/usage/usage.html) model trained by this project's ERNIE-Search-style pipeline, finetuned from {ctx.base_model_text} on the {ctx.data_name} dataset. It scores (query, passage) pairs and can be used to re-rank retrieved passages.

## Model Details

### Model Description
- **Model Type:** Cross Encoder (one score per pair: the sequence-classification head on `[CLS] query [SEP] passage [SEP]`, one label)
- **Base model:** {ctx.base_model_text}
- **Maximum Sequence Length:** {config.eval.query_max_len + config.eval.passage_max_len + 3} tokens (queries {config.eval.query_max_len} and passages {config.eval.passage_max_len} content tokens, as trained)
- **Number of Output Labels:** 1 label
- **Training Dataset:** {ctx.data_name}

## Usage

### Direct Usage (Sentence Transformers)

```python
from sentence_transformers import CrossEncoder

model = CrossEncoder("{folder}")
print(model.predict({pairs}))  # sentence-transformers applies a sigmoid: the order is the model's
```

### Direct Usage (Transformers)

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
batch = tokenizer({json.dumps([query] * len(passages))}, {json.dumps(passages)}, padding=True, truncation=True, return_tensors="pt")
print(model(**batch).logits.squeeze(-1))
```

### With this project

```bash
python run_pipeline.py evaluate <dual-encoder> --data <BEIR folder> --rerank {folder}
```

## Evaluation

### Metrics

#### Re-ranking
* Dataset: `{ctx.data_name}`, split `{config.eval.split}`
* Evaluated with this project's evaluation (`pipeline/evaluate.py`): the top {config.eval.rerank_depth} candidates of the first-stage ranker re-ranked (the row names the candidates). Recall@1000 is not reported for re-rankers.

{ctx.eval_rows(model_row)}

## Training Details

### Training Dataset

{ctx.training_data()}

### Training Stages

{ctx.stage_table()}

### Training Hyperparameters

{ctx.hyperparameters()}

{_versions()}

## Citation

### BibTeX

```bibtex
{CITATION}
```
"""


def _terms(name: str, section) -> str:
    """The stage's loss terms with their weights, the ones switched off left out.

    >>> from pipeline.stages.configs import DistillConfig, PosttrainConfig
    >>> _terms("posttrain", PosttrainConfig())
    'mlm 1, mirror 1'
    >>> _terms("warmup", DistillConfig())
    'ce 1, col 1, de 1, kl_ce_col 1, kl_col_de 1, kl_ce_de 1, attn 1, dualreg 1; tau_de 0.05, tau_col 1, tau_ce 1, tau_attn 1'
    """
    from pipeline.stages.configs import POSTTRAIN_TERMS, SCORE_COMPONENTS

    if name == "posttrain":
        return ", ".join(f"{t} {getattr(section, t):g}" for t in POSTTRAIN_TERMS if getattr(section, t))
    if name == "teacher":
        return f"ce 1; tau {section.tau:g}"
    if name == "scores":
        return "fusion: " + ", ".join(f"{k.replace('_', '-')} {getattr(section, k):g}" for k in SCORE_COMPONENTS
                                      if getattr(section, k))
    if name in ("warmup", "distill"):
        from pipeline.stages.distill import term_weights

        weights = ", ".join(f"{t} {w:g}" for t, w in term_weights(section).items() if w)
        teacher = "; teacher: cached scores" if section.teacher == "scores" else ""
        return (f"{weights}; tau_de {section.tau_de:g}, tau_col {section.tau_col:g}, tau_ce {section.tau_ce:g}, "
                f"tau_attn {section.tau_attn:g}{teacher}")
    return "-"


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _versions() -> str:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    packages = [("Sentence Transformers", "sentence-transformers"), ("Transformers", "transformers"),
                ("PyTorch", "torch"), ("Accelerate", "accelerate"), ("Datasets", "datasets"), ("Tokenizers", "tokenizers"),
                ("FAISS", "faiss-cpu")]
    return "### Framework Versions\n- Python: " + platform.python_version() + "\n" + "\n".join(
        f"- {label}: {version(package)}" for label, package in packages)
