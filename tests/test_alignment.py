"""Token alignment contract (DESIGN.md): row i / column j of the cross-encoder's query x passage
attention block are query token i / passage token j of ColBERT, on padded batches of mixed lengths."""

from __future__ import annotations

import pytest
import torch

from data.collate import SpecialTokens, cross_inputs, encoder_inputs, tokenize
from losses.attention_kl import attention_kl, reduce_heads
from models.colbert import ColBERT, content_tokens
from models.cross_encoder import CrossEncoder, query_passage_attention
from models.dual_encoder import DualEncoder


@pytest.fixture(scope="module")
def texts(tiny_tokenizer):
    """Queries of 1-5 words and passages of 2-12 words; the longest query is not with the longest passage."""
    words = sorted(w for w in tiny_tokenizer.get_vocab() if w.isalpha() and len(w) > 3)
    gen = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=gen).tolist())

    queries = [text(n) for n in (3, 1, 5, 2, 4)]
    passages = [text(n) for n in (12, 2, 3, 9, 5)]
    return queries, passages


@pytest.fixture(scope="module")
def batches(tiny_tokenizer, texts):
    special = SpecialTokens.from_tokenizer(tiny_tokenizer)
    query_ids = tokenize(tiny_tokenizer, texts[0], max_len=6)
    passage_ids = tokenize(tiny_tokenizer, texts[1], max_len=10)
    assert len({len(q) for q in query_ids}) > 2 and max(len(p) for p in passage_ids) == 10
    cross = cross_inputs(query_ids, passage_ids, special)
    return encoder_inputs(query_ids, special), encoder_inputs(passage_ids, special), cross


def colbert_ids(batch):
    """Token ids in ColBERT's layout (content token i at index i) and its mask."""
    ids, mask = content_tokens(batch["input_ids"].unsqueeze(-1), batch["lengths"])
    return ids.squeeze(-1), mask


def test_block_positions_follow_the_contract(batches):
    queries, passages, cross = batches
    b, t = cross["input_ids"].shape
    position = torch.arange(t, dtype=torch.float64)
    attn = (position.view(t, 1) * t + position.view(1, t)).expand(b, 2, t, t)  # encodes (row, column)
    q_ids, q_mask = colbert_ids(queries)
    p_ids, p_mask = colbert_ids(passages)
    block = query_passage_attention(attn, cross["query_lengths"], cross["passage_lengths"], q_ids.shape[1], p_ids.shape[1])
    i = torch.arange(q_ids.shape[1], dtype=torch.float64).view(1, -1, 1)
    j = torch.arange(p_ids.shape[1], dtype=torch.float64).view(1, 1, -1)
    n_q = cross["query_lengths"].view(-1, 1, 1).double()
    expected = ((1 + i) * t + 2 + n_q + j) * (q_mask.unsqueeze(-1) & p_mask.unsqueeze(-2))
    torch.testing.assert_close(block.attention, expected.unsqueeze(1).expand(b, 2, -1, -1))
    assert torch.equal(block.query_mask, q_mask) and torch.equal(block.passage_mask, p_mask)


def test_block_rows_and_columns_carry_colberts_token_ids(batches):
    queries, passages, cross = batches
    ids = cross["input_ids"].double()
    vocab = float(ids.max() + 1)
    attn = (ids.unsqueeze(-1) * vocab + ids.unsqueeze(-2)).unsqueeze(1)  # (B, 1, T, T): id(row) * V + id(col)
    q_ids, q_mask = colbert_ids(queries)
    p_ids, p_mask = colbert_ids(passages)
    block = query_passage_attention(attn, cross["query_lengths"], cross["passage_lengths"], q_ids.shape[1], p_ids.shape[1])
    pairs = q_mask.unsqueeze(-1) & p_mask.unsqueeze(-2)  # (B, Lq, Lp)
    expected = (q_ids.unsqueeze(-1) * vocab + p_ids.unsqueeze(-2)).double() * pairs
    torch.testing.assert_close(block.attention.squeeze(1), expected)
    assert (q_ids[q_mask] != 0).all() and (p_ids[p_mask] != 0).all()


def test_real_attention_block_equals_per_row_slicing(tiny_bert_path, batches):
    _, _, cross = batches
    torch.manual_seed(0)
    ce = CrossEncoder.from_pretrained(tiny_bert_path).eval()
    with torch.no_grad():
        attn = ce(cross, return_attention=True).attention  # (B, H, T, T)
    block = query_passage_attention(attn, cross["query_lengths"], cross["passage_lengths"]).attention
    for b, (n_q, n_p) in enumerate(zip(cross["query_lengths"].tolist(), cross["passage_lengths"].tolist())):
        manual = attn[b, :, 1 : 1 + n_q, 2 + n_q : 2 + n_q + n_p]
        assert torch.equal(block[b, :, :n_q, :n_p], manual)
        assert block[b, :, n_q:].abs().sum() == 0 and block[b, :, :, n_p:].abs().sum() == 0
        assert torch.equal(cross["input_ids"][b, 1 + n_q], cross["input_ids"][b, 2 + n_q + n_p])  # both [SEP]


def test_cross_encoder_block_feeds_the_attention_loss(tiny_bert_path, batches):
    queries, passages, cross = batches
    torch.manual_seed(0)
    ce = CrossEncoder.from_pretrained(tiny_bert_path)
    de = DualEncoder.from_pretrained(tiny_bert_path)
    col = ColBERT(de.hidden_size, dim=16)
    q = col(queries, de(queries, side="query").last_hidden_state)
    p = col(passages, de(passages, side="passage").last_hidden_state)
    attn = ce(cross, return_attention=True).attention
    widths = q.tokens.shape[1], p.tokens.shape[1]
    block = query_passage_attention(attn, cross["query_lengths"], cross["passage_lengths"], *widths)
    assert torch.equal(block.query_mask, q.mask) and torch.equal(block.passage_mask, p.mask)
    loss = attention_kl(reduce_heads(block.attention), q.tokens, q.mask, p.tokens, p.mask)
    loss.backward()
    assert loss > 0 and col.projection.weight.grad.abs().sum() > 0
