"""Typed configuration of each stage kind (composed into ``PipelineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.fields import bounded, noted, one_of
from pipeline.train import TrainConfig

DISTILL_TERMS = ("ce", "col", "de", "kl_ce_col", "kl_col_de", "kl_ce_de", "attn", "dualreg")
POSTTRAIN_TERMS = ("mlm", "simcse", "mirror")
TEACHER_TARGETS = ("kl_ce_col", "kl_ce_de", "attn")  # terms that read the teacher as a (detached) target


@dataclass(frozen=True)
class PosttrainConfig:
    """MLM on the corpus with Mirror-BERT (dropout views, one span-masked); SimCSE (dropout views) optional."""

    # head_lr: a checkpoint without an MLM head (sentence-transformers) gets a random transform layer,
    # which at an encoder's rate (1e-5 to 5e-5 for a pretrained one) stays near random for a short
    # stage while its noise reaches the encoder; 1e-3 is the usual AdamW rate of a fresh head.
    # A checkpoint with its head has no new parameters: there it changes nothing.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=5e-4, head_lr=1e-3))
    batch_size: int = bounded(32, ge=1, note="passages; at most the corpus size")
    mlm: float = bounded(1.0, ge=0, note="mlm, simcse, mirror: not all 0; 0: SimCSE or Mirror-BERT alone")
    simcse: float = bounded(0.0, ge=0)
    # Mirror-BERT on by default: MLM alone trains no similarity, and mean-pooled MLM states rank
    # poorly (the anisotropy SimCSE and Mirror-BERT set out to fix). On the demo, one epoch of MLM
    # alone took the random model's zero-shot dual-encoder from nDCG@10 0.048 to 0.042, MLM +
    # Mirror-BERT to 0.053; three or five epochs made either worse (README, "Post-training on the demo").
    mirror: float = bounded(1.0, ge=0)
    mlm_probability: float = bounded(0.15, gt=0, le=1)
    simcse_tau: float = bounded(0.05, gt=0)
    mirror_tau: float = bounded(0.04, gt=0)
    mirror_span: int = bounded(5, ge=1)


@dataclass(frozen=True)
class TeacherConfig:
    """Cross-encoder on (query, positive, BM25 negatives) groups with the listwise ``ce`` loss."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=1e-3, checkpoint_every=250))
    batch_size: int = bounded(16, ge=1, note="groups; at most the judged training queries")
    group_size: int = bounded(4, ge=2, note="the positive and group_size - 1 negatives from the corpus")
    tau: float = bounded(1.0, gt=0)
    # -1: run.seed. A seed of its own makes the stage (its hash and its training) the same for every
    # run seed, so a benchmark over seeds trains the teacher once and every seed distils from it
    # (unless an earlier seeded stage, posttrain, feeds it).
    seed: int = bounded(-1, ge=-1, le=2**31 - 1, note="-1: run.seed")


@dataclass(frozen=True)
class LossWeights:
    """Weight of every distillation term; 0 removes the term and the work it needs."""

    ce: float = bounded(1.0, ge=0)
    col: float = bounded(1.0, ge=0)
    de: float = bounded(1.0, ge=0)
    kl_ce_col: float = bounded(1.0, ge=0)
    kl_col_de: float = bounded(1.0, ge=0)
    kl_ce_de: float = bounded(1.0, ge=0)
    attn: float = bounded(1.0, ge=0)
    dualreg: float = bounded(1.0, ge=0)


@dataclass(frozen=True)
class MemoryConfig:
    """How a distillation step fits in memory; none of these changes its losses or gradients.

    ``mini_batch`` > 0 caches gradients (GradCache, ``pipeline/grad_cache.py``): the student's
    vectors and token vectors of the whole batch are computed without a graph, the losses on them,
    then each chunk is encoded again with its graph (dropout replayed) and back-propagated. The
    teacher runs in chunks too. Peak memory then follows ``mini_batch``, not ``batch_size``, at the
    price of one more student forward. It counts texts per student forward and (query, passage)
    pairs per teacher forward; a training teacher takes whole groups, ``max(1, mini_batch //
    group_size)`` per forward. 0: one forward over the batch.

    ``checkpoint_*`` recompute each encoder layer in the backward pass instead of keeping its
    activations (the cross-encoder's probed attention layer excepted).
    """

    mini_batch: int = bounded(0, ge=0, note="0: off")
    checkpoint_dual_encoder: bool = False
    checkpoint_cross_encoder: bool = False


@dataclass(frozen=True)
class DistillConfig:
    """Cascaded CE -> ColBERT -> DE distillation, trained jointly ("on the fly").

    Candidates C(q) for the KL terms are each query's group; the ``de`` and ``dualreg`` terms also
    see every passage in the batch when ``in_batch``, and those of every process when
    ``cross_device`` too. ``batch_size`` is the global batch, split over the processes.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=5e-4, checkpoint_every=100))
    batch_size: int = bounded(8, ge=1, note="groups; at most the judged training queries")
    # Every term but de and dualreg in-batch ranks within the group, which needs a negative.
    group_size: int = bounded(4, ge=1, note="1 only with de and dualreg alone, in_batch")
    weights: LossWeights = field(default_factory=LossWeights)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    in_batch: bool = True
    cross_device: bool = True  # with in_batch: the passages of every process are candidates (RocketQA)
    # DualReg's second dropout view without a graph: its gradient reaches view 1 only, for the
    # activations and backward of one student forward less.
    dualreg_one_sided: bool = False
    tau_de: float = bounded(0.05, gt=0)
    tau_col: float = bounded(1.0, gt=0)
    tau_ce: float = bounded(1.0, gt=0)
    # ColBERT token vectors are unit-norm, so t.t lies in [-1, 1]: at tau 1 no token can take more
    # than e^2 / (e^2 + 99) = 7% of a student row over 100 passage tokens, flatter than a peaked CE
    # row. Sharper is not safer: on the demo, tau 0.05 (logits of +-20) let the attention term's
    # gradients swamp the contrastive term and the dual-encoder collapsed (nDCG@10 0.0068), 0.2
    # gave 0.171 and 1 gave 0.477 (README, "Two commands").
    tau_attn: float = bounded(1.0, gt=0)
    kl_temperature_squared: bool = False
    # Decoupled KL (DKD, Zhao et al., 2022) for the group terms kl_ce_col, kl_col_de, kl_ce_de: the
    # plain KL weighs the KL over the negatives by 1 - p_t, which a teacher sure of the positive
    # (0.96 on SciFact's groups of 4) all but switches off; > 0 gives it this weight instead.
    kl_negatives: float = bounded(0.0, ge=0, note="0: the plain KL; > 0: the positive's binary KL + this weight "
                                  "x the KL over the negatives alone")
    freeze_teacher: bool = False
    colbert_dim: int = bounded(128, ge=1)
    attn_layer: int = noted(-1, "a layer of the cross-encoder, -L to L - 1 (negative: from the last)")
    attn_heads: str = one_of("mean", ("mean", "max"))
    attn_pairs: str = one_of("positive", ("positive", "all"))
    # "cross_encoder": the teacher stage's model, run in the step; "scores": the frozen, cached
    # scores of a ``scores`` stage (no teacher forward; ``ce`` and ``attn`` must then be 0).
    teacher: str = one_of("cross_encoder", ("cross_encoder", "scores"))


def warmup_config() -> DistillConfig:
    """ERNIE-Search's CE -> DE stage before the cascade: the dual-encoder learns from the CE alone."""
    off = dict(col=0.0, kl_ce_col=0.0, kl_col_de=0.0, attn=0.0)
    return DistillConfig(weights=LossWeights(**off))


SCORE_COMPONENTS = ("bm25", "dual_encoder", "trained_dual_encoder", "cross_fitted_dual_encoder",
                    "cross_encoder")  # ScoresConfig's weights


@dataclass(frozen=True)
class CrossFitConfig:
    """The ``scores`` stage's own dual-encoders for ``cross_fitted_dual_encoder``, trained contrastively.

    The training queries are split into ``folds`` by their ids (sha256("fold:" + id) mod folds);
    fold k's model starts from the starting encoder and trains on every query outside fold k with
    the ``de`` term alone (BM25 negatives, in-batch), so each training query is scored by a model
    that never saw it. A teacher trained on the very queries it scores is sure of them (on SciFact
    it put 0.96 of a group's probability on the positive) and tells the student little beyond the
    labels. ``seed`` replaces ``run.seed`` here: the stage is shared by every seed of a run.
    """

    folds: int = bounded(2, ge=2)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=3e-5, checkpoint_every=25))
    batch_size: int = bounded(16, ge=1, note="groups; at most the judged training queries of a fold's model")
    group_size: int = bounded(4, ge=1)
    tau: float = bounded(0.05, gt=0)
    seed: int = bounded(13, ge=0, le=2**31 - 1)


@dataclass(frozen=True)
class ScoresConfig:
    """A frozen teacher scored once: every training query against its candidates, cached for ``distill``.

    Candidates are the query's positives and mined negatives. Each component's scores are
    z-normalised over the query's candidate list and summed with these weights (hybrid lexical +
    neural ranking); ``dual_encoder`` is the starting encoder (after ``posttrain`` if it ran),
    ``trained_dual_encoder`` the dual-encoder of the last ``warmup`` or ``distill`` stage before this
    one, ``cross_fitted_dual_encoder`` dual-encoders this stage trains so that no training query is
    scored by a model trained on it (``cross_fit``; evaluation lists get their mean), and
    ``cross_encoder`` the ``teacher`` stage's model. ``passage_max_len`` (0: ``eval.passage_max_len``)
    lets the teacher read more of each passage than the student does. On SciFact train the fused
    teacher puts a negative above the positive for 44% of the queries: without the correction its
    KL terms would pull the student away from the labels.
    """

    bm25: float = bounded(1.0, ge=0, note="bm25 and the other four weights: not all 0")
    dual_encoder: float = bounded(1.0, ge=0)
    trained_dual_encoder: float = bounded(0.0, ge=0, note="needs a warmup or distill stage before scores")
    cross_fitted_dual_encoder: float = bounded(0.0, ge=0, note="trains scores.cross_fit.folds models")
    cross_encoder: float = bounded(0.0, ge=0)
    passage_max_len: int = bounded(0, ge=0, note="0: eval.passage_max_len")
    # Training lists only: labels overrule the teacher's order. A positive scored below a negative is
    # lifted to the best negative's score + ``positive_margin`` (negatives keep their scores).
    label_correction: bool = True
    positive_margin: float = bounded(1.0, ge=0)
    cross_fit: CrossFitConfig = field(default_factory=CrossFitConfig)


@dataclass(frozen=True)
class RefreshConfig:
    """Mine new hard negatives with the current dual-encoder through FAISS (RocketQA / ERNIE-Search).

    The top ``skip_top`` non-relevant passages are skipped: they are often unlabelled positives.
    """

    depth: int = bounded(30, ge=1)
    skip_top: int = bounded(0, ge=0)


def stage_seed(config, name: str) -> int:
    """The seed stage ``name`` of ``config`` (a ``PipelineConfig``) trains with.

    ``teacher.seed`` for the teacher where it is set, else ``run.seed``.
    """
    if name == "teacher" and config.teacher.seed >= 0:
        return config.teacher.seed
    return config.run.seed


def needs(weights: dict[str, float], teacher: str = "cross_encoder") -> dict[str, bool]:
    """What a set of weights needs: the CE model (``ce``), cached teacher scores (``cached``), ColBERT (``col``)."""
    reads_teacher = any(weights[t] for t in ("ce", *TEACHER_TARGETS))
    return {
        "ce": reads_teacher and teacher == "cross_encoder",
        "cached": reads_teacher and teacher == "scores",
        "col": any(weights[t] for t in ("col", "kl_ce_col", "kl_col_de", "attn")),
    }


def term_weights(stage: DistillConfig) -> dict[str, float]:
    """The stage's weight of every term, with ``ce`` at 0 unless the CE trains on the fly.

    The CE trains only when its own ``ce`` term is on and it is not frozen: with ``ce`` at 0 it is
    frozen (no graph, no dropout, no unused parameters under DDP) even if other terms read it.
    """
    weights = {name: float(value) for name, value in vars(stage.weights).items()}
    if not (needs(weights, stage.teacher)["ce"] and weights["ce"] and not stage.freeze_teacher):
        weights["ce"] = 0.0
    return weights
