"""DeBERTa-v2 / v3 under ``fused_attn.patch`` (padded and padding-free): outputs and every parameter
gradient against HF's eager DeBERTa on the real tokens, for v3 and v2 settings, c2p only, p2c only,
the v2 ConvLayer, padding on either side and with holes; the task heads; unpatch; fallbacks;
training with dropout, gradient checkpointing and the Trainer.

Oracle: the same model run eagerly by HF in fp64; bound: 2x the error of HF's fp32 eager + floor
(docs/design.md).  Padded query rows are not compared on the padded route (HF's rows of padding
attend to every key with equal weight; fused_attn's attend to the real keys); padding-free outputs
are exact zeros there.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fused_attn
from _hf import MASK, assert_close_to_oracle, batch, check_real_tokens, grads_of, inputs

transformers = pytest.importorskip("transformers")
from fused_attn.integrations import deberta  # noqa: E402
from fused_attn.integrations.hf import fused_modules, is_patched  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, pooler_dropout=0.0)
# v3: log buckets (8 buckets: |i - j| >= 4 is bucketed, so the 13-token batch crosses the boundary),
# shared keys, LayerNorm on the rel embeddings, no absolute positions
V3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=64, pos_att_type="p2c|c2p",
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)
# v2: plain relative positions clamped at 5 (shorter than the batch), separate position projections
V2 = dict(relative_attention=True, position_buckets=-1, max_relative_positions=5, pos_att_type="c2p|p2c",
          share_att_key=False, norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2)
CONFIGS = {
    "v3": V3,
    "v2": V2,
    "c2p-only": dict(V2, pos_att_type="c2p"),
    "p2c-only": dict(V3, pos_att_type="p2c", share_att_key=False),
    "v2-conv": dict(V2, conv_kernel_size=3),
    "no-relative": dict(V2, relative_attention=False),
}

# engines that take rel_bias (probed once); Triton under its interpreter only on one small case
ENGINES = ["reference", "cpu"]


def _supports_rel_bias(name: str) -> str:
    """'' when ``name`` runs a rel_bias call here, else why not."""
    from fused_attn import backends

    why = backends.reasons(name, torch.empty(1, 1, 1, 16)) if name != "reference" else []
    if why:
        return "; ".join(why)
    q = torch.randn(1, 1, 3, 16)
    table = torch.randn(1, 1, 3, 4)
    try:
        bias = fused_attn.DisentangledBias(table, table, torch.zeros(5, dtype=torch.long))
        fused_attn.attention(q, q, q, backend=name, rel_bias=bias)
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as e:
        return str(e)
    return ""


@pytest.fixture(params=ENGINES)
def backend(request):
    why = _supports_rel_bias(request.param)
    if why:
        pytest.skip(f"{request.param} takes no rel_bias here: {why}")
    return request.param


def tiny(config="v3", head=None, **over):
    kw = dict(TINY, **CONFIGS[config])
    kw.update(over)
    cfg = transformers.DebertaV2Config(**kw)
    classes = {None: transformers.DebertaV2Model, "seq": transformers.DebertaV2ForSequenceClassification,
               "tok": transformers.DebertaV2ForTokenClassification, "qa": transformers.DebertaV2ForQuestionAnswering,
               "mlm": transformers.DebertaV2ForMaskedLM}
    torch.manual_seed(0)
    return classes[head](cfg).eval()


def _with_token_types(x):
    return dict(x, token_type_ids=(torch.arange(x["input_ids"].shape[1]) % 2).expand_as(x["input_ids"]))


# --------------------------------------------------------------------------------------------
# parity with HF eager


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_outputs_and_gradients_match_hf(config, padding_free, backend):
    """Right padding, a full row, left padding (and on the padded route, holes)."""
    mask = MASK if not padding_free else MASK[:3]
    model = tiny(config)
    x = _with_token_types(inputs(mask))
    oracle_model = copy.deepcopy(model).double()
    fused = fused_attn.patch(copy.deepcopy(model), backend=backend, padding_free=padding_free)
    assert len(fused_modules(fused)) == 2

    eager = model(**x).last_hidden_state
    oracle = oracle_model(**x).last_hidden_state
    got = fused(**x).last_hidden_state
    real = mask.bool()
    if padding_free:
        check_real_tokens(f"{config} out", got, oracle, eager, mask)
    else:
        assert_close_to_oracle(f"{config} out", got[real], oracle[real], eager[real])

    _, g_eager = grads_of(model, x)
    _, g_oracle = grads_of(oracle_model, x)
    _, g_got = grads_of(fused, x)
    assert set(g_got) == set(g_eager), set(g_got) ^ set(g_eager)
    for name in g_eager:
        assert_close_to_oracle(f"{config} grad {name}", g_got[name], g_oracle[name], g_eager[name])
    if CONFIGS[config]["relative_attention"]:        # the position projections and rel embeddings learn
        assert g_got["encoder.rel_embeddings.weight"].abs().sum() > 0


def test_triton_interpreted_tiny_case():
    """The Triton kernels (interpreted) on one tiny padding-free v3 case."""
    why = _supports_rel_bias("triton")
    if why:
        pytest.skip(f"triton takes no rel_bias here: {why}")
    model = tiny("v3", num_hidden_layers=1)
    mask = torch.tensor([[1] * 6 + [0] * 3, [0] * 2 + [1] * 7])
    ids, _ = batch(2, 9, [9, 9])
    x = dict(input_ids=ids, attention_mask=mask)
    oracle = copy.deepcopy(model).double()(**x).last_hidden_state
    eager = model(**x).last_hidden_state
    for pf in (False, True):
        got = fused_attn.patch(copy.deepcopy(model), backend="triton", padding_free=pf)(**x).last_hidden_state
        real = mask.bool()
        assert_close_to_oracle(f"triton pf={pf}", got[real], oracle[real], eager[real])


@pytest.mark.parametrize("head", ["seq", "tok", "qa", "mlm"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_task_heads(head, padding_free):
    model = tiny("v3", head=head, num_labels=2 if head == "qa" else 3)
    mask = torch.tensor([[1] * 13, [1] * 9 + [0] * 4, [1] * 4 + [0] * 9])    # right padding: the poolers read token 0
    ids, _ = batch(3, 13, [13] * 3)
    x = dict(input_ids=ids, attention_mask=mask)
    fused = fused_attn.patch(copy.deepcopy(model), backend="reference", padding_free=padding_free)
    oracle_model = copy.deepcopy(model).double()
    names = {"seq": ["logits"], "tok": ["logits"], "qa": ["start_logits", "end_logits"], "mlm": ["logits"]}[head]
    real = mask.bool()
    for name in names:
        got, eager, oracle = (getattr(m(**x), name) for m in (fused, model, oracle_model))
        if head != "seq":
            got, eager, oracle = got[real], eager[real], oracle[real]
        assert_close_to_oracle(f"{head} {name}", got, oracle, eager)


# --------------------------------------------------------------------------------------------
# patch / unpatch, fallbacks


def test_unpatch_restores_hf():
    model = tiny("v3", head="seq", num_labels=2)
    x = inputs()
    want = model(**x).logits
    classes = [type(m) for m in model.modules()]
    fused_attn.patch(model, backend="reference", padding_free=True)
    assert is_patched(model)
    assert isinstance(model.deberta.encoder, deberta.FusedDebertaEncoder)
    fused_attn.unpatch(model)
    assert not is_patched(model)
    assert [type(m) for m in model.modules()] == classes
    assert torch.equal(model(**x).logits, want)


def test_padded_route_hands_layers_compact_masks():
    """No [B, 1, S, S] mask and no [1, S, S] relative positions: the layers get the 2D mask and None."""
    model = fused_attn.patch(tiny("v3"), backend="reference")
    seen = []
    layer = model.encoder.layer[0]
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.append((a[1].shape, kw.get("relative_pos"))),
                                           with_kwargs=True)
    x = inputs()
    model(**x)
    hook.remove()
    assert seen == [(MASK.shape, None)]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_no_square_tensor_in_a_training_step(padding_free):
    """On the C++ engine no op of the forward or backward makes a [..., S, S] tensor (HF makes
    several per layer): the mask stays [B, S], the position terms stay [B, H, S, P] tables."""
    if _supports_rel_bias("cpu"):
        pytest.skip("the cpu engine takes no rel_bias here")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == t.shape[-2] == S:
                    self.square.append((str(func), tuple(t.shape)))
            return out

    mask = torch.tensor([[1] * 6 + [0] * 4, [1] * 10, [0] * 3 + [1] * 7])
    S = mask.shape[1]
    model = fused_attn.patch(tiny("v3"), backend="cpu", padding_free=padding_free).train()
    sa = model.encoder.layer[0].attention.self
    _, lo, hi = deberta._positions(sa, S, S, torch.device("cpu"))
    assert hi - lo + 1 != S                              # a table of width P = S would look square
    x = inputs(mask)
    with Shapes() as rec:
        model(**x).last_hidden_state.sum().backward()
    assert not rec.square, rec.square[:5]
    with Shapes() as rec:                                 # the check sees HF's square tensors
        fused_attn.unpatch(model)(**x).last_hidden_state.sum().backward()
    assert rec.square


def test_output_attentions_falls_back_to_hf():
    model = tiny("v3")
    x = inputs()
    want = model(**x, output_attentions=True)
    for pf in (False, True):
        fused = fused_attn.patch(copy.deepcopy(model), backend="reference", padding_free=pf)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            got = fused(**x, output_attentions=True)
        assert len(got.attentions) == 2
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
        assert pf == any("output_attentions" in str(w.message) for w in rec)


def test_padding_free_mask_with_holes_runs_padded():
    """Packing would close the holes, and HF counts them in i - j: that call runs the padded path."""
    model = tiny("v3")
    x = inputs()
    want = model(**x).last_hidden_state
    fused = fused_attn.patch(copy.deepcopy(model), backend="reference", padding_free=True)
    with pytest.warns(UserWarning, match="padding between real tokens"):
        got = fused(**x).last_hidden_state
    real = MASK.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_hidden_states_padding_free():
    model = tiny("v3")
    x = inputs(MASK[:3])
    want = model(**x, output_hidden_states=True).hidden_states
    got = fused_attn.patch(copy.deepcopy(model), backend="reference", padding_free=True)(
        **x, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 3
    real = MASK[:3].bool()
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
        assert torch.equal(a[~real], torch.zeros_like(a[~real]))


def test_deberta_v1_warns_and_is_left_alone():
    cfg = transformers.DebertaConfig(**dict(TINY, relative_attention=True, pos_att_type="c2p|p2c",
                                            max_relative_positions=8))
    model = transformers.DebertaModel(cfg).eval()
    classes = [type(m) for m in model.modules()]
    deberta._WARNED.discard("v1")
    with pytest.warns(UserWarning, match="DeBERTa v1"):
        fused_attn.patch(model)
    assert [type(m) for m in model.modules()] == classes


# --------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_gradient_checkpointing_matches(padding_free):
    """With dropout (in-kernel on the probabilities, HF's elsewhere) and checkpointing, the gradients are
    those of the same seed without checkpointing: the recomputed layers draw the same dropout."""
    base = tiny("v3", attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1)
    x = inputs(MASK[:3])
    grads = []
    for checkpointing in (False, True):
        model = fused_attn.patch(copy.deepcopy(base), backend="reference", padding_free=padding_free)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        grads.append(grads_of(model, x)[1])
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_trainer_with_dropout_loss_falls(padding_free, tmp_path):
    from _hf import assert_trainer_loss_falls

    model = tiny("v3", head="seq", num_labels=2, attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1).train()
    fused_attn.patch(model, backend="reference", padding_free=padding_free)
    assert_trainer_loss_falls(model, tmp_path)
    assert is_patched(model)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_sentence_transformers_cross_encoder(padding_free, tmp_path):
    """A CrossEncoder on a (tiny, random) DeBERTa-v2 checkpoint scores pairs as before once patched."""
    st = pytest.importorskip("sentence_transformers")
    from _hf import SENTENCES, minilm_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())            # any WordPiece tokenizer will do
    model = tiny("v3", head="seq", num_labels=1, vocab_size=tok.vocab_size, max_position_embeddings=128)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ce = st.CrossEncoder(str(tmp_path), device="cpu")
    pairs = [(a, b) for a, b in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1])]
    want = torch.as_tensor(ce.predict(pairs, convert_to_numpy=True))
    fused_attn.patch(ce, backend="reference", padding_free=padding_free)
    assert len(fused_modules(ce)) == 2
    got = torch.as_tensor(ce.predict(pairs, convert_to_numpy=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
