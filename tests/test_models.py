"""Dual-encoder, ColBERT and cross-encoder: pooling, towers, masks, and loading in standard tools."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from data.collate import SpecialTokens, cross_inputs, encoder_inputs, tokenize
from models.colbert import ColBERT
from models.cross_encoder import CrossEncoder
from models.dual_encoder import DualEncoder



@pytest.fixture(scope="module")
def texts(tiny_tokenizer):
    """Three texts from the demo vocabulary, of very different lengths."""
    words = sorted(w for w in tiny_tokenizer.get_vocab() if w.isalpha() and len(w) > 3)
    return [" ".join(words[:3]), words[5], " ".join(words[7:19])]


def encode(tokenizer, texts, max_len=32):
    return encoder_inputs(tokenize(tokenizer, texts, max_len), SpecialTokens.from_tokenizer(tokenizer))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_matches_a_manual_computation(tiny_bert_path, tiny_tokenizer, texts, pooling):
    de = DualEncoder.from_pretrained(tiny_bert_path, pooling=pooling).eval()
    encoder = AutoModel.from_pretrained(tiny_bert_path).eval()
    batch = encode(tiny_tokenizer, texts)
    with torch.no_grad():
        reps = de.encode_queries(batch)
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for b, n in enumerate(batch["lengths"].tolist()):
        expected = hidden[b, 0] if pooling == "cls" else hidden[b, : n + 2].mean(dim=0)  # [CLS] x [SEP]
        torch.testing.assert_close(reps[b], expected, atol=1e-6, rtol=1e-5)


def test_normalize_and_pooler(tiny_bert_path, tiny_tokenizer, texts):
    plain = DualEncoder.from_pretrained(tiny_bert_path).eval()
    unit = DualEncoder.from_pretrained(tiny_bert_path, normalize=True, add_pooler=True).eval()
    batch = encode(tiny_tokenizer, texts)
    with torch.no_grad():
        out = unit(batch, side="passage")
        expected = torch.nn.functional.normalize(unit.query_pooler(plain.encode_passages(batch)), dim=-1)
    torch.testing.assert_close(out.reps, expected)
    torch.testing.assert_close(out.reps.norm(dim=-1), torch.ones(len(texts)))
    assert out.last_hidden_state.shape == (*batch["input_ids"].shape, plain.hidden_size)


def test_shared_and_separate_towers(tiny_bert_path, tiny_tokenizer, texts):
    shared = DualEncoder.from_pretrained(tiny_bert_path).eval()
    separate = DualEncoder.from_pretrained(tiny_bert_path, shared=False).eval()
    assert shared.shared and not separate.shared
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in separate.parameters()) == 2 * n_shared
    batch = encode(tiny_tokenizer, texts)
    with torch.no_grad():
        torch.testing.assert_close(shared.encode_queries(batch), shared.encode_passages(batch))
        query = separate.encode_queries(batch)
        torch.testing.assert_close(query, separate.encode_passages(batch))
        separate.passage_encoder.embeddings.word_embeddings.weight.mul_(2.0)
        torch.testing.assert_close(separate.encode_queries(batch), query)
        assert not torch.allclose(separate.encode_passages(batch), query)
    with pytest.raises(ValueError, match="side"):
        shared(batch, side="document")


@pytest.mark.parametrize(
    "options",
    [dict(pooling="mean", normalize=True, add_pooler=True), dict(pooling="cls", shared=False)],
    ids=["mean-normalize-pooler", "cls-separate"],
)
def test_saved_dual_encoder_loads_in_sentence_transformers(tiny_bert_path, tiny_tokenizer, texts, tmp_path, options):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    de = DualEncoder.from_pretrained(tiny_bert_path, **options).eval()
    with torch.no_grad():
        for p in de.parameters():  # differ the towers, so a swapped tower would show
            p.add_(0.01 * torch.randn_like(p))
    de.save_pretrained(tmp_path, tokenizer=tiny_tokenizer, max_seq_length=34)
    batch = encode(tiny_tokenizer, texts, max_len=32)
    for side in ("query", "passage"):
        folder = tmp_path if de.shared else tmp_path / side
        st = SentenceTransformer(str(folder), device="cpu")
        ids = st.tokenize(texts)["input_ids"]
        assert torch.equal(ids, batch["input_ids"]), "sentence-transformers must see the contract's ids"
        with torch.no_grad():
            ours = de(batch, side=side).reps
        theirs = st.encode(texts, convert_to_tensor=True, batch_size=2)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    reloaded = DualEncoder.from_pretrained(tmp_path).eval()
    assert (reloaded.pooling, reloaded.normalize, reloaded.shared) == (de.pooling, de.normalize, de.shared)
    with torch.no_grad():
        for side in ("query", "passage"):
            torch.testing.assert_close(reloaded(batch, side=side).reps, de(batch, side=side).reps)
    with pytest.raises(ValueError, match="contradict"):
        DualEncoder.from_pretrained(tmp_path, shared=not de.shared)


def test_colbert_tokens_are_content_tokens(tiny_bert_path, tiny_tokenizer, texts):
    de = DualEncoder.from_pretrained(tiny_bert_path).eval()
    col = ColBERT(de.hidden_size, dim=8)
    batch = encode(tiny_tokenizer, texts)
    with torch.no_grad():
        hidden = de(batch, side="passage").last_hidden_state
        out = col(batch, hidden)
    lengths = batch["lengths"]
    assert out.tokens.shape == (len(texts), int(lengths.max()), 8)
    assert torch.equal(out.mask.sum(dim=1), lengths)
    for b, n in enumerate(lengths.tolist()):
        expected = torch.nn.functional.normalize(hidden[b, 1 : 1 + n] @ col.projection.weight.T, dim=-1)
        torch.testing.assert_close(out.tokens[b, :n], expected)  # positions 1..n: no [CLS], no [SEP]
        assert out.tokens[b, n:].abs().sum() == 0 and not out.mask[b, n:].any()
    torch.testing.assert_close(out.tokens[out.mask].norm(dim=-1), torch.ones(int(lengths.sum())))
    with pytest.raises(ValueError, match="own"):
        col(batch)


def test_colbert_save_load_shared_and_own_encoder(tiny_bert_path, tiny_tokenizer, texts, tmp_path):
    batch = encode(tiny_tokenizer, texts)
    hidden = torch.randn(*batch["input_ids"].shape, 32)
    shared = ColBERT(32, dim=16)
    shared.save_pretrained(tmp_path / "shared")
    loaded = ColBERT.from_pretrained(tmp_path / "shared")
    assert loaded.encoder is None and loaded.dim == 16
    torch.testing.assert_close(loaded(batch, hidden).tokens, shared(batch, hidden).tokens)

    own = ColBERT.from_pretrained(tiny_bert_path, dim=8).eval()
    own.save_pretrained(tmp_path / "own", tokenizer=tiny_tokenizer)
    reloaded = ColBERT.from_pretrained(tmp_path / "own").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).tokens, own(batch).tokens)


def test_cross_encoder_loads_in_transformers(tiny_bert_path, tiny_tokenizer, texts, tmp_path):
    torch.manual_seed(0)
    ce = CrossEncoder.from_pretrained(tiny_bert_path).eval()
    special = SpecialTokens.from_tokenizer(tiny_tokenizer)
    batch = cross_inputs(tokenize(tiny_tokenizer, texts, 8), tokenize(tiny_tokenizer, texts[::-1], 16), special)
    with torch.no_grad():
        out = ce(batch)
        probed = ce(batch, return_attention=True)
    assert out.scores.shape == (len(texts),) and out.attention is None
    torch.testing.assert_close(probed.scores, out.scores, atol=1e-5, rtol=0)
    t = batch["input_ids"].shape[1]
    heads = ce.model.config.num_attention_heads
    assert probed.attention.shape == (len(texts), heads, t, t)

    ce.save_pretrained(tmp_path, tokenizer=tiny_tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits.squeeze(-1), out.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(CrossEncoder.from_pretrained(tmp_path).eval()(batch).scores, out.scores)
    pair = tiny_tokenizer(texts[0], texts[-1], return_tensors="pt")
    ours = cross_inputs(tokenize(tiny_tokenizer, texts[:1], 64), tokenize(tiny_tokenizer, texts[-1:], 64), special)
    assert torch.equal(pair["input_ids"], ours["input_ids"])
    assert torch.equal(pair["token_type_ids"], ours["token_type_ids"])
