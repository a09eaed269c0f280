"""Score distillation ``KL(P_teacher || P_student)`` over each query's candidate list."""

from __future__ import annotations

import torch


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``log_softmax`` over the last dim with masked-out entries at the dtype's minimum.

    The finite minimum rather than ``-inf`` keeps ``0 * log p`` and gradients free of NaN; rows
    with no valid entry come out uniform and must be dropped by the caller.

    >>> masked_log_softmax(torch.zeros(1, 3), torch.tensor([[True, True, False]])).exp()
    tensor([[0.5000, 0.5000, 0.0000]])
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.log_softmax(dim=-1)


def kl_rows(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Row-wise ``sum_c P_t(c) (log P_t(c) - log P_s(c))`` with masked entries contributing 0.

    Args:
        teacher_logp, student_logp: (..., C) log-probabilities.
        mask: (..., C) bool, True on valid entries, or None.

    Returns:
        (...) KL per row.

    >>> logp = torch.tensor([[0.5, 0.5]]).log()
    >>> kl_rows(logp, logp)
    tensor([0.])
    """
    terms = teacher_logp.exp() * (teacher_logp - student_logp)  # (..., C)
    if mask is not None:
        terms = terms.masked_fill(~mask, 0.0)
    return terms.sum(dim=-1)


def decoupled_kl_rows(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KL over a list whose column 0 is the positive, split into its two parts (DKD).

    ``KL(P_t || P_s) = TCKD + (1 - p_t) NCKD``: ``TCKD`` is the binary KL between
    ``(p, 1 - p)`` of teacher and student, ``p`` the positive's probability; ``NCKD`` the KL
    between their distributions over the negatives alone (renormalised). A teacher sure of the
    positive (``p_t`` near 1) leaves the negatives' order almost no weight in the plain KL.

    Args:
        teacher_logits, student_logits: (Q, C) scores already divided by their temperatures.
        mask: (Q, C) bool, True on valid candidates (column 0 always valid), or None.

    Returns:
        (Q,) TCKD, (Q,) NCKD (0 for a row without a valid negative), (Q,) teacher ``p_t``.

    Reference: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

    >>> t, s = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    >>> tckd, nckd, p = decoupled_kl_rows(t, s)
    >>> plain = kl_rows(t.log_softmax(-1), s.log_softmax(-1))
    >>> torch.allclose(tckd + (1 - p) * nckd, plain)
    True
    """
    teacher_logp = masked_log_softmax(teacher_logits, mask)  # (Q, C)
    student_logp = masked_log_softmax(student_logits, mask)  # (Q, C)
    neg_mask = mask[:, 1:] if mask is not None else torch.ones_like(teacher_logits[:, 1:], dtype=torch.bool)  # (Q, C-1)
    has_negative = neg_mask.any(dim=-1)  # (Q,)

    def rest(logp: torch.Tensor) -> torch.Tensor:  # (Q,) log(1 - p), the negatives' log-mass: stable near p = 1
        # The finite minimum, not -inf: a row without a negative must not put NaN into the gradient.
        masked = logp[:, 1:].masked_fill(~neg_mask, torch.finfo(logp.dtype).min)
        return masked.logsumexp(dim=-1).masked_fill(~has_negative, 0.0)

    p_teacher = teacher_logp[:, 0].exp()  # (Q,)
    tckd = (p_teacher * (teacher_logp[:, 0] - student_logp[:, 0])
            + (1 - p_teacher) * (rest(teacher_logp) - rest(student_logp)))  # (Q,)
    nckd = kl_rows(masked_log_softmax(teacher_logits[:, 1:], neg_mask),
                   masked_log_softmax(student_logits[:, 1:], neg_mask), neg_mask)  # (Q,): 0 without a negative
    return tckd, nckd, p_teacher


def score_kl(
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    tau_teacher: float = 1.0,
    tau_student: float = 1.0,
    mask: torch.Tensor | None = None,
    detach_teacher: bool = True,
    scale_by_temperature: bool = False,
    negatives_weight: float = 0.0,
) -> torch.Tensor:
    """KL divergence from the teacher's to the student's distribution over the candidates.

    ``P_X(c | q) = softmax_{c in C(q)}(s_X(q, c) / tau_X)``

    ``L = 1/Q sum_q sum_c P_t(c | q) (log P_t(c | q) - log P_s(c | q))``   (``batchmean``)

    With ``scale_by_temperature`` the loss is multiplied by ``tau_teacher * tau_student``, Hinton's
    ``T^2`` for two temperatures: the gradient on the raw student scores is
    ``(P_s - P_t) / tau_student``, and at high temperatures ``P_s - P_t`` shrinks like ``1 / tau``
    too. With one shared ``T`` (sentence-transformers ``DistillKLDivLoss``) the factor is ``T^2``;
    ``tau_student ** 2`` alone would divide the term by 400 at a dual-encoder's 0.05 against a
    teacher at 1. Off by default because the pipeline's weights are set for the unscaled loss, as
    in ERNIE-Search.

    Args:
        teacher_scores: (Q, C) teacher scores (CE or Col).
        student_scores: (Q, C) student scores over the same candidates, same column order.
        tau_teacher, tau_student: temperatures of each side.
        mask: (Q, C) bool, True on valid candidates; False entries (e.g. padding of groups with
            fewer negatives) have no effect. A row with no valid candidate contributes 0 but still
            counts in the mean over Q.
        detach_teacher: stop gradients into the teacher (default); False trains both sides.
        scale_by_temperature: multiply by ``tau_teacher * tau_student``.
        negatives_weight: 0 for the plain KL; ``beta > 0`` for the decoupled KL
            ``TCKD + beta NCKD`` (``decoupled_kl_rows``; column 0 must be the positive), which
            gives the teacher's order of the negatives a weight of its own instead of ``1 - p_t``.

    Returns:
        scalar loss, >= 0, zero when both distributions agree.

    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015;
    Lu et al., "ERNIE-Search", 2022.

    >>> teacher = torch.tensor([[2.0, 0.0, 0.0]])
    >>> round(score_kl(teacher, teacher).item(), 6)
    0.0
    >>> score_kl(teacher, torch.zeros(1, 3))  # sum_c P_t(c) log(3 P_t(c))
    tensor(0.4330)
    >>> score_kl(teacher, torch.zeros(1, 3), 2.0, 2.0, scale_by_temperature=True)  # T^2 x unscaled
    tensor(0.4931)
    """
    if detach_teacher:
        teacher_scores = teacher_scores.detach()
    teacher_logits, student_logits = teacher_scores / tau_teacher, student_scores / tau_student  # (Q, C)
    if negatives_weight:
        tckd, nckd, _ = decoupled_kl_rows(teacher_logits, student_logits, mask)
        rows = tckd + negatives_weight * nckd  # (Q,)
    else:
        rows = kl_rows(masked_log_softmax(teacher_logits, mask), masked_log_softmax(student_logits, mask), mask)
    loss = rows.sum() / teacher_scores.shape[0]
    if scale_by_temperature:
        loss = loss * (tau_teacher * tau_student)
    return loss
