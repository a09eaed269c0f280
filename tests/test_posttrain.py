"""The posttrain stage from the checkpoints users start from: with and without an MLM head, MLM off.

Each run is the real stage on ten passages (``tests.test_bad_inputs.write_good``) in a temporary
directory; ``train`` is wrapped to see what the stage hands it and the optimizer it builds.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

import pipeline.stages.posttrain as posttrain_module
from data.collate import SpecialTokens, encoder_inputs
from losses import mask_random_span
from pipeline.config import load_config
from pipeline.run import run
from pipeline.stages.posttrain import _special_mask, load_masked_lm
from pipeline.train import train
from tests.test_bad_inputs import SMALL, write_good

LR, HEAD_LR = 1e-4, 1e-2
# What transformers creates for a ``BertModel`` checkpoint; the decoder's weight is the (loaded) word
# embeddings and its bias is ``cls.predictions.bias``, so neither adds a name.
HEAD = {"cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"}


def save_checkpoint(path, tokenizer, with_head: bool):
    """A tiny random BERT over the demo tokenizer: ``BertForMaskedLM``, or a bare ``BertModel`` (no MLM head)."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertForMaskedLM(config) if with_head else BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def run_stage(tmp_path, monkeypatch, model_dir, *overrides) -> dict:
    """Run ``posttrain`` alone; what ``train`` received, its optimizer, and the weights before and after."""
    seen = {}

    def spy(accelerator, trainer, *args, new_parameters=frozenset(), **kwargs):
        prepare = accelerator.prepare

        def recording(*objects):
            seen["optimizer"] = next(o for o in objects if isinstance(o, torch.optim.Optimizer))
            return prepare(*objects)

        monkeypatch.setattr(accelerator, "prepare", recording)
        seen.update(trainer=trainer, new=new_parameters,
                    start={n: p.detach().clone() for n, p in trainer.named_parameters()})
        return train(accelerator, trainer, *args, new_parameters=new_parameters, **kwargs)

    monkeypatch.setattr(posttrain_module, "train", spy)
    config = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.stages=posttrain",
                                f"data.path={write_good(tmp_path / 'beir')}", f"model.name_or_path={model_dir}",
                                *SMALL, "posttrain.train.epochs=2", "posttrain.train.warmup_ratio=0",
                                f"posttrain.train.lr={LR}", f"posttrain.train.head_lr={HEAD_LR}", *overrides])
    run(config)
    seen["moved"] = {n: (p.detach() - seen["start"][n]).abs().max().item()
                     for n, p in seen["trainer"].named_parameters()}
    (seen["stage_dir"],) = config.run_dir.glob("posttrain-*")
    return seen


def learning_rates(seen) -> dict[str, float]:
    """Parameter name -> the learning rate its optimizer group started at."""
    names = {id(p): n for n, p in seen["trainer"].named_parameters()}
    return {names[id(p)]: group["initial_lr"] for group in seen["optimizer"].param_groups for p in group["params"]}


def test_a_checkpoint_without_mlm_head_trains_the_new_head_at_head_lr(tmp_path, monkeypatch, tiny_tokenizer, caplog):
    save_checkpoint(tmp_path / "encoder", tiny_tokenizer, with_head=False)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        seen = run_stage(tmp_path, monkeypatch, tmp_path / "encoder")

    new = {f"model.{name}" for name in HEAD}
    assert seen["new"] == new
    lrs = learning_rates(seen)
    assert set(lrs) == set(seen["moved"])  # MLM on: every parameter trains
    assert {n for n, lr in lrs.items() if lr == HEAD_LR} == new
    assert {lr for n, lr in lrs.items() if n not in new} == {LR}
    assert all(moved > 0 for moved in seen["moved"].values()), seen["moved"]
    model = seen["trainer"].model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, so not new
    (line,) = [r.getMessage() for r in caplog.records if "no MLM head" in r.getMessage()]
    assert "tied to the input embeddings" in line and "cls.predictions.transform.dense" in line
    assert f"head_lr={HEAD_LR:g}" in line
    # The post-trained model is saved with its head: loading it creates nothing.
    assert load_masked_lm(str(seen["stage_dir"] / "final"))[1] == frozenset()


def test_a_checkpoint_with_mlm_head_keeps_it(tmp_path, tiny_tokenizer):
    saved = save_checkpoint(tmp_path, tiny_tokenizer, with_head=True)
    model, new = load_masked_lm(str(tmp_path))
    assert new == frozenset()
    for name, param in saved.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], param, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("term", ["simcse", "mirror"])
def test_simcse_or_mirror_alone_trains_the_encoder_with_mlm_off(tmp_path, monkeypatch, tiny_tokenizer, term):
    save_checkpoint(tmp_path / "encoder", tiny_tokenizer, with_head=False)
    seen = run_stage(tmp_path, monkeypatch, tmp_path / "encoder", "posttrain.mlm=0", "posttrain.mirror=0",
                     f"posttrain.{term}=1")

    log = [json.loads(line) for line in (seen["stage_dir"] / "train_log.jsonl").read_text().splitlines()]
    assert log and all(set(row) & {"mlm", "simcse", "mirror"} == {term} for row in log)
    lrs = learning_rates(seen)
    encoder = {n for n in seen["moved"] if n.startswith("model.bert.")}
    assert set(lrs) == encoder and set(lrs.values()) == {LR}  # the head gets no gradient: frozen
    assert all(seen["moved"][n] > 0 for n in encoder)
    assert all(seen["moved"][n] == 0 for n in set(seen["moved"]) - encoder)


@pytest.mark.parametrize("span_length", [1, 3, 5, 20])
def test_span_mask_replaces_k_consecutive_content_tokens(span_length):
    """``min(k, n)`` consecutive content tokens become [MASK]; [CLS], [SEP] and padding never do."""
    mask_id, lengths = 3, [0, 1, 2, 4, 7, 12]
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        rows = [torch.randint(4, 40, (n,), generator=g).tolist() for n in lengths]
        batch = encoder_inputs(rows, SpecialTokens(cls=1, sep=2, pad=0))
        ids = batch["input_ids"]  # (B, T)
        masked = mask_random_span(ids, _special_mask(batch), mask_id, g, span_length=span_length)
        for row, n in enumerate(lengths):
            changed = (masked[row] != ids[row]).nonzero().flatten().tolist()
            k = min(span_length, n)  # a row shorter than the span is masked whole
            first = changed[0] if changed else 1
            assert changed == list(range(first, first + k))  # k consecutive positions
            assert all(1 <= i <= n for i in changed)  # content positions only
            assert (masked[row, changed] == mask_id).all()

