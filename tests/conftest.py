"""Shared fixtures: everything offline, tiny, generated, and written under pytest's tmp dirs."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# hypothesis caches unicode data and source constants (no examples: the tests set database=None), from
# collection on: in the temporary directory, not in the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / f"hypothesis-{os.getuid()}"))

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    """Keep the `datasets` Arrow cache out of the home directory and the repository."""
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(scope="session")
def small_spec():
    from data.demo import DemoSpec

    return DemoSpec(n_entities=30, n_train_queries=60, n_test_queries=20, vocab_size=600, hidden_size=32)


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory, small_spec):
    """(data dir, model dir) of a small generated demo: BEIR files, tokenizer and a tiny BERT."""
    from data.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("demo") / "demo", small_spec)


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dirs[1])


@pytest.fixture(scope="session")
def tiny_bert_path(demo_dirs) -> Path:
    """A saved tiny random ``BertForMaskedLM`` with its tokenizer (hidden 32, 2 layers, 2 heads)."""
    return demo_dirs[1]
