"""The streamed corpus encoding equals the whole-corpus one; float16 storage stays close to float32."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data.beir import load_beir
from data.collate import SpecialTokens, encoder_inputs, tokenize
from models.dual_encoder import DualEncoder
from pipeline.batches import PassageBatches, TokenizedText
from pipeline.evaluate import EvalConfig, dense_search, encode_texts
from pipeline.plan import base_key

FLOAT16_RTOL = 2.0**-11  # float16 keeps 11 significant bits: rounding moves a value by at most half that


@pytest.fixture(scope="module")
def demo(demo_dirs, tiny_tokenizer):
    data = load_beir(demo_dirs[0], ("train", "test"))
    model = DualEncoder.from_pretrained(demo_dirs[1], pooling="mean", normalize=True).eval()
    return data, model, tiny_tokenizer


def recording(encoder, batches: list):
    """``encoder``, keeping the input ids of every batch it encodes."""
    def encode(batch):
        batches.append(batch["input_ids"].clone())
        return encoder(batch)
    return encode


@torch.inference_mode()
def whole_corpus_vectors(encoder, tokenizer, texts, max_len, batch_size) -> np.ndarray:
    """The reference: every text tokenised in one call, encoded longest first in batches, as before streaming."""
    ids = tokenize(tokenizer, texts, max_len)
    order = np.argsort([-len(row) for row in ids], kind="stable")
    special = SpecialTokens.from_tokenizer(tokenizer)
    out = [None] * len(ids)
    for start in range(0, len(ids), batch_size):
        rows = order[start : start + batch_size]
        for row, vector in zip(rows, encoder(encoder_inputs([ids[i] for i in rows], special)).float()):
            out[row] = vector.numpy()
    return np.stack(out)  # (N, D)


def test_streamed_vectors_equal_the_whole_corpus_ones_bit_for_bit(demo):
    data, model, tokenizer = demo
    texts, batch_size = data.passage_texts(), 7
    count = len(texts)
    assert count % 14 and count % 7, "neither the chunk nor the batch may divide the corpus"
    batches = []
    expected = whole_corpus_vectors(recording(model.encode_passages, batches), tokenizer, texts, 48, batch_size)
    for chunk in (20, 5, count):  # 20 -> 14 texts (whole batches), 5 -> one batch, count -> one chunk
        seen = []
        streamed = encode_texts(recording(model.encode_passages, seen), tokenizer, data.passage_texts, count, 48,
                                batch_size, chunk)
        assert len(seen) == len(batches) and all(map(torch.equal, seen, batches))  # so any encoder gives the same
        assert streamed.dtype == np.float32
        np.testing.assert_array_equal(streamed, expected)


def test_a_chunked_dense_search_ranks_as_a_single_chunk(demo):
    data, model, tokenizer = demo
    query_ids = data.judged_queries("test")
    rankings = [dense_search(model.encode_queries, model.encode_passages, tokenizer, data, query_ids,
                             EvalConfig(top_k=50, passage_max_len=48, batch_size=7, encode_chunk=chunk))
                for chunk in (len(data.corpus), 20)]
    assert rankings[0] == rankings[1] and len(rankings[0]) == len(query_ids)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_search_from_vector_shards_on_disk_ranks_as_in_memory_and_leaves_no_file(demo, tmp_path, dtype):
    data, model, tokenizer = demo
    query_ids = data.judged_queries("test")
    config = EvalConfig(top_k=50, passage_max_len=48, batch_size=7, encode_chunk=20, vectors_dtype=dtype)
    folder = tmp_path / "vectors"
    in_memory, on_disk = (dense_search(model.encode_queries, model.encode_passages, tokenizer, data, query_ids,
                                       dataclasses.replace(config, vectors_dir=where))
                          for where in ("", str(folder)))
    assert on_disk == in_memory and len(on_disk) == len(query_ids)
    assert folder.is_dir() and not any(folder.iterdir())  # the shards were removed after the search


def test_a_failed_search_leaves_no_shard_behind(demo, tmp_path):
    data, model, tokenizer = demo
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder failed")
        return model.encode_passages(batch)

    config = EvalConfig(top_k=10, passage_max_len=48, batch_size=7, encode_chunk=7, vectors_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="encoder failed"):
        dense_search(model.encode_queries, failing, tokenizer, data, data.judged_queries("test"), config)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_a_shard_holds_the_vectors_in_length_order_and_reads_back_in_corpus_order(demo, tmp_path):
    data, model, tokenizer = demo
    count = 23
    whole = encode_texts(model.encode_passages, tokenizer, data.passage_texts, count, 48, 7, 20)
    shards = encode_texts(model.encode_passages, tokenizer, data.passage_texts, count, 48, 7, 20, folder=tmp_path,
                          dtype="float16")
    assert np.load(shards.paths[0]).dtype == np.float16
    whole = whole.astype(np.float16)
    assert shards.paths == (tmp_path / "rank-0.npy",) and shards.shape == whole.shape
    lengths = [len(ids) for ids in tokenize(tokenizer, data.passage_texts(range(count)), 48)]
    np.testing.assert_array_equal(np.load(shards.paths[0]), whole[np.argsort(-np.array(lengths), kind="stable")])
    np.testing.assert_array_equal(shards[:], whole)
    np.testing.assert_array_equal(shards[np.array([5, 2, 22])], whole[[5, 2, 22]])


def test_float16_vectors_are_float32_rounded_and_rank_nearly_alike(demo):
    data, model, tokenizer = demo
    count = len(data.corpus)
    half, full = (encode_texts(model.encode_passages, tokenizer, data.passage_texts, count, 48, 7, 20, dtype=dtype)
                  for dtype in ("float16", "float32"))
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=FLOAT16_RTOL, atol=1e-7)
    query_ids = data.judged_queries("test")
    config = EvalConfig(top_k=10, passage_max_len=48, batch_size=7, encode_chunk=20)
    top = {dtype: dense_search(model.encode_queries, model.encode_passages, tokenizer, data, query_ids,
                               dataclasses.replace(config, vectors_dtype=dtype))
           for dtype in ("float16", "float32")}
    overlap = np.mean([len(set(top["float16"][q]) & set(top["float32"][q])) / 10 for q in query_ids])
    assert overlap >= 0.9  # only near-ties may swap across the cut


def test_passages_are_tokenised_when_read_and_as_the_whole_corpus_would_be(demo):
    data, _, tokenizer = demo
    text = TokenizedText(tokenizer, data, data.judged_queries("test"), 16, 48)
    ids = data.corpus["_id"]
    assert len(text.passages) == len(ids) and not text.passages.cache  # nothing tokenised up front
    wanted = [ids[5], ids[2], ids[5]]
    expected = tokenize(tokenizer, data.passage_texts([5, 2, 5]), 48)
    assert [row.tolist() for row in text.passages.many(wanted)] == expected
    assert sorted(text.passages.cache) == sorted({ids[5], ids[2]})
    assert text.passages[ids[7]].tolist() == tokenize(tokenizer, data.passage_texts([7]), 48)[0]
    assert "no such passage" not in text.passages
    with pytest.raises(KeyError):
        text.passages["no such passage"]


def test_post_training_streams_the_corpus_one_batch_at_a_time(demo):
    data, _, tokenizer = demo
    text = TokenizedText(tokenizer, data, data.judged_queries("test"), 16, 48)
    batches = PassageBatches(text, 8, seed=3)
    assert batches.per_epoch == len(data.corpus["_id"]) // 8
    seen = []
    for index in range(batches.per_epoch):
        inputs, _ = batches.batch_at(1, index)
        seen += [tuple(row[1 : n + 1].tolist()) for row, n in zip(inputs["input_ids"], inputs["lengths"])]
    assert not text.passages.cache  # nothing kept: memory holds one batch, not the tokenised corpus
    # Every passage of the epoch's seeded order exactly once, tokenised as the whole corpus would be.
    order = np.random.default_rng([3, 1]).permutation(len(data.corpus["_id"]))[: 8 * batches.per_epoch]
    expected = tokenize(tokenizer, data.passage_texts([int(i) for i in order]), 48)
    assert seen == [tuple(ids) for ids in expected]
    again, _ = batches.batch_at(1, 2)
    assert torch.equal(again["input_ids"], batches.batch_at(1, 2)[0]["input_ids"])
    assert not torch.equal(batches.batch_at(0, 2)[0]["input_ids"], again["input_ids"])  # a new order per epoch


def test_the_chunk_size_and_vector_folder_are_in_no_stage_hash_and_the_vector_precision_is(demo_dirs):
    from pipeline.config import load_config

    data, model = demo_dirs
    keys = {tuple(o): base_key(load_config(None, list(o)), data, str(model))
            for o in ([], ["eval.encode_chunk=7"], ["eval.vectors_dir=/scratch"], ["eval.vectors_dtype=float16"])}
    assert keys[()] == keys[("eval.encode_chunk=7",)] == keys[("eval.vectors_dir=/scratch",)]
    assert keys[()] != keys[("eval.vectors_dtype=float16",)]
