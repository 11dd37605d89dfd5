"""patch(model, padding_free=True): the encoder runs on the real tokens only (varlen attention),
and gives what HF's eager model gives.

Against HF's eager model (the fp64 eager copy as the oracle, DESIGN.md's rule) on every real token,
exact zeros at padding; eval, train without dropout, gradients of every parameter; hidden states;
dropout on packed tokens; flattened batches (DataCollatorWithFlattening without a mask);
sentence-transformers; the packing helpers.  patch / unpatch, the padding read from the encoder's
mask, fallbacks and running under threads, torch.compile and HF Trainer are in
test_padding_free_patch.py; HF's flattened batches under attn_implementation="fused_attn" in
test_hf_flattened.py; layer hooks and gradient checkpointing in test_padding_free_layers.py.  Runs
with the installed transformers (5.x in .venv, 4.x in .venv-hf4: `make test-hf4`).
"""
import copy
import warnings

import pytest
import torch

import fused_attn
from _hf import (MASK, SENTENCES, TINY, TRANSFORMERS_5, assert_close_to_oracle, check_real_tokens, grads_of,
                 inputs, load_minilm, minilm_path, oracle_of, tiny)
from fused_attn import packing
from fused_attn.integrations import padding_free as pf

FAMILIES = ["bert", "roberta", "electra", "distilbert"]


# --------------------------------------------------------------------------------------------
# packing helpers


def test_gather_scatter_round_trip_and_gradients():
    x = torch.randn(4, 13, 5, dtype=torch.float64, requires_grad=True)
    un = packing.unpad_info(MASK)
    assert un.tokens == int(MASK.sum()) and un.seqs.cu_seqlens_q.tolist() == [0, 7, 20, 29, 36]
    assert un.seqs.max_seqlen_q == 13 and un.seqs.cu_seqlens_q.dtype == torch.int32
    packed = packing.gather_tokens(x, un)
    assert torch.equal(packed, x[MASK.bool()])
    back = packing.scatter_tokens(packed, un)
    assert torch.equal(back, x * MASK[..., None])
    torch.autograd.gradcheck(lambda t: packing.scatter_tokens(packing.gather_tokens(t, un) * 2, un), (x,))


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match=r"attention_mask: expected the 2D padding mask"):
        packing.unpad_info(MASK[None])
    with pytest.raises(TypeError, match="attention_mask: expected a bool or integer"):
        packing.unpad_info(MASK.float())
    un = packing.unpad_info(MASK)
    with pytest.raises(ValueError, match=r"x: expected shape \[4, 13, \.\.\.\]"):
        packing.gather_tokens(torch.randn(4, 12, 3), un)
    with pytest.raises(ValueError, match="packed: expected 36 tokens"):
        packing.scatter_tokens(torch.randn(35, 3), un)
    with pytest.raises(ValueError, match="position_ids: expected one flattened row"):
        packing.seqlens_from_position_ids(torch.zeros(2, 5, dtype=torch.long))


def test_seqlens_from_position_ids_and_sequence_ids():
    pos = torch.tensor([[2, 3, 4, 2, 3, 2, 3, 4, 5]])          # RoBERTa-style: restarts at 2
    s = packing.seqlens_from_position_ids(pos)
    assert s.cu_seqlens_q.tolist() == [0, 3, 5, 9] and s.max_seqlen_q == 4
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    s = packing.seqlens_from_sequence_ids(ids)
    assert s.cu_seqlens_q.tolist() == [0, 2, 5, 6, 10] and s.max_seqlen_q == 4


# --------------------------------------------------------------------------------------------
# against eager


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_hidden_states_match_eager_on_real_tokens(family, monkeypatch):
    model = tiny(family)
    x = inputs()
    ref64 = oracle_of(model)(**x, output_hidden_states=True)
    ref = model(**x, output_hidden_states=True)
    fused_attn.patch(model, padding_free=True)
    calls = []
    real = pf.varlen_attention
    monkeypatch.setattr(pf, "varlen_attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    got = model(**x, output_hidden_states=True)
    n_layers = TINY["num_hidden_layers"]
    assert calls == [torch.Size([int(MASK.sum()), TINY["num_attention_heads"], 16])] * n_layers, calls
    check_real_tokens(f"{family} last_hidden_state", got.last_hidden_state, ref64.last_hidden_state,
                      ref.last_hidden_state, MASK)
    assert len(got.hidden_states) == len(ref.hidden_states) == n_layers + 1
    for i, (g, o, e) in enumerate(zip(got.hidden_states, ref64.hidden_states, ref.hidden_states)):
        check_real_tokens(f"{family} hidden_states[{i}]", g, o, e, MASK)
    if getattr(ref, "pooler_output", None) is not None:       # CLS is a real token in rows 0, 1, 3
        rows = [0, 1, 3]
        assert_close_to_oracle("pooler", got.pooler_output[rows], ref64.pooler_output[rows], ref.pooler_output[rows])


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_hooks_on_the_projections_are_honoured(family):
    """The q, k, v linears run as one GEMM only when they are plain nn.Linear calls: a forward hook
    on one of them (PEFT, quantizers, probes) is called and its output used."""
    model = tiny(family)
    x = inputs()
    sa = lambda layer: layer.attention.self if family == "bert" else layer.attention    # noqa: E731
    proj = lambda att: att.key if family == "bert" else att.k_lin                       # noqa: E731
    calls = []

    def hook(module, args, out):
        calls.append(out.shape)
        return out * 0.5
    layers = model.encoder.layer if family == "bert" else model.transformer.layer
    for layer in layers:
        proj(sa(layer)).register_forward_hook(hook)
    ref64 = oracle_of(model)(**x)
    ref = model(**x)
    calls.clear()
    fused_attn.patch(model, padding_free=True)
    got = model(**x)
    assert calls == [torch.Size([1, int(MASK.sum()), TINY["hidden_size"]])] * len(layers), calls
    check_real_tokens(f"{family} with a hook", got.last_hidden_state, ref64.last_hidden_state,
                      ref.last_hidden_state, MASK)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_return_dict_false_and_hidden_state_selection(family):
    model = tiny(family)
    x = inputs()
    ref = model(**x, output_hidden_states=True, return_dict=False)
    fused_attn.patch(model, padding_free=True)
    got = model(**x, output_hidden_states=True, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(ref)
    assert [type(t) for t in got] == [type(t) for t in ref]


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert"])
def test_training_gradients_match_eager_without_dropout(family):
    model = tiny(family).train()
    x = inputs()
    o_loss, o_grads = grads_of(oracle_of(model), {**x})
    e_loss, e_grads = grads_of(copy.deepcopy(model), x)
    fused_attn.patch(model, padding_free=True)
    f_loss, f_grads = grads_of(model, x)
    assert_close_to_oracle("loss", f_loss, o_loss, e_loss)
    assert set(f_grads) == set(o_grads) == set(e_grads) and len(f_grads) > 10
    for name in o_grads:
        assert_close_to_oracle(f"{family} grad {name}", f_grads[name], o_grads[name], e_grads[name])


def test_minilm_checkpoint_embeddings_and_gradients():
    """The real all-MiniLM-L6-v2 checkpoint (6 layers, 12 heads of dim 32) on real sentences."""
    tok, model = load_minilm()
    model.eval()
    enc = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    mask = enc["attention_mask"]
    assert (mask == 0).any()
    with torch.no_grad():
        oracle = oracle_of(model)(**enc).last_hidden_state
        eager = model(**enc).last_hidden_state
        fused_attn.patch(model, padding_free=True)
        got = model(**enc).last_hidden_state
    check_real_tokens("MiniLM hidden states", got, oracle, eager, mask)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    enc = dict(tok(SENTENCES[1:4], padding=True, return_tensors="pt"))      # three lengths, to keep it quick
    assert (enc["attention_mask"] == 0).any()
    f_loss, f_grads = grads_of(model, enc)
    fused_attn.unpatch(model)
    e_loss, e_grads = grads_of(model, enc)
    o_loss, o_grads = grads_of(oracle_of(model), enc)
    assert_close_to_oracle("MiniLM loss", f_loss, o_loss, e_loss)
    assert set(f_grads) == set(o_grads)
    for name in o_grads:
        assert_close_to_oracle(f"MiniLM grad {name}", f_grads[name], o_grads[name], e_grads[name])


def test_attention_and_hidden_dropout_run_on_packed_tokens(monkeypatch):
    model = tiny("bert", head="mlm", attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1).train()
    fused_attn.patch(model, padding_free=True)
    seen = []
    real = pf.varlen_attention
    monkeypatch.setattr(pf, "varlen_attention", lambda *a, **k: seen.append(k["dropout_p"]) or real(*a, **k))
    x = inputs()
    torch.manual_seed(3)
    a = model(**x).logits
    torch.manual_seed(3)
    b = model(**x).logits
    c = model(**x).logits
    assert seen and set(seen) == {0.2}
    assert torch.equal(a, b), "same seed, same dropout"
    assert not torch.equal(a, c), "dropout had no effect"
    model.eval()
    seen.clear()
    model(**x)
    assert set(seen) == {0.0}


# --------------------------------------------------------------------------------------------
# a flattened batch (no mask) through a padding-free model


@pytest.mark.skipif(not TRANSFORMERS_5, reason="flattened batches reach the attention function in 5.x")
def test_flattened_batch_through_a_padding_free_model():
    """No attention_mask: nothing for the encoder to unpad; the layers' attention sees the restarting
    position_ids and runs varlen (same loss as the padded batch)."""
    from test_hf_flattened import flattened_and_padded
    from transformers import DataCollatorWithFlattening
    model = tiny("bert", head="mlm")
    feats, padded = flattened_and_padded([5, 12, 2])
    oracle = oracle_of(model)(**padded).loss
    eager = model(**padded).loss
    fused_attn.patch(model, padding_free=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model(**DataCollatorWithFlattening()(feats)).loss
        padded_free = model(**padded).loss
    assert_close_to_oracle("flattened", got, oracle, eager)
    assert_close_to_oracle("padding-free padded", padded_free, oracle, eager)


# --------------------------------------------------------------------------------------------
# sentence-transformers


def test_sentence_transformer_encode_matches_unpatched():
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(minilm_path(), device="cpu")
    sentences = SENTENCES + ["Short.", "A much longer sentence that goes on and on, to make the batch padded "
                             "well beyond the shortest of the others."]
    want = model.encode(sentences, batch_size=4, convert_to_tensor=True)
    oracle = copy.deepcopy(model).double().encode(sentences, batch_size=4, convert_to_tensor=True)
    fused_attn.patch(model, padding_free=True)
    assert pf.is_padding_free(model) and len(pf.base_models(model)) == 0      # already converted
    calls = []
    real = pf.varlen_attention
    pf_attn = pf.__dict__
    pf_attn["varlen_attention"] = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = model.encode(sentences, batch_size=4, convert_to_tensor=True)
    finally:
        pf_attn["varlen_attention"] = real
    assert len(calls) == 6 * 2, "two batches through 6 packed layers"
    assert_close_to_oracle("sentence embeddings", got, oracle, want)
    fused_attn.unpatch(model)
    assert not pf.is_padding_free(model)
    assert torch.equal(model.encode(sentences, batch_size=4, convert_to_tensor=True), want)


def test_inference_sees_every_change_of_the_qkv_weights():
    """Inference forwards read the q/k/v weights as they are now: an in-place update (optimizer step),
    load_state_dict, and writes through ``.data`` (which bump no version counter: a concatenated
    copy kept across forwards went stale on those and the model ran on the old weights)."""
    model = tiny("bert").eval()
    eager = copy.deepcopy(model)
    fused_attn.patch(model, padding_free=True)
    x = inputs()

    def forward_matches_eager(name):
        with torch.no_grad():
            got, ref = model(**x).last_hidden_state, eager(**x).last_hidden_state
        check_real_tokens(name, got, oracle_of(eager)(**x).last_hidden_state, ref, MASK)

    forward_matches_eager("first")
    with torch.no_grad():                                                    # an optimizer-like in-place step
        for m in (model, eager):
            m.encoder.layer[0].attention.self.value.weight.mul_(1.5)
            m.encoder.layer[-1].attention.self.key.bias.add_(0.25)
    forward_matches_eager("after an in-place update")
    for i, m in enumerate((model, eager)):                                   # weight surgery through .data
        torch.manual_seed(1)
        m.encoder.layer[0].attention.self.query.weight.data.normal_()
        m.encoder.layer[-1].attention.self.value.bias.data.copy_(torch.randn(64))
    forward_matches_eager("after writes through .data")
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in eager.state_dict().items()}
    eager.load_state_dict(state)
    model.load_state_dict(state)
    forward_matches_eager("after load_state_dict")
    with torch.inference_mode():
        model(**x)
    forward_matches_eager("no_grad after inference_mode")
