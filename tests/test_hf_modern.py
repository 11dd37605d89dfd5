"""Modern encoders through transformers' attention interface (``fused_attn.register()`` +
``attn_implementation="fused_attn"``): ModernBERT (local layers: sliding windows as a window, not a
dense mask), GTE, NomicBERT, Jina v3, EuroBERT (grouped-query k/v), against the fp64 eager oracle
(docs/design.md's rule) on real tokens, outputs and all gradients; packed ModernBERT batches with
local layers; torch.compile(fullgraph=True); static-cache generation; patch() on these models; the
warning for models that accept attn_implementation="fused_attn" but never call the interface.

Families missing from the installed transformers skip (transformers 4.57 has only ModernBERT, whose
4.57 code does not call the interface: there only the warning is checked)."""
import copy
import warnings

import pytest
import torch

import fused_attn
from _hf import TRANSFORMERS_5, assert_close_to_oracle, batch
from fused_attn.integrations import hf, hf_attention

import transformers as tf  # noqa: E402

V = 97
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2)
needs_5 = pytest.mark.skipif(not TRANSFORMERS_5, reason="these families call the attention interface from 5.0 on")


def _modernbert(**over):
    # local_attention 8: window (4, 4), so sequences of 13 and 20 tokens cross the window's edges
    kw = dict(SMALL, num_hidden_layers=3, local_attention=8, global_attn_every_n_layers=3, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
              attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0, attn_implementation="eager")
    kw.update(over)
    return tf.ModernBertModel(tf.ModernBertConfig(**kw))


def _model(family):
    torch.manual_seed(0)
    if family == "modernbert":
        return _modernbert()
    cls = getattr(tf, {"gte": "GteModel", "nomic_bert": "NomicBertModel", "jina_v3": "JinaEmbeddingsV3Model",
                       "eurobert": "EuroBertModel"}[family], None)
    if cls is None:
        pytest.skip(f"{family} is not in transformers {tf.__version__}")
    drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "gte":
        cfg = tf.GteConfig(max_position_embeddings=64, pad_token_id=0, attn_implementation="eager", **drop, **SMALL)
    elif family == "nomic_bert":
        cfg = tf.NomicBertConfig(max_position_embeddings=64, pad_token_id=0, attn_implementation="eager", **drop, **SMALL)
    elif family == "jina_v3":
        cfg = tf.JinaEmbeddingsV3Config(max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        attn_implementation="eager", **drop, **SMALL)
    else:   # grouped-query attention: 4 query heads, 2 key/value heads
        cfg = tf.EuroBertConfig(num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, mask_token_id=3, attn_implementation="eager", **SMALL)
    return cls(cfg)


def _loss_and_grads(model, ids, mask):
    """Hidden states, and the gradients of a loss over the real tokens only."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape[1:], generator=g).to(out.dtype)
    ((out * w) * mask[..., None].to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_5
@pytest.mark.parametrize("family", ["modernbert", "gte", "nomic_bert", "jina_v3", "eurobert"])
def test_register_matches_eager_with_gradients(family, monkeypatch):
    fused_attn.register()
    model = _model(family).train()      # train mode, dropout 0: the training path, deterministic
    # every padding row's window (4, 4) holds a real key: HF's fp64 eager turns a fully masked row into
    # NaN, which its next layer spreads to the real rows (0 * NaN)
    ids, mask = batch(3, 20, [20, 16, 17])
    oracle = copy.deepcopy(model).double()
    o_out, o_grads = _loss_and_grads(oracle, ids, mask)
    assert torch.isfinite(o_out).all() and all(torch.isfinite(g).all() for g in o_grads.values())
    e_out, e_grads = _loss_and_grads(model, ids, mask)
    calls = []
    real = hf_attention.fused_attention_forward

    def spy(module, q, k, v, attention_mask, *a, **kw):
        calls.append((type(attention_mask).__name__, getattr(attention_mask, "window", None), k.shape[1],
                      getattr(attention_mask, "is_dense", None)))
        return real(module, q, k, v, attention_mask, *a, **kw)

    monkeypatch.setitem(tf.AttentionInterface._global_mapping, "fused_attn", spy)
    model.set_attn_implementation("fused_attn")
    g_out, g_grads = _loss_and_grads(model, ids, mask)
    real_rows = mask.bool()
    assert_close_to_oracle(f"{family} hidden states", g_out[real_rows], o_out[real_rows], e_out[real_rows])
    assert set(g_grads) == set(e_grads) and g_grads
    for n in g_grads:
        assert_close_to_oracle(f"{family} grad {n}", g_grads[n], o_grads[n], e_grads[n])
    assert calls and all(c[0] == "FusedMask" and not c[3] for c in calls), calls      # never a dense mask
    if family == "eurobert":        # grouped-query k/v reach fused_attn with their 2 heads (no repeat_kv)
        assert all(c[2] == 2 for c in calls), calls
    if family == "modernbert":      # layer 0 global, layers 1-2 local: window (4, 4) from HF's mask
        assert [c[1] for c in calls] == [(-1, -1), (4, 4), (4, 4)], calls


@needs_5
def test_modernbert_local_layers_make_no_dense_mask_and_reach_the_kernel_as_a_window(monkeypatch):
    from transformers import masking_utils as mu
    fused_attn.register()
    model = _model("modernbert").eval()
    model.set_attn_implementation("fused_attn")
    dense, windows = [], []
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: dense.append(1))
    real = hf_attention.fused_attention
    monkeypatch.setattr(hf_attention, "fused_attention",
                        lambda *a, **k: windows.append(k.get("window_size", (-1, -1))) or real(*a, **k))
    ids, mask = batch(2, 20, [20, 13])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert not dense and windows == [(-1, -1), (4, 4), (4, 4)]


@needs_5
def test_packed_modernbert_with_local_layers_equals_each_sequence_alone(monkeypatch):
    """The issue's wrong answer: a packed batch (cu_seq_lens_q/k, max_length_q/k) of 20 and 13 tokens
    attended across the boundary in the local layers (0.012 off); now each sequence keeps its window."""
    fused_attn.register()
    model = _model("modernbert").eval()
    ids, _ = batch(1, 33, [33])
    cu = torch.tensor([0, 20, 33], dtype=torch.int32)
    pos = torch.cat([torch.arange(20), torch.arange(13)])[None]
    with torch.no_grad():
        alone_eager = torch.cat([model(input_ids=ids[:, :20]).last_hidden_state,
                                 model(input_ids=ids[:, 20:]).last_hidden_state], 1)
        o = copy.deepcopy(model).double()
        alone_oracle = torch.cat([o(input_ids=ids[:, :20]).last_hidden_state, o(input_ids=ids[:, 20:]).last_hidden_state], 1)
    model.set_attn_implementation("fused_attn")
    windows = []
    real = hf_attention.varlen_attention
    monkeypatch.setattr(hf_attention, "varlen_attention",
                        lambda *a, **k: windows.append(k.get("window_size", (-1, -1))) or real(*a, **k))
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=20, max_length_k=20).last_hidden_state
    assert_close_to_oracle("packed ModernBERT", packed, alone_oracle, alone_eager)
    assert windows == [(-1, -1), (4, 4), (4, 4)]


@needs_5
def test_compile_fullgraph_modernbert_forward_and_backward():
    fused_attn.register()
    model = _model("modernbert").eval()
    model.set_attn_implementation("fused_attn")
    ids, mask = batch(2, 20, [20, 13])
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    want.sum().backward()
    want_grad = model.embeddings.tok_embeddings.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.embeddings.tok_embeddings.weight.grad, want_grad, rtol=1e-4, atol=1e-5)


@needs_5
def test_compiled_window_signature_matches_the_closure(monkeypatch):
    """Under torch.compile the bidirectional window is read from what create_bidirectional_sliding_window_mask
    passes (the closure cannot be read there): the same answer as reading the closure."""
    from transformers import masking_utils as mu
    fused_attn.register()
    cfg = _modernbert(attn_implementation="fused_attn").config
    seen = []
    real = hf_attention._mask_parts
    monkeypatch.setattr(hf_attention, "_mask_parts", lambda f, m, kw: seen.append(kw) or real(f, m, kw))
    mu.create_bidirectional_sliding_window_mask(config=cfg, inputs_embeds=torch.zeros(2, 20, 8),
                                                attention_mask=torch.ones(2, 20, dtype=torch.long))
    (kw,) = seen
    exact = real(kw["mask_function"], mu, kw)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert real(kw["mask_function"], mu, kw) == exact == (False, (4, 4), None)


@needs_5
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "flattened"])
def test_causal_sliding_window_model(packed):
    """A causal sliding-window model (Mistral, window 4): HF's kv > q - 4 is window (3, -1) + causal;
    a flattened batch (position_ids restarting) keeps it per sequence: its loss is the padded batch's."""
    from transformers import DataCollatorWithFlattening
    from test_hf_flattened import flattened_and_padded
    fused_attn.register()
    torch.manual_seed(0)
    model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=4, num_key_value_heads=2, max_position_embeddings=64,
                                                   attn_implementation="eager", **SMALL)).eval()
    feats, padded = flattened_and_padded([11, 8, 9])      # every padding row's window holds a real key (no NaN)
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(**padded, use_cache=False)
        eager = model(**padded, use_cache=False)
    model.set_attn_implementation("fused_attn")
    inputs = dict(DataCollatorWithFlattening()(feats) if packed else padded, use_cache=False)   # no cache: HF
    # looks for packed sequences in position_ids, and_masks(sliding_window_causal_mask_function(4), packed ids)
    fm = hf.fused_attn_mask(**_captured_mask_kwargs(model, inputs))
    with torch.no_grad():
        got = model(**inputs)
    assert torch.isfinite(oracle.loss)
    assert_close_to_oracle(f"Mistral {'flattened' if packed else 'padded'} loss", got.loss, oracle.loss, eager.loss)
    if not packed:
        real_rows = padded["attention_mask"].bool()
        assert_close_to_oracle("Mistral logits", got.logits[real_rows], oracle.logits[real_rows], eager.logits[real_rows])
    assert fm.causal and fm.window == (3, -1) and not fm.is_dense and (fm.packed is not None) == packed


def _captured_mask_kwargs(model, inputs):
    """The kwargs HF's mask creation hands the fused_attn mask function for ``inputs``."""
    from transformers import masking_utils as mu
    seen = []
    real = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["fused_attn"]
    mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["fused_attn"] = lambda **kw: seen.append(kw) or real(**kw)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["fused_attn"] = real
    return seen[-1]


@needs_5
def test_static_cache_generation_matches_eager():
    fused_attn.register()
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64,
                                               attn_implementation="eager", **SMALL)).eval()
    ids, mask = batch(2, 6, [6, 6])
    mask[1, :2] = 0                                   # left padding
    kw = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=0)
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    model.set_attn_implementation("fused_attn")
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want), (got, want)


@needs_5
def test_patch_switches_an_interface_model_to_fused_attn_and_unpatch_restores():
    model = _model("modernbert").eval()
    model.set_attn_implementation("sdpa")
    ids, mask = batch(2, 20, [20, 13])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with pytest.warns(UserWarning, match=r"switched ModernBertModel \(was 'sdpa'\) to attn_implementation='fused_attn'"):
        fused_attn.patch(model)
    assert model.config._attn_implementation == "fused_attn" and hf.is_patched(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_attn.patch(model)                       # idempotent, silent
    fused_attn.unpatch(model)
    assert model.config._attn_implementation == "sdpa" and not hf.is_patched(model)


def _deberta(attn):
    return tf.DebertaV2Model(tf.DebertaV2Config(attn_implementation=attn, **SMALL))


def test_model_that_bypasses_the_interface_is_warned_about(monkeypatch):
    """DeBERTa-v2 (and 4.57's ModernBERT) accept attn_implementation="fused_attn" but never call it."""
    fused_attn.register()
    monkeypatch.setattr(hf_attention, "_WARNED", set())
    with pytest.warns(UserWarning, match="DebertaV2Model accepts attn_implementation='fused_attn' but") as rec:
        loaded = _deberta("fused_attn")
        _deberta("fused_attn")
    said = [str(r.message) for r in rec if "DebertaV2Model accepts" in str(r.message)]
    assert len(said) == 1                                                         # once
    # it names what to call instead, and that call fuses the model as loaded, matching eager on real tokens
    assert "fused_attn.patch(model)" in said[0] and "fused_attn.patch(model, padding_free=True)" in said[0]
    eager = _deberta("eager")
    eager.load_state_dict(loaded.state_dict())
    from fused_attn.integrations import deberta
    assert not deberta.is_patched(loaded)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fused_attn.patch(loaded)
    assert deberta.is_patched(loaded)
    ids, mask = batch(2, 12, [12, 7], vocab=SMALL["vocab_size"])
    with torch.no_grad():
        got, ref, oracle = (m.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
                            for m in (loaded, eager, copy.deepcopy(eager).double()))
    real = mask.bool()
    assert_close_to_oracle("deberta loaded with fused_attn, then patched", got[real], oracle[real], ref[real])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        if TRANSFORMERS_5:
            _model("gte" if hasattr(tf, "GteModel") else "modernbert")        # calls the interface: silent
    if not TRANSFORMERS_5:
        with pytest.warns(UserWarning, match="ModernBertModel accepts attn_implementation='fused_attn' but"):
            _modernbert(attn_implementation="fused_attn")
    # patch() itself fuses DeBERTa (fused_attn/integrations/deberta.py): no warning there
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = fused_attn.patch(_deberta("eager"))
    from fused_attn.integrations import deberta
    assert deberta.is_patched(model)
