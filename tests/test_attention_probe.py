"""The one-layer attention probe equals eager attention on that layer and leaves every other layer on SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForSequenceClassification,
    BertConfig,
    ElectraConfig,
    RobertaConfig,
)
from transformers.models.bert import modeling_bert

from data.collate import SpecialTokens, cross_inputs
from models.attention_probe import PROBE_ATTENTION, AttentionProbe, attention_modules, probe_attention_forward
from models.encoder import model_inputs

LAYERS = 3
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64)
CONFIGS = {
    "bert": lambda **kw: BertConfig(**TINY, **kw),
    "roberta": lambda **kw: RobertaConfig(**TINY, pad_token_id=1, max_position_embeddings=64, **kw),
    "electra": lambda **kw: ElectraConfig(**TINY, embedding_size=32, **kw),
}


def make_pair(kind: str = "bert"):
    """The same random weights as an SDPA model and an eager model, in eval mode."""
    torch.manual_seed(0)
    sdpa = AutoModelForSequenceClassification.from_config(CONFIGS[kind](num_labels=1), attn_implementation="sdpa")
    eager = AutoModelForSequenceClassification.from_config(CONFIGS[kind](num_labels=1), attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    return sdpa.eval(), eager.eval()


@pytest.fixture(scope="module")
def batch():
    """Pairs of mixed query and passage lengths, so rows carry different amounts of padding."""
    gen = torch.Generator().manual_seed(1)
    lengths = [(3, 9), (1, 4), (5, 2), (2, 12)]
    queries = [torch.randint(5, 64, (nq,), generator=gen).tolist() for nq, _ in lengths]
    passages = [torch.randint(5, 64, (np_,), generator=gen).tolist() for _, np_ in lengths]
    return cross_inputs(queries, passages, SpecialTokens(cls=2, sep=3, pad=1))


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_probe_equals_eager_output_attentions(kind, layer, batch):
    sdpa, eager = make_pair(kind)
    inputs = model_inputs(sdpa, batch)
    with torch.no_grad():
        with AttentionProbe(sdpa, layer).record() as recording:
            probed = sdpa(**inputs).logits
        plain = sdpa(**inputs).logits
        reference = eager(**inputs, output_attentions=True)
    torch.testing.assert_close(recording.probs, reference.attentions[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(probed, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(probed, reference.logits, atol=1e-5, rtol=0)


def test_hidden_states_match_sdpa(batch):
    sdpa, _ = make_pair()
    inputs = model_inputs(sdpa, batch)
    with torch.no_grad():
        with AttentionProbe(sdpa, 1).record():
            probed = sdpa(**inputs, output_hidden_states=True).hidden_states
        plain = sdpa(**inputs, output_hidden_states=True).hidden_states
    for a, b in zip(probed, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_probe_on_an_eager_model_reads_float_masks(batch):
    _, eager = make_pair()
    inputs = model_inputs(eager, batch)
    with torch.no_grad():
        with AttentionProbe(eager, 0).record() as recording:
            reference = eager(**inputs, output_attentions=True)
    torch.testing.assert_close(recording.probs, reference.attentions[0], atol=1e-6, rtol=0)


def test_gradients_flow_through_probabilities(batch):
    sdpa, _ = make_pair()
    probe = AttentionProbe(sdpa, -1)
    with probe.record() as recording:
        sdpa(**model_inputs(sdpa, batch))
    weights = torch.rand_like(recording.probs)
    (recording.probs * weights).sum().backward()
    chosen = probe.module
    assert chosen.query.weight.grad.abs().sum() > 0
    assert sdpa.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert sdpa.bert.encoder.layer[0].attention.self.key.weight.grad.abs().sum() > 0


def test_only_the_chosen_layer_leaves_sdpa(batch, monkeypatch):
    sdpa, _ = make_pair()
    calls = []

    def spy(name, function):
        def wrapped(module, *args, **kwargs):
            calls.append((name, module.layer_idx))
            return function(module, *args, **kwargs)

        return wrapped

    mapping = AttentionInterface._global_mapping
    monkeypatch.setitem(mapping, "sdpa", spy("sdpa", mapping["sdpa"]))
    monkeypatch.setitem(mapping, PROBE_ATTENTION, spy("probe", mapping[PROBE_ATTENTION]))
    monkeypatch.setattr(modeling_bert, "eager_attention_forward", spy("eager", modeling_bert.eager_attention_forward))
    with torch.no_grad():
        with AttentionProbe(sdpa, 1).record():
            sdpa(**model_inputs(sdpa, batch))
        assert calls == [("sdpa", 0), ("probe", 1), ("sdpa", 2)]
        calls.clear()
        sdpa(**model_inputs(sdpa, batch))
    assert calls == [("sdpa", 0), ("sdpa", 1), ("sdpa", 2)]


def test_record_restores_the_model_and_spares_other_models(batch):
    sdpa, _ = make_pair()
    other, _ = make_pair()
    probe = AttentionProbe(sdpa, 1)
    with torch.no_grad():
        before = other(**model_inputs(other, batch)).logits
        with probe.record():
            assert probe.module.config._attn_implementation == PROBE_ATTENTION
            assert sdpa.config._attn_implementation == "sdpa"
            during = other(**model_inputs(other, batch)).logits
    assert probe.module.config is sdpa.config
    assert all(m.config is other.config for m in attention_modules(other))
    assert other.config._attn_implementation == "sdpa"
    torch.testing.assert_close(before, during, atol=0, rtol=0)


def test_training_dropout_matches_eager_and_probabilities_stay_distributions():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=gen) for _ in range(3))
    float_mask = torch.zeros(2, 1, 5, 5)
    float_mask[1, ..., 3:] = torch.finfo(torch.float32).min
    module = torch.nn.Module().train()
    torch.manual_seed(3)
    out, probs = probe_attention_forward(module, q, k, v, float_mask == 0, scaling=0.5, dropout=0.3)
    torch.manual_seed(3)
    ref_out, ref_dropped = modeling_bert.eager_attention_forward(module, q, k, v, float_mask, scaling=0.5, dropout=0.3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))
    assert (ref_dropped == 0).any() and not (probs[0] == 0).any()


def test_rejects_bad_layers_and_unsupported_backends():
    sdpa, _ = make_pair()
    with pytest.raises(IndexError):
        AttentionProbe(sdpa, LAYERS)
    sdpa.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="checkpointing"):
        with AttentionProbe(sdpa, 0).record():
            pass


def test_a_checkpointed_cross_encoder_keeps_its_probed_layer_and_its_gradients(batch):
    from models.cross_encoder import CrossEncoder
    from transformers.modeling_layers import GradientCheckpointingLayer

    grads = []
    for checkpointing in (False, True):
        ce = CrossEncoder(make_pair()[0], attention_layer=1).train()  # dropout on: checkpointing replays it
        if checkpointing:
            ce.enable_gradient_checkpointing()
            units = [u.gradient_checkpointing for u in ce.modules() if isinstance(u, GradientCheckpointingLayer)]
            assert units == [True, False, True]
        torch.manual_seed(0)
        out = ce(batch, return_attention=True)
        (out.scores.sum() + out.attention.pow(2).sum()).backward()
        grads.append({name: p.grad for name, p in ce.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
