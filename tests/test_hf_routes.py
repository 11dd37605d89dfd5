"""Which route puts fused_attn into which model, per transformers line: the README's coverage table,
executable.  For every (family, route) the test asserts either that the fused kernel serves every
attention layer and the model still matches eager, or that the route leaves the model alone (and
how a user finds out).  Runs with the installed transformers (5.x in .venv, 4.x in .venv-hf4)."""
import warnings

import pytest
import torch

import fused_attn
from _hf import TINY, TRANSFORMERS_5, assert_close_to_oracle, batch, load_minilm, oracle_of
from fused_attn import ops
from test_hf_models import FAMILIES as PATCH_FAMILIES
from test_hf_models import tiny

import transformers as tf  # noqa: E402

FAMILIES = list(PATCH_FAMILIES) + ["distilbert", "minilm"]
ROUTES = ["patch", "register", "padding_free"]


def covered(family: str, route: str) -> bool:
    """The README table: patch covers BertSelfAttention-like models on both lines; register
    (attn_implementation="fused_attn") covers every family on 5.x, none of these on 4.x (their 4.x
    modeling code does not go through HF's AttentionInterface); patch(model, padding_free=True) runs
    every encoder layer on packed tokens, DistilBERT's included, on both lines.  On 5.x patch switches a
    model with nothing to swap whose attention goes through the interface (DistilBERT) to
    attn_implementation="fused_attn", and says so."""
    if route == "padding_free":
        return True
    if route == "patch":
        return family != "distilbert" or TRANSFORMERS_5
    return TRANSFORMERS_5


def _model(family):
    if family == "minilm":
        return load_minilm()[1].eval(), 6
    if family == "distilbert":
        torch.manual_seed(0)
        cfg = tf.DistilBertConfig(vocab_size=TINY["vocab_size"], dim=64, hidden_dim=96, n_heads=4, n_layers=2,
                                  dropout=0.0, attention_dropout=0.0, attn_implementation="eager")
        return tf.DistilBertModel(cfg).eval(), 2
    return tiny(family), TINY["num_hidden_layers"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("family", FAMILIES)
def test_route(family, route, monkeypatch):
    model, layers = _model(family)
    ids, mask = batch(3, 12, [12, 8, 3], vocab=min(TINY["vocab_size"], model.config.vocab_size))
    with torch.no_grad():
        oracle = oracle_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
    calls = []
    real = ops.fused_attention
    monkeypatch.setattr(ops, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if route == "patch":
            fused_attn.patch(model)
        elif route == "padding_free":
            fused_attn.patch(model, padding_free=True)
        else:
            fused_attn.register()
            model.set_attn_implementation("fused_attn")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    if covered(family, route):
        assert len(calls) == layers, f"{family} via {route}: {len(calls)} fused calls for {layers} layers"
        if route == "patch" and family == "distilbert":     # switched to the interface route: the user is told
            assert any("switched" in str(w.message) for w in caught), [str(w.message) for w in caught]
        if route == "padding_free":     # real tokens as eager, exact zeros at padding
            real = mask.bool()
            assert_close_to_oracle(f"{family} via {route}", got[real], oracle[real], eager[real])
            assert torch.equal(got[~real], torch.zeros_like(got[~real]))
            return
        assert_close_to_oracle(f"{family} via {route}", got, oracle, eager)
        return
    assert calls == [], f"{family} via {route} unexpectedly runs fused_attn: update the README table"
    if route == "patch":      # the user is told
        assert any("nothing was changed" in str(w.message) for w in caught), [str(w.message) for w in caught]
    else:                     # 4.x: HF logs that it keeps its own attention
        assert model.config._attn_implementation != "fused_attn"
    assert torch.equal(got, eager)
