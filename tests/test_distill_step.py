"""The distill step: ``Cascade.forward`` outputs and ``distill_terms`` equal the pre-refactor step,
KL targets come from the teacher without dropout, and a weight of 0 removes the model work. The
chunked step (``memory.mini_batch``) equals the plain one, replaying each chunk's dropout; so does
gradient checkpointing."""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, BertModel
from transformers.modeling_layers import GradientCheckpointingLayer

from data.collate import SpecialTokens, cross_inputs, encoder_inputs
from losses import attention_kl, candidate_scores, contrastive_loss, dualreg_loss, reduce_heads, score_kl
from models.colbert import ColBERT
from models.cross_encoder import CrossEncoder, CrossEncoderOutput, query_passage_attention
from models.dual_encoder import DualEncoder, EncoderOutput
from models.scoring import maxsim_paired
from pipeline import grad_cache
from pipeline.batches import GroupBatch
from pipeline.grad_cache import split_rows
from pipeline.stages.configs import DistillConfig, LossWeights, MemoryConfig
from pipeline.stages.distill import Cascade, distill_terms, needs, term_weights

Q, G, VOCAB = 3, 3, 40
ALL_ON = {name: 1.0 for name in vars(LossWeights())}


def reference_step(cascade, batch, stage, weights, train_teacher):
    """The step in one function, as it was before ``Cascade`` and ``distill_terms`` split it: the
    reference for the numbers. DualReg's two dropout views come from one forward over the doubled
    batch (DESIGN.md), whose first half is view 1."""
    de, col, ce = cascade.dual_encoder, cascade.colbert, cascade.cross_encoder
    use = needs(weights, stage.teacher)
    views = 2 if weights["dualreg"] else 1
    doubled = lambda inputs: {k: torch.cat([v] * views) for k, v in inputs.items()}  # noqa: E731
    q_out, p_out = de(doubled(batch.queries), side="query"), de(doubled(batch.passages), side="passage")
    q_reps, p_reps = q_out.reps[:Q], p_out.reps[: Q * G]
    zeros = torch.zeros(Q, dtype=torch.long)
    if weights["kl_col_de"] or weights["kl_ce_de"]:
        de_group = candidate_scores(q_reps, p_reps, G)[0]
    passages, offset = p_reps, 0  # one process
    terms = {}
    if weights["de"]:
        scores, labels = candidate_scores(q_reps, passages, G, in_batch=stage.in_batch, label_offset=offset)
        terms["de"] = contrastive_loss(scores, labels, stage.tau_de)
    if use["col"]:
        q_tok = col(doubled(batch.queries), last_hidden_state=q_out.last_hidden_state)
        p_tok = col(doubled(batch.passages), last_hidden_state=p_out.last_hidden_state)
        q_tok, p_tok = (q_tok.tokens[:Q], q_tok.mask[:Q]), (p_tok.tokens[: Q * G], p_tok.mask[: Q * G])
        q_rep = q_tok[0].repeat_interleave(G, dim=0)
        q_rep_mask = q_tok[1].repeat_interleave(G, dim=0)
        col_group = maxsim_paired(q_rep, q_rep_mask, *p_tok).view(Q, G)
        if weights["col"]:
            terms["col"] = contrastive_loss(col_group, zeros, stage.tau_col)
    if use["ce"]:
        with nullcontext() if train_teacher else torch.no_grad():
            ce_out = ce(batch.pairs, return_attention=bool(weights["attn"]))
        ce_group = ce_out.scores.view(Q, G)
        if weights["ce"] and train_teacher:
            terms["ce"] = contrastive_loss(ce_group, zeros, stage.tau_ce)
    teacher_mask = None
    if use["cached"]:
        teacher_mask = torch.isfinite(batch.teacher_scores)
        ce_group = batch.teacher_scores.nan_to_num(0.0)
    kl = dict(scale_by_temperature=stage.kl_temperature_squared, negatives_weight=stage.kl_negatives)
    if weights["kl_ce_col"]:
        terms["kl_ce_col"] = score_kl(ce_group, col_group, stage.tau_ce, stage.tau_col, mask=teacher_mask, **kl)
    if weights["kl_col_de"]:
        terms["kl_col_de"] = score_kl(col_group, de_group, stage.tau_col, stage.tau_de, **kl)
    if weights["kl_ce_de"]:
        terms["kl_ce_de"] = score_kl(ce_group, de_group, stage.tau_ce, stage.tau_de, mask=teacher_mask, **kl)
    if weights["attn"]:
        block = query_passage_attention(ce_out.attention, batch.pairs["query_lengths"], batch.pairs["passage_lengths"],
                                        q_rep.shape[1], p_tok[0].shape[1])
        teacher = reduce_heads(block.attention, stage.attn_heads)
        positives = torch.arange(Q * G) % G == 0
        pair_mask = positives if stage.attn_pairs == "positive" else None
        terms["attn"] = attention_kl(teacher, q_rep, q_rep_mask, *p_tok, stage.tau_attn, pair_mask)
    if weights["dualreg"]:
        q_2, p_2 = q_out.reps[Q:], p_out.reps[Q * G :]
        terms["dualreg"] = dualreg_loss(q_reps, q_2, passages, p_2, G, stage.tau_de, stage.in_batch)
    return terms


def bert_config(**extra) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=40, hidden_dropout_prob=0.2,
                      attention_probs_dropout_prob=0.2, **extra)


def cascade_of(stage: DistillConfig, weights: dict[str, float] | None = None) -> Cascade:
    """A tiny random cascade in train mode (dropout on); the CE is there even if no term reads it."""
    torch.manual_seed(0)
    de = DualEncoder(BertModel(bert_config(), add_pooling_layer=False), pooling="mean", normalize=True)
    ce = CrossEncoder(BertForSequenceClassification(bert_config(num_labels=1)))
    return Cascade(de, ColBERT(16, 8), ce, stage, weights or term_weights(stage)).train()


def stage_with(teacher: str = "cross_encoder", **weights) -> DistillConfig:
    """Every term on (1.0) except those given; cross-device gathering is the identity here."""
    return DistillConfig(weights=LossWeights(**{**ALL_ON, **weights}), teacher=teacher)


@pytest.fixture(scope="module")
def batch() -> GroupBatch:
    """Q queries of mixed lengths with G passages each, and cached teacher scores with one unscored cell."""
    g = torch.Generator().manual_seed(0)
    special = SpecialTokens(cls=1, sep=2, pad=0)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    queries = [ids(n) for n in (2, 5, 3)]
    passages = [ids(n) for n in (7, 3, 9, 4, 8, 2, 6, 9, 5)]
    pairs = cross_inputs([q for q in queries for _ in range(G)], passages, special)
    cached = torch.randn(Q, G, generator=g)
    cached[1, 2] = float("nan")
    return GroupBatch(encoder_inputs(queries, special), encoder_inputs(passages, special), pairs, G, cached)


def terms_of(cascade: Cascade, batch: GroupBatch, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout masks as the reference under the same seed
    return distill_terms(cascade(batch), G, cascade.stage, cascade.weights)


def reference_of(cascade: Cascade, batch: GroupBatch, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return reference_step(cascade, batch, cascade.stage, cascade.weights, cascade.train_teacher)


@pytest.mark.parametrize("stage", [
    stage_with(ce=0.0),  # frozen teacher: every other term, all read from one eval-mode CE forward
    stage_with(kl_ce_col=0.0, kl_ce_de=0.0, attn=0.0),  # a training teacher read by no KL target
    stage_with("scores", ce=0.0, attn=0.0),  # cached teacher scores, one NaN
    DistillConfig(weights=LossWeights(**{**ALL_ON, "ce": 0.0}), in_batch=False, attn_pairs="all", attn_heads="max",
                  kl_temperature_squared=True, freeze_teacher=True),
], ids=["frozen-teacher", "training-teacher-no-targets", "cached-scores", "switches"])
def test_terms_equal_the_pre_refactor_step(batch, stage):
    cascade = cascade_of(stage)
    terms, expected = terms_of(cascade, batch), reference_of(cascade, batch)
    assert list(terms) == list(expected)  # the same terms in the same order (the loop sums in this order)
    assert set(terms) == {k for k, v in cascade.weights.items() if v}
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name], rtol=0, atol=0, msg=name)


def test_a_training_teacher_is_distilled_from_its_eval_mode_scores(batch):
    cascade = cascade_of(stage_with())  # every term on: the CE trains and is read as a target
    assert cascade.train_teacher
    torch.manual_seed(1)
    out = cascade(batch)
    terms = distill_terms(out, G, cascade.stage, cascade.weights)
    expected = reference_of(cascade, batch)
    for name in ("de", "col", "ce", "kl_col_de", "dualreg"):  # the targets' forward draws no dropout mask
        torch.testing.assert_close(terms[name], expected[name], rtol=0, atol=0, msg=name)

    ce, stage = cascade.cross_encoder, cascade.stage
    assert ce.training  # back in train mode after the targets' forward
    with torch.no_grad():
        ce.eval()
        clean = ce(batch.pairs, return_attention=True)
        ce.train()
    q_rep = out.q_tokens.tokens.repeat_interleave(G, dim=0)
    q_mask = out.q_tokens.mask.repeat_interleave(G, dim=0)
    col_group = maxsim_paired(q_rep, q_mask, out.p_tokens.tokens, out.p_tokens.mask).view(Q, G)
    de_group = candidate_scores(out.q_reps, out.p_reps, G)[0]
    targets = clean.scores.view(Q, G)
    block = query_passage_attention(clean.attention, batch.pairs["query_lengths"], batch.pairs["passage_lengths"],
                                    q_rep.shape[1], out.p_tokens.tokens.shape[1]).attention
    direct = {
        "kl_ce_col": score_kl(targets, col_group, stage.tau_ce, stage.tau_col),
        "kl_ce_de": score_kl(targets, de_group, stage.tau_ce, stage.tau_de),
        "attn": attention_kl(reduce_heads(block), q_rep, q_mask, out.p_tokens.tokens, out.p_tokens.mask,
                             stage.tau_attn, torch.arange(Q * G) % G == 0),
    }
    for name, value in direct.items():
        torch.testing.assert_close(terms[name], value, msg=name)
        assert not torch.allclose(terms[name], expected[name]), name  # the old targets had dropout in them


def test_kl_targets_do_not_depend_on_the_dropout_rng(batch):
    cascade = cascade_of(stage_with())
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(cascade(batch))
    assert not torch.allclose(runs[0].ce_scores, runs[1].ce_scores)  # the ``ce`` term trains with dropout
    torch.testing.assert_close(runs[0].teacher_scores, runs[1].teacher_scores, rtol=0, atol=0)
    torch.testing.assert_close(runs[0].teacher_attention, runs[1].teacher_attention, rtol=0, atol=0)
    with torch.no_grad():
        clean = cascade.cross_encoder.eval()(batch.pairs).scores.view(Q, G)
    torch.testing.assert_close(runs[0].teacher_scores, clean)
    assert runs[0].ce_scores.requires_grad and not runs[0].teacher_scores.requires_grad


def spy_calls(monkeypatch, module) -> list[dict]:
    """Each call of ``module``: its mode, whether grad was on, and its keyword arguments."""
    calls, forward = [], module.forward

    def spy(*args, **kwargs):
        calls.append({"training": module.training, "grad": torch.is_grad_enabled(), **kwargs})
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", spy)
    return calls


def spy_rows(monkeypatch, module) -> list[int]:
    """The number of rows of each batch ``module`` encodes."""
    rows, forward = [], module.forward

    def spy(batch, *args, **kwargs):
        rows.append(len(batch["input_ids"]))
        return forward(batch, *args, **kwargs)

    monkeypatch.setattr(module, "forward", spy)
    return rows


TWO_VIEWS, ONE_VIEW = [2 * Q, 2 * Q * G], [Q, Q * G]  # DualReg's views: one forward over a doubled batch


@pytest.mark.parametrize("off, ce_calls, col_calls, de_rows", [
    ((), [{"training": True, "grad": True}, {"training": False, "grad": False, "return_attention": True}], 2,
     TWO_VIEWS),
    (("ce",), [{"training": False, "grad": False, "return_attention": True}], 2, TWO_VIEWS),
    (("attn",), [{"training": True, "grad": True}, {"training": False, "grad": False, "return_attention": False}],
     2, TWO_VIEWS),
    (("kl_ce_col", "kl_ce_de", "attn"), [{"training": True, "grad": True}], 2, TWO_VIEWS),
    (("ce", "kl_ce_col", "kl_ce_de", "attn"), [], 2, TWO_VIEWS),
    (("col", "kl_ce_col", "kl_col_de", "attn"), [{"training": True, "grad": True},
                                                  {"training": False, "grad": False, "return_attention": False}], 0,
     TWO_VIEWS),
    (("dualreg",), [{"training": True, "grad": True}, {"training": False, "grad": False, "return_attention": True}],
     2, ONE_VIEW),
])
def test_a_zero_weight_removes_the_model_work(batch, monkeypatch, off, ce_calls, col_calls, de_rows):
    cascade = cascade_of(stage_with(**{name: 0.0 for name in off}))
    ce_seen = spy_calls(monkeypatch, cascade.cross_encoder)
    col_seen, de_seen = spy_calls(monkeypatch, cascade.colbert), spy_rows(monkeypatch, cascade.dual_encoder)
    terms = distill_terms(cascade(batch), G, cascade.stage, cascade.weights)
    assert set(terms) == set(ALL_ON) - set(off)
    assert ce_seen == ce_calls and len(col_seen) == col_calls and de_seen == de_rows


@pytest.mark.parametrize("stage", [stage_with(ce=0.0, col=0.0, kl_ce_col=0.0, kl_col_de=0.0, attn=0.0, dualreg=0.0),
                                   DistillConfig(freeze_teacher=True)], ids=["ce-weight-0", "freeze_teacher"])
def test_a_teacher_without_its_own_term_is_frozen(batch, stage):
    weights = term_weights(stage)
    assert weights["ce"] == 0.0
    cascade = cascade_of(stage, weights)
    ce = cascade.cross_encoder
    assert not cascade.train_teacher and not ce.training  # train() leaves it in eval mode
    assert not any(p.requires_grad for p in ce.parameters())
    terms = distill_terms(cascade(batch), G, cascade.stage, weights)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in ce.parameters())
    assert any(p.grad is not None for p in cascade.dual_encoder.parameters())


def test_a_teacher_with_its_own_term_trains(batch):
    cascade = cascade_of(stage_with(kl_ce_col=0.0, attn=0.0))
    assert cascade.weights["ce"] == 1.0 and cascade.train_teacher and cascade.cross_encoder.training
    terms = distill_terms(cascade(batch), G, cascade.stage, cascade.weights)
    terms["ce"].backward()
    assert all(p.grad is not None for p in cascade.cross_encoder.parameters() if p.requires_grad)


def best_attention_kl(teacher: torch.Tensor, tau: float, steps: int = 200) -> float:
    """The lowest ``attention_kl`` that Adam finds over free unit query / passage token vectors (128-d)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 128, generator=g).requires_grad_()  # (B, Lq, dim)
    p = torch.randn(1, teacher.shape[-1], 128, generator=g).requires_grad_()  # (B, Lp, dim)
    q_mask, p_mask = torch.ones(1, 1, dtype=torch.bool), torch.ones(1, teacher.shape[-1], dtype=torch.bool)
    optimizer = torch.optim.Adam([q, p], lr=0.05)
    for _ in range(steps):
        loss = attention_kl(teacher, F.normalize(q, dim=-1), q_mask, F.normalize(p, dim=-1), p_mask, tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def test_tau_attn_bounds_how_closely_colbert_can_match_a_peaked_teacher_row():
    # The default (1) keeps the attention term from swamping the others (at 0.05 the demo's
    # dual-encoder collapsed), at the price of a floor on the KL that this test pins down.
    Lp = 100
    teacher = torch.full((1, 1, Lp), 0.1 / (Lp - 1))  # (B, Lq, Lp): 90% of the row on one passage token
    teacher[..., 0] = 0.9
    assert DistillConfig().tau_attn == 1.0
    assert best_attention_kl(teacher, 0.05) < 0.01
    # At tau 1, unit vectors give logits in [-1, 1]: no token gets more than e^2 / (e^2 + 99) of a row,
    # so KL >= the binary KL of 0.9 against that share (log-sum inequality), whatever the vectors.
    top = math.exp(2) / (math.exp(2) + Lp - 1)
    bound = 0.9 * math.log(0.9 / top) + 0.1 * math.log(0.1 / (1 - top))
    assert bound > 2.0
    assert best_attention_kl(teacher, 1.0) >= bound - 1e-4


# ---------------------------------------------------------------- memory: chunks, gradient caching, checkpointing

MINI_BATCH = 2  # divides none of the batch's 3 queries, 9 passages, 9 pairs, 6 and 18 doubled rows
# fp32, where chunks change only the order of sums: terms within 1e-5 relative; each gradient entry
# within 1e-5 of its parameter's largest entry (gradients reach 100 at 1 / tau_de = 20; seen: 2e-7).
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def with_memory(stage: DistillConfig, **memory) -> DistillConfig:
    return dataclasses.replace(stage, memory=MemoryConfig(**memory))


def step_of(cascade: Cascade, batch: GroupBatch, seed: int = 1) -> tuple[dict, dict]:
    """The terms and every parameter's gradient of one step (the weights are all 1: the loss is their sum)."""
    cascade.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    terms = distill_terms(cascade(batch), G, cascade.stage, cascade.weights)
    sum(terms.values()).backward()
    grads = {name: p.grad.clone() for name, p in cascade.named_parameters() if p.grad is not None}
    return {name: value.detach() for name, value in terms.items()}, grads


def assert_same_step(step, expected) -> None:
    (terms, grads), (expected_terms, expected_grads) = step, expected
    assert list(terms) == list(expected_terms)
    for name, value in expected_terms.items():
        torch.testing.assert_close(terms[name], value, **TOLERANCE, msg=name)
    assert grads.keys() == expected_grads.keys() and len(grads) > 20
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=TOLERANCE["atol"] + 1e-5 * float(grad.abs().max()),
                                   msg=name)


@pytest.mark.parametrize("stage", [
    stage_with(),  # every term, the teacher trains on the fly and is read as a target
    dataclasses.replace(stage_with(), dualreg_one_sided=True),
    stage_with(ce=0.0),  # a frozen teacher
    stage_with("scores", ce=0.0, attn=0.0),
], ids=["training-teacher", "one-sided-dualreg", "frozen-teacher", "cached-scores"])
def test_the_chunked_step_equals_the_plain_step(batch, stage):
    """Dropout off (as tests/distributed_step.py): both steps compute the same function, chunked or not."""
    plain = step_of(cascade_of(stage).eval(), batch)
    chunked = step_of(cascade_of(with_memory(stage, mini_batch=MINI_BATCH)).eval(), batch)
    assert set(plain[0]) == {k for k, v in term_weights(stage).items() if v}
    assert_same_step(chunked, plain)


def encode_chunk_by_chunk(monkeypatch, module, size: int, output) -> None:
    """``module`` run over ``split_rows`` chunks of its batch with their graphs, then concatenated.

    The plain step then draws dropout masks chunk by chunk as the chunked step's first pass does:
    the same function of the parameters, without gradient caching.
    """
    forward = module.forward

    def chunked(batch, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return forward(batch, **kwargs)
        outs = [forward(chunk, **kwargs) for chunk in split_rows(batch, size)]
        return output(batch, outs)

    monkeypatch.setattr(module, "forward", chunked)


def padded_encoder_output(batch, outs) -> EncoderOutput:
    width = batch["input_ids"].shape[1]
    states = [F.pad(out.last_hidden_state, (0, 0, 0, width - out.last_hidden_state.shape[1])) for out in outs]
    return EncoderOutput(torch.cat([out.reps for out in outs]), torch.cat(states))


@pytest.mark.parametrize("restore", [True, False], ids=["rng-restored", "mutation-rng-not-restored"])
def test_the_chunked_step_replays_each_chunks_dropout(batch, monkeypatch, restore):
    """Dropout on, every term: the gradients are those of the losses the step reports, DualReg's views included."""
    stage = stage_with()
    chunked_cascade = cascade_of(with_memory(stage, mini_batch=MINI_BATCH))
    if not restore:
        monkeypatch.setattr(grad_cache, "restore_rng", lambda state: None)
    chunked = step_of(chunked_cascade, batch)

    plain_cascade = cascade_of(stage)
    encode_chunk_by_chunk(monkeypatch, plain_cascade.dual_encoder, MINI_BATCH, padded_encoder_output)
    encode_chunk_by_chunk(monkeypatch, plain_cascade.cross_encoder, max(1, MINI_BATCH // G) * G,
                          lambda batch, outs: CrossEncoderOutput(torch.cat([out.scores for out in outs])))
    plain = step_of(plain_cascade, batch)
    assert plain[0]["dualreg"] > 1e-4  # the two dropout views differ
    if restore:
        assert_same_step(chunked, plain)
        return
    for name, value in plain[0].items():  # the first pass drew the same masks: the same losses ...
        torch.testing.assert_close(chunked[0][name], value, **TOLERANCE, msg=name)
    student = lambda grads: torch.cat([g.flatten() for name, g in grads.items()  # noqa: E731
                                       if not name.startswith("cross_encoder")])
    assert (student(chunked[1]) - student(plain[1])).norm() > 0.05 * student(plain[1]).norm()  # ... other gradients


def test_the_replay_leaves_the_training_rng_where_the_first_pass_left_it(batch):
    cascade = cascade_of(with_memory(stage_with(), mini_batch=MINI_BATCH))
    torch.manual_seed(1)
    terms = distill_terms(cascade(batch), G, cascade.stage, cascade.weights)
    after_forward = torch.get_rng_state()
    sum(terms.values()).backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_the_chunked_step_keeps_one_chunks_graph(batch, monkeypatch):
    """The student's first pass and the teacher's targets run without a graph; replays and teacher chunks with one."""
    cascade = cascade_of(with_memory(stage_with(), mini_batch=MINI_BATCH))
    de_rows, ce_calls = spy_rows(monkeypatch, cascade.dual_encoder), spy_calls(monkeypatch, cascade.cross_encoder)
    grad_on = []
    forward = cascade.dual_encoder.forward
    monkeypatch.setattr(cascade.dual_encoder, "forward",
                        lambda *args, **kwargs: grad_on.append(torch.is_grad_enabled()) or forward(*args, **kwargs))
    terms = distill_terms(cascade(batch), G, cascade.stage, cascade.weights)
    first_pass = len(de_rows)
    assert max(de_rows) <= MINI_BATCH and sum(de_rows) == 2 * Q + 2 * Q * G and not any(grad_on)
    sum(terms.values()).backward()
    assert de_rows[first_pass:] == de_rows[:first_pass] and all(grad_on[first_pass:])  # every chunk replayed once
    trained = [c for c in ce_calls if c["training"]]
    assert len(trained) == Q and all(c["grad"] for c in trained)  # one group per forward: MINI_BATCH // G < 1
    targets = [c for c in ce_calls if not c["training"]]
    assert len(targets) == math.ceil(Q * G / MINI_BATCH) and not any(c["grad"] for c in targets)


def test_one_sided_dualreg_encodes_its_second_view_without_a_graph(batch, monkeypatch):
    cascade = cascade_of(dataclasses.replace(stage_with(), dualreg_one_sided=True))
    calls = spy_calls(monkeypatch, cascade.dual_encoder)
    out = cascade(batch)
    assert [c["grad"] for c in calls] == [True, True, False, False]
    assert out.q_reps.requires_grad and not out.q_reps_2.requires_grad and not out.p_reps_2.requires_grad
    assert not torch.allclose(out.q_reps, out.q_reps_2)  # still a second dropout view


@pytest.mark.parametrize("mini_batch", [0, MINI_BATCH], ids=["plain", "chunked"])
def test_gradient_checkpointing_changes_nothing_but_memory(batch, mini_batch):
    stage = with_memory(stage_with(), mini_batch=mini_batch)
    checkpointed = cascade_of(with_memory(stage_with(), mini_batch=mini_batch, checkpoint_dual_encoder=True,
                                          checkpoint_cross_encoder=True))
    units = lambda model: [u.gradient_checkpointing for u in model.modules()  # noqa: E731
                           if isinstance(u, GradientCheckpointingLayer)]
    assert units(checkpointed.dual_encoder) == [True, True]
    assert units(checkpointed.cross_encoder) == [True, False]  # the probed (last) layer keeps its activations
    assert_same_step(step_of(checkpointed, batch), step_of(cascade_of(stage), batch))


class Interrupt(Exception):
    pass


def train_chunked(batch, stage_dir, fail_at: int | None = None) -> Cascade:
    """Two optimizer steps of two micro-batches on the chunked cascade, through the one training loop."""
    from accelerate import Accelerator

    from pipeline.train import TrainConfig, train

    stage = dataclasses.replace(with_memory(stage_with(), mini_batch=MINI_BATCH),
                                train=TrainConfig(epochs=2, grad_accum=2, checkpoint_every=1, log_every=1))
    cascade, calls = cascade_of(stage), []

    def step(model, micro_batch):
        calls.append(1)
        if len(calls) == fail_at:
            raise Interrupt
        return distill_terms(model(micro_batch), G, stage, cascade.weights)

    active = {name: weight for name, weight in cascade.weights.items() if weight}
    train(Accelerator(cpu=True), cascade, step, lambda epoch, index: batch, 2, active, stage.train, stage_dir)
    return cascade


def test_the_loop_trains_the_chunked_step_and_resumes_it_exactly(batch, tmp_path):
    straight = train_chunked(batch, tmp_path / "straight")
    with pytest.raises(Interrupt):
        train_chunked(batch, tmp_path / "resumed", fail_at=4)  # in step 2, after the step-1 checkpoint
    resumed = train_chunked(batch, tmp_path / "resumed")
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r[t]) for r in log for t in ALL_ON)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
