"""The posttrain step: ``PostTrainer.forward`` outputs and ``posttrain_terms`` equal the pre-refactor step."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from data.collate import SpecialTokens, encoder_inputs
from losses import infonce_loss, mask_random_span, mask_tokens, mlm_loss
from models.dual_encoder import pool
from models.encoder import model_inputs
from pipeline.stages.configs import PosttrainConfig
from pipeline.stages.posttrain import PostTrainer, _special_mask, mlm_head, posttrain_terms

VOCAB, MASK = 40, 3


class Vocabulary:
    """What ``PostTrainer`` reads of a tokenizer."""

    mask_token_id = MASK

    def __len__(self) -> int:
        return VOCAB


def reference_step(trainer: PostTrainer, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The pre-refactor ``PostTrainer.forward``, verbatim: the reference for the numbers."""
    stage, model = trainer.stage, trainer.model
    special = _special_mask(batch)
    generator = torch.Generator(device=batch["input_ids"].device).manual_seed(seed)
    terms = {}
    if stage.mlm:
        masked, labels = mask_tokens(batch["input_ids"], special, trainer.vocab_size, trainer.mask_id,
                                     generator, mlm_probability=stage.mlm_probability)
        logits = model(**model_inputs(model, {**batch, "input_ids": masked})).logits
        terms["mlm"] = mlm_loss(logits, labels)
    if stage.simcse or stage.mirror:
        encoder = model.base_model

        def view(input_ids):
            hidden = encoder(**model_inputs(encoder, {**batch, "input_ids": input_ids})).last_hidden_state
            return pool(hidden, batch["attention_mask"], trainer.pooling)

        first = view(batch["input_ids"])
        if stage.simcse:
            terms["simcse"] = infonce_loss(first, view(batch["input_ids"]), tau=stage.simcse_tau)
        if stage.mirror:
            spans = mask_random_span(batch["input_ids"], special, trainer.mask_id, generator,
                                     span_length=stage.mirror_span)
            terms["mirror"] = infonce_loss(first, view(spans), tau=stage.mirror_tau)
    return terms


@pytest.mark.parametrize("stage", [PosttrainConfig(simcse=0.5, mirror=0.5), PosttrainConfig(),
                                   PosttrainConfig(mirror=0.0), PosttrainConfig(mlm=0.0)],
                         ids=["all", "default", "mlm", "mirror"])
def test_terms_equal_the_pre_refactor_step(stage):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=24)
    trainer = PostTrainer(BertForMaskedLM(config), stage, Vocabulary(), pooling="mean").train()
    g = torch.Generator().manual_seed(0)
    batch = encoder_inputs([torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12, 6)],
                           SpecialTokens(cls=1, sep=2, pad=0))
    torch.manual_seed(1)  # the same dropout masks on both sides
    out = trainer(batch, seed=7)
    terms = posttrain_terms(out, stage)
    torch.manual_seed(1)
    expected = reference_step(trainer, batch, seed=7)
    assert list(terms) == list(expected) == [name for name in ("mlm", "simcse", "mirror") if getattr(stage, name)]
    for name in expected:  # MLM: the head runs on the picked rows alone, a matrix product of other shape
        tolerance = 1e-6 if name == "mlm" else 0
        torch.testing.assert_close(terms[name], expected[name], rtol=tolerance, atol=tolerance, msg=name)
    assert (out.mlm_logits is None) == (not stage.mlm) and (out.simcse_reps is None) == (not stage.simcse)


def test_mlm_logits_at_the_picked_positions_only_give_the_full_forwards_loss_and_gradients():
    """The head applied to the ~15% masked rows: same loss and gradients as logits at every position."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=24)
    trainer = PostTrainer(BertForMaskedLM(config), PosttrainConfig(mlm_probability=0.3), Vocabulary(),
                          pooling="mean").eval()
    g = torch.Generator().manual_seed(0)
    batch = encoder_inputs([torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12, 6)],
                           SpecialTokens(cls=1, sep=2, pad=0))
    out = trainer(batch, seed=3)
    assert out.mlm_logits.shape == (out.mlm_labels.numel(), VOCAB) and (out.mlm_labels != -100).all()
    assert 0 < out.mlm_labels.numel() < int(batch["lengths"].sum())
    picked = posttrain_terms(out, trainer.stage)["mlm"]
    picked_grads = torch.autograd.grad(picked, list(trainer.parameters()), allow_unused=True)

    special = _special_mask(batch)
    generator = torch.Generator().manual_seed(3)
    masked, labels = mask_tokens(batch["input_ids"], special, VOCAB, MASK, generator, mlm_probability=0.3)
    full = mlm_loss(trainer.model(**model_inputs(trainer.model, {**batch, "input_ids": masked})).logits, labels)
    full_grads = torch.autograd.grad(full, list(trainer.parameters()), allow_unused=True)
    torch.testing.assert_close(picked, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(picked_grads, full_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_head_it_does_not_know_gets_logits_at_every_position():
    class Unknown(torch.nn.Module):
        pass

    assert mlm_head(Unknown()) is None
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=24)
    assert mlm_head(BertForMaskedLM(config)) is not None
