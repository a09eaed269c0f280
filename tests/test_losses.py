import math

import pytest
import torch
import torch.nn.functional as F

from losses import (
    attention_kl,
    candidate_scores,
    contrastive_loss,
    decoupled_kl_rows,
    dualreg_loss,
    infonce_loss,
    kl_rows,
    mask_random_span,
    mask_tokens,
    mlm_loss,
    positive_labels,
    reduce_heads,
    score_kl,
    symmetric_kl,
)
from models.scoring import maxsim


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


# contrastive


def test_contrastive_hand_computed():
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    expected = 0.5 * (-math.log(softmax([1, 0, 0])[0]) - math.log(softmax([0, 2, 1])[1]))
    loss = contrastive_loss(scores, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    expected_tau = 0.5 * (-math.log(softmax([2, 0, 0])[0]) - math.log(softmax([0, 4, 2])[1]))
    loss = contrastive_loss(scores, torch.tensor([0, 1]), tau=0.5)
    assert loss.item() == pytest.approx(expected_tau, rel=1e-6)


def test_contrastive_large_tau_tends_to_log_num_candidates():
    scores = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    loss = contrastive_loss(scores, torch.zeros(4, dtype=torch.long), tau=1e6)
    assert loss.item() == pytest.approx(math.log(5), rel=1e-5)


def hard_negative_batch(num_queries=3, group_size=3, dim=8):
    """Unit vectors; each query equals its positive, its hard negatives lie close to it."""
    g = torch.Generator().manual_seed(0)
    q_reps = F.normalize(torch.randn(num_queries, dim, generator=g), dim=-1)
    groups = [
        torch.cat([q[None], F.normalize(q + 0.2 * torch.randn(group_size - 1, dim, generator=g))])
        for q in q_reps
    ]
    return q_reps, torch.cat(groups)  # (Q, D), (Q * G, D)


def test_group_only_scores_and_labels():
    q_reps, p_reps = hard_negative_batch()
    scores, labels = candidate_scores(q_reps, p_reps, group_size=3)
    assert scores.shape == (3, 3) and labels.tolist() == [0, 0, 0]
    expected = torch.stack([p_reps[3 * q : 3 * q + 3] @ q_reps[q] for q in range(3)])
    torch.testing.assert_close(scores, expected)


def test_in_batch_labels_point_at_positives_not_hard_negatives():
    q_reps, p_reps = hard_negative_batch()
    scores, labels = candidate_scores(q_reps, p_reps, group_size=3, in_batch=True)
    assert scores.shape == (3, 9) and labels.tolist() == [0, 3, 6]
    for q in range(3):
        torch.testing.assert_close(scores[q, labels[q]], q_reps[q] @ q_reps[q])  # the positive
    # the positive is each query's best candidate, so the right labels give the lowest loss
    assert (scores.argmax(dim=1) == labels).all()
    wrong = torch.arange(3)  # rows 1 and 2 are query 0's hard negatives
    assert contrastive_loss(scores, labels) < contrastive_loss(scores, wrong)
    group_scores, _ = candidate_scores(q_reps, p_reps, group_size=3)
    torch.testing.assert_close(group_scores, scores.view(3, 3, 3).diagonal().T)


def test_positive_labels_serve_late_interaction_scores_too():
    q_reps, p_reps = hard_negative_batch()
    q_tokens, p_tokens = q_reps[:, None, :], p_reps[:, None, :]  # one token per text
    q_mask = torch.ones(3, 1, dtype=torch.bool)
    scores = maxsim(q_tokens, q_mask, p_tokens, torch.ones(9, 1, dtype=torch.bool))  # (3, 9)
    labels = positive_labels(3, group_size=3, in_batch=True)
    assert (scores.argmax(dim=1) == labels).all()
    assert positive_labels(3, group_size=3, in_batch=False).tolist() == [0, 0, 0]


def test_label_offset_for_passages_gathered_across_processes():
    q_reps, p_reps = hard_negative_batch()
    other_rank = torch.randn(9, 8, generator=torch.Generator().manual_seed(1))
    pool = torch.cat([other_rank, p_reps])  # rank 1 of 2: local passages start at row 9
    scores, labels = candidate_scores(q_reps, pool, group_size=3, in_batch=True, label_offset=9)
    assert scores.shape == (3, 18) and labels.tolist() == [9, 12, 15]
    expected = sum(
        -math.log(softmax((pool @ q_reps[q]).tolist())[9 + 3 * q]) for q in range(3)
    ) / 3
    assert contrastive_loss(scores, labels).item() == pytest.approx(expected, rel=1e-5)


def test_candidate_scores_rejects_inconsistent_layouts():
    q_reps, p_reps = hard_negative_batch()
    with pytest.raises(ValueError):
        candidate_scores(q_reps, p_reps, group_size=3, in_batch=True, label_offset=3)
    with pytest.raises(ValueError):
        candidate_scores(q_reps, p_reps, group_size=3, label_offset=9)


# score KL


def test_score_kl_hand_computed():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    expected = 0.5 * (kl(softmax([1, 0]), [0.5, 0.5]) + kl([0.5, 0.5], softmax([2, 0])))
    assert score_kl(teacher, student).item() == pytest.approx(expected, rel=1e-6)
    expected_tau = 0.5 * (kl(softmax([0.5, 0]), softmax([0, 0])) + kl([0.5, 0.5], softmax([4, 0])))
    loss = score_kl(teacher, student, tau_teacher=2.0, tau_student=0.5)
    assert loss.item() == pytest.approx(expected_tau, rel=1e-6)


def test_score_kl_zero_for_equal_distributions_and_non_negative():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 6, generator=g)
    assert score_kl(teacher, teacher + 3.0).abs().item() < 1e-6  # softmax ignores a shift
    assert score_kl(teacher, 2.0 * teacher, tau_teacher=1.0, tau_student=2.0).abs().item() < 1e-6
    for _ in range(5):
        assert score_kl(torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)) > 0


def test_score_kl_temperature_and_t2_scaling():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert score_kl(teacher, student, tau_teacher=1e6, tau_student=1e6).item() < 1e-9
    plain = score_kl(teacher, student, tau_teacher=4.0, tau_student=4.0)
    scaled = score_kl(teacher, student, 4.0, 4.0, scale_by_temperature=True)
    torch.testing.assert_close(scaled, 16.0 * plain)


def test_score_kl_masked_candidates_have_no_effect():
    g = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    garbage_t = teacher.masked_fill(~mask, 1e4)
    garbage_s = student.clone().masked_fill(~mask, -1e4).requires_grad_()
    loss = score_kl(garbage_t, garbage_s, mask=mask)
    first, second = score_kl(teacher[:1, :2], student[:1, :2]), score_kl(teacher[1:], student[1:])
    expected = 0.5 * (first + second)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert garbage_s.grad[~mask].abs().sum() == 0


def test_kl_rows_masked_entries_contribute_nothing_even_when_infinite():
    teacher_logp = torch.tensor([[math.log(0.25), math.log(0.75), -math.inf]])
    student_logp = torch.tensor([[math.log(0.5), math.log(0.5), math.inf]])
    assert kl_rows(teacher_logp, student_logp).isnan().all()
    mask = torch.tensor([[True, True, False]])
    expected = kl([0.25, 0.75], [0.5, 0.5])
    assert kl_rows(teacher_logp, student_logp, mask).item() == pytest.approx(expected, rel=1e-6)


def test_score_kl_teacher_detached_by_default():
    teacher = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    student = torch.zeros(1, 3, requires_grad=True)
    score_kl(teacher, student).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    score_kl(teacher, student, detach_teacher=False).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0



def test_decoupled_kl_hand_computed_and_sums_back_to_the_plain_kl():
    teacher, student = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    pt, ps = F.softmax(teacher, -1)[0].tolist(), F.softmax(student, -1)[0].tolist()
    tckd, nckd, p_teacher = decoupled_kl_rows(teacher, student)
    assert tckd.item() == pytest.approx(kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]]), rel=1e-5)
    neg_t, neg_s = [x / (1 - pt[0]) for x in pt[1:]], [x / (1 - ps[0]) for x in ps[1:]]
    assert nckd.item() == pytest.approx(kl(neg_t, neg_s), rel=1e-5)
    assert p_teacher.item() == pytest.approx(pt[0], rel=1e-6)
    g = torch.Generator().manual_seed(3)
    teacher, student = 3 * torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    tckd, nckd, p_teacher = decoupled_kl_rows(teacher, student)
    plain = kl_rows(teacher.log_softmax(-1), student.log_softmax(-1))
    torch.testing.assert_close(tckd + (1 - p_teacher) * nckd, plain)


def test_decoupled_score_kl_weighs_the_negatives_own_kl():
    # A teacher sure of the positive: the plain KL barely sees the negatives' order, the decoupled one does.
    teacher = torch.tensor([[12.0, 2.0, 0.0, -2.0]])
    agree, reversed_ = torch.tensor([[3.0, 1.0, 0.0, -1.0]]), torch.tensor([[3.0, -1.0, 0.0, 1.0]])
    plain_gap = score_kl(teacher, reversed_) - score_kl(teacher, agree)
    decoupled_gap = score_kl(teacher, reversed_, negatives_weight=1.0) - score_kl(teacher, agree, negatives_weight=1.0)
    assert 0 < plain_gap < 1e-3 and decoupled_gap > 1.0
    tckd, nckd, _ = decoupled_kl_rows(teacher / 2, reversed_ / 0.5)
    expected = (tckd + 4.0 * nckd).mean() * (2 * 0.5)
    got = score_kl(teacher, reversed_, 2.0, 0.5, scale_by_temperature=True, negatives_weight=4.0)
    torch.testing.assert_close(got, expected)


def test_decoupled_score_kl_masks_padding_and_rows_without_negatives():
    g = torch.Generator().manual_seed(4)
    teacher, student = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    garbage_t = teacher.masked_fill(~mask, 1e4)
    garbage_s = student.clone().masked_fill(~mask, -1e4).requires_grad_()
    loss = score_kl(garbage_t, garbage_s, mask=mask, negatives_weight=2.0)
    first = score_kl(teacher[:1, :2], student[:1, :2], negatives_weight=2.0)
    second = score_kl(teacher[1:2], student[1:2], negatives_weight=2.0)
    torch.testing.assert_close(loss, (first + second) / 3)  # the row without a negative adds 0, still counted
    loss.backward()
    assert torch.isfinite(garbage_s.grad).all() and garbage_s.grad[~mask].abs().sum() == 0
    assert garbage_s.grad[2].abs().sum() == 0


# attention KL


def row_kl_reference(teacher_row, q_vec, p_vecs, tau):
    """KL of one query-token row: teacher renormalised over the given (real) passage tokens."""
    total = sum(teacher_row)
    student = softmax([float(q_vec @ p) / tau for p in p_vecs])
    return kl([t / total for t in teacher_row], student)


def test_reduce_heads():
    attn = torch.tensor([[[[0.2, 0.8]], [[0.6, 0.4]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(reduce_heads(attn, "mean"), torch.tensor([[[0.4, 0.6]]]))
    torch.testing.assert_close(reduce_heads(attn, "max"), torch.tensor([[[0.6, 0.8]]]))
    with pytest.raises(ValueError):
        reduce_heads(attn, "median")


def test_attention_kl_hand_computed():
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # (1, 3, 2)
    teacher = torch.tensor([[[0.4, 0.1, 0.3], [0.2, 0.2, 0.2]]])  # rows sum to 0.8 and 0.6
    mask_q, mask_p = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    expected = 0.5 * (
        kl([0.5, 0.125, 0.375], softmax([2.0, 0.0, 2.0]))
        + kl([1 / 3, 1 / 3, 1 / 3], softmax([0.0, 4.0, 4.0]))
    )
    loss = attention_kl(teacher, q, mask_q, p, mask_p, tau_attn=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def padded_attention_batch():
    """Two pairs of mixed lengths; every padded position holds garbage, token vectors inf."""
    g = torch.Generator().manual_seed(0)
    q_len, p_len = [2, 3], [4, 2]
    q_mask = torch.arange(3) < torch.tensor(q_len)[:, None]  # (2, 3)
    p_mask = torch.arange(4) < torch.tensor(p_len)[:, None]  # (2, 4)
    q = torch.where(q_mask[..., None], torch.randn(2, 3, 5, generator=g), math.inf)
    p = torch.where(p_mask[..., None], torch.randn(2, 4, 5, generator=g), -math.inf)
    real = q_mask[:, :, None] & p_mask[:, None, :]
    teacher = torch.where(real, torch.rand(2, 3, 4, generator=g), 7.0)
    return teacher, q, q_mask, p, p_mask


def test_attention_kl_padding_has_no_effect_and_matches_reference():
    teacher, q, q_mask, p, p_mask = padded_attention_batch()
    q, p = q.requires_grad_(), p.requires_grad_()
    loss = attention_kl(teacher, q, q_mask, p, p_mask, tau_attn=0.7)
    pair_losses = []
    for b in range(2):
        nq, np_ = int(q_mask[b].sum()), int(p_mask[b].sum())
        q_real, p_real = q[b, :nq].detach(), p[b, :np_].detach()
        teacher_rows = teacher[b, :nq, :np_].tolist()
        rows = [row_kl_reference(t, q_i, p_real, 0.7) for t, q_i in zip(teacher_rows, q_real)]
        pair_losses.append(sum(rows) / nq)
    assert loss.item() == pytest.approx(sum(pair_losses) / 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad[~q_mask].abs().sum() == 0
    assert torch.isfinite(p.grad).all() and p.grad[~p_mask].abs().sum() == 0


def test_attention_kl_rescaled_teacher_rows_and_zero_mass_rows():
    teacher, q, q_mask, p, p_mask = padded_attention_batch()
    base = attention_kl(teacher, q, q_mask, p, p_mask)
    scale = torch.tensor([[[2.0], [5.0], [0.5]], [[3.0], [1.0], [9.0]]])
    torch.testing.assert_close(attention_kl(teacher * scale, q, q_mask, p, p_mask), base)
    # a row without teacher mass on real passage tokens is skipped, like a padded query token
    silent = teacher.clone()
    silent[1, 2, :2] = 0.0
    dropped = q_mask.clone()
    dropped[1, 2] = False
    expected = attention_kl(teacher, q, dropped, p, p_mask)
    torch.testing.assert_close(attention_kl(silent, q, q_mask, p, p_mask), expected)
    assert expected != base


def test_attention_kl_zero_when_student_matches_teacher():
    teacher, q, q_mask, p, p_mask = padded_attention_batch()
    sims = torch.einsum("bid,bjd->bij", q, p)  # (B, Lq, Lp)
    student_probs = sims.masked_fill(~p_mask[:, None], -1e9).softmax(-1)
    assert attention_kl(student_probs, q, q_mask, p, p_mask).item() == pytest.approx(0.0, abs=1e-5)
    assert attention_kl(teacher, q, q_mask, p, p_mask).item() > 0


def test_attention_kl_pair_mask_selects_pairs():
    teacher, q, q_mask, p, p_mask = padded_attention_batch()
    only_first = attention_kl(teacher, q, q_mask, p, p_mask, pair_mask=torch.tensor([True, False]))
    first_alone = attention_kl(teacher[:1], q[:1], q_mask[:1], p[:1], p_mask[:1])
    torch.testing.assert_close(only_first, first_alone)
    q = q.requires_grad_()
    none = attention_kl(teacher, q, q_mask, p, p_mask, pair_mask=torch.tensor([False, False]))
    none.backward()
    assert none.item() == 0.0 and q.grad.abs().sum() == 0


def test_attention_kl_teacher_detached_by_default():
    teacher, q, q_mask, p, p_mask = padded_attention_batch()
    teacher, q = teacher.requires_grad_(), q.requires_grad_()
    attention_kl(teacher, q, q_mask, p, p_mask).backward()
    assert teacher.grad is None
    attention_kl(teacher, q, q_mask, p, p_mask, detach_teacher=False).backward()
    assert teacher.grad is not None and torch.isfinite(teacher.grad).all()
    assert teacher.grad.abs().sum() > 0


# DualReg


def test_symmetric_kl_hand_computed_and_symmetric():
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0]])
    pa, pb = softmax([1, 0, 0]), softmax([0, 0, 2])
    expected = 0.5 * (kl(pa, pb) + kl(pb, pa))
    assert symmetric_kl(a, b).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(symmetric_kl(a, b), symmetric_kl(b, a))
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)


def test_dualreg_is_query_side_plus_passage_side():
    g = torch.Generator().manual_seed(0)
    q1, q2 = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    p1, p2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss = dualreg_loss(q1, q2, p1, p2, group_size=3, tau=0.5)
    expected = 0.0
    for s_a, s_b in [(q1 @ p1.T, q2 @ p1.T), (q1 @ p1.T, q1 @ p2.T)]:
        for row_a, row_b in zip(s_a / 0.5, s_b / 0.5):
            pa, pb = softmax(row_a.tolist()), softmax(row_b.tolist())
            expected += 0.5 * (kl(pa, pb) + kl(pb, pa)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    query_side_only = dualreg_loss(q1, q2, p1, p1, group_size=3, tau=0.5)
    torch.testing.assert_close(query_side_only, symmetric_kl(q1 @ p1.T, q2 @ p1.T, tau=0.5))
    assert dualreg_loss(q1, q1, p1, p1, group_size=3).item() == pytest.approx(0.0, abs=1e-7)


def test_dualreg_group_only_uses_each_querys_group():
    g = torch.Generator().manual_seed(1)
    q1, q2 = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    p = torch.randn(6, 4, generator=g)
    loss = dualreg_loss(q1, q2, p, p, group_size=3, in_batch=False)
    s1 = torch.stack([p[3 * i : 3 * i + 3] @ q1[i] for i in range(2)])
    s2 = torch.stack([p[3 * i : 3 * i + 3] @ q2[i] for i in range(2)])
    torch.testing.assert_close(loss, symmetric_kl(s1, s2))


# MLM


def test_mask_tokens_rates_and_specials():
    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 1000, 3
    ids = torch.randint(10, vocab, (200, 250), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[:100, 200:] = True  # padding
    masked, labels = mask_tokens(ids, special, vocab, mask_id, torch.Generator().manual_seed(1))
    picked = labels != -100
    assert not picked[special].any() and torch.equal(masked[special], ids[special])
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    assert picked[~special].float().mean().item() == pytest.approx(0.15, abs=0.005)
    n = picked.sum().item()
    to_mask = (masked[picked] == mask_id).sum().item() / n
    unchanged = (masked[picked] == ids[picked]).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.015)
    assert unchanged == pytest.approx(0.1 + 0.1 / vocab, abs=0.015)
    assert 1 - to_mask - unchanged == pytest.approx(0.1, abs=0.015)  # random replacements


def test_mask_tokens_is_deterministic_per_generator_seed():
    ids = torch.randint(5, 50, (4, 30), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids, dtype=torch.bool)
    runs = [mask_tokens(ids, special, 50, 1, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


def test_mlm_loss_hand_computed_and_ignores_unpicked():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [5.0, -5.0, 9.0], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[0, -100, 2]])
    expected = 0.5 * (-math.log(softmax([2, 0, 0])[0]) - math.log(softmax([0, 1, 0])[2]))
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    nothing = mlm_loss(logits.requires_grad_(), torch.full((1, 3), -100))
    assert nothing.item() == 0.0
    nothing.backward()
    assert torch.isfinite(logits.grad).all()


# InfoNCE and span masking


def test_infonce_hand_computed_cosine_and_symmetric():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # scale must not matter: cosine similarity
    c = 1 / math.sqrt(2)
    # cosines: a0.b0 = 1, a0.b1 = 0, a1.b0 = c, a1.b1 = c; tau = 0.5 doubles them
    forward = -0.5 * (math.log(softmax([2, 0])[0]) + math.log(softmax([2 * c, 2 * c])[1]))
    backward = -0.5 * (math.log(softmax([2, 2 * c])[0]) + math.log(softmax([0, 2 * c])[1]))
    assert infonce_loss(a, b, tau=0.5).item() == pytest.approx(forward, rel=1e-6)
    loss = infonce_loss(a, b, tau=0.5, symmetric=True)
    assert loss.item() == pytest.approx(0.5 * (forward + backward), rel=1e-6)


def test_infonce_lower_temperature_sharpens_aligned_views():
    reps = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert infonce_loss(reps, reps, tau=0.05) < infonce_loss(reps, reps, tau=1.0)
    assert infonce_loss(reps, reps, tau=0.01).item() < 1e-3


def test_span_mask_replaces_min_k_n_contiguous_real_tokens():
    lengths = [0, 1, 3, 5, 8, 12]
    width = 2 + max(lengths) + 2
    ids = torch.full((len(lengths), width), 0)
    special = torch.ones(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        ids[row, : n + 2] = torch.tensor([101] + list(range(10, 10 + n)) + [102])
        special[row, 1 : n + 1] = False
    starts = set()
    for seed in range(60):
        generator = torch.Generator().manual_seed(seed)
        masked = mask_random_span(ids, special, 103, generator, span_length=5)
        assert torch.equal(masked[special], ids[special])
        for row, n in enumerate(lengths):
            hit = (masked[row] == 103).nonzero().flatten()
            assert len(hit) == min(5, n)
            if n:
                assert hit.tolist() == list(range(hit[0], hit[0] + len(hit)))
        starts.add(int((masked[5] == 103).nonzero()[0]))
    assert starts == set(range(1, 9))  # every start of a 5-span among 12 tokens is drawn


def test_span_mask_is_deterministic_per_generator_seed():
    ids = torch.arange(40).view(2, 20)
    special = torch.zeros(2, 20, dtype=torch.bool)
    runs = [mask_random_span(ids, special, 0, torch.Generator().manual_seed(s)) for s in (3, 3)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], ids)


def test_score_kl_scaling_is_tau_teacher_times_tau_student():
    g = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    for tau in (0.05, 0.5, 2.0):  # one shared T: Hinton's T^2
        scaled = score_kl(teacher, student, tau, tau, scale_by_temperature=True)
        torch.testing.assert_close(scaled, tau**2 * score_kl(teacher, student, tau, tau))
    # a dual-encoder student at 0.05 against a teacher at 1: factor 0.05, not 0.05^2
    plain = score_kl(teacher, student, tau_teacher=1.0, tau_student=0.05)
    scaled = score_kl(teacher, student, tau_teacher=1.0, tau_student=0.05, scale_by_temperature=True)
    torch.testing.assert_close(scaled, 0.05 * plain)
