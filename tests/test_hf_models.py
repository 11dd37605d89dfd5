"""patch / unpatch / FusedBertSelfAttention on random-init tiny models of every BERT-like family,
against HF's eager attention (fp64 eager copy as the oracle, docs/design.md's rule).  Runs with the
installed transformers (5.x in .venv, 4.x in .venv-hf4: `make test-hf4`)."""
import copy

import pytest
import torch
from torch import nn

import fused_attn
from _hf import TINY, TRANSFORMERS_5, as_dtype, assert_close_to_oracle, batch, oracle_of, train_steps
from fused_attn.integrations import hf
from fused_attn.integrations.hf import FusedBertSelfAttention

import transformers as tf  # noqa: E402  (_hf skipped the module if transformers is missing)

FAMILIES = {
    "bert": (tf.BertConfig, tf.BertModel),
    "roberta": (tf.RobertaConfig, tf.RobertaModel),
    "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaModel),
    "camembert": (tf.CamembertConfig, tf.CamembertModel),
    "electra": (tf.ElectraConfig, tf.ElectraModel),
}


def tiny(family="bert", impl="eager", **over):
    cfg_cls, model_cls = FAMILIES[family]
    kw = dict(TINY, **over)
    if family == "electra":
        kw["embedding_size"] = kw["hidden_size"]
    if family in ("roberta", "xlm-roberta", "camembert"):
        kw.update(pad_token_id=1, max_position_embeddings=kw["max_position_embeddings"] + 2)
    torch.manual_seed(0)
    return model_cls(cfg_cls(attn_implementation=impl, **kw)).eval()


def run(model, **inputs):
    return model(**inputs).last_hidden_state


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_forward_matches_eager(family):
    model = tiny(family)
    ids, mask = batch(3, 13, [13, 7, 2])
    oracle = run(oracle_of(model), input_ids=ids, attention_mask=mask)
    eager = run(model, input_ids=ids, attention_mask=mask)
    fused_attn.patch(model)
    n = len(hf.fused_modules(model))
    assert n == TINY["num_hidden_layers"], f"{family}: {n} fused modules"
    got = run(model, input_ids=ids, attention_mask=mask)
    assert_close_to_oracle(f"{family} hidden states", got, oracle, eager)   # every position, padding too
    fused_attn.unpatch(model)
    assert not hf.is_patched(model)
    assert torch.equal(run(model, input_ids=ids, attention_mask=mask), eager)


def test_patched_model_under_inference_mode():
    """Serving code runs under torch.inference_mode, where masks are inference tensors."""
    model = tiny("bert")
    ids, mask = batch(3, 13, [13, 7, 2])
    oracle = run(oracle_of(model), input_ids=ids, attention_mask=mask)
    with torch.inference_mode():
        eager = run(model, input_ids=ids, attention_mask=mask)
        fused_attn.patch(model)
        got = run(model, input_ids=ids, attention_mask=mask)
    assert_close_to_oracle("hidden states under inference_mode", got, oracle, eager)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_patch_is_idempotent_reversible_and_keeps_state(impl):
    model = tiny("bert", impl=impl).to(torch.float64).train()
    orig = [m for m in model.modules() if type(m).__name__.endswith("SelfAttention")]
    keys = list(model.state_dict())
    fused_attn.patch(model)
    fused_attn.patch(model)                       # idempotent
    fused = [m for _, m in hf.fused_modules(model)]
    assert len(fused) == len(orig) == TINY["num_hidden_layers"]
    for o, f in zip(orig, fused):
        assert isinstance(f, type(o)) and f.query is o.query and f.key.weight is o.key.weight
        assert f.training and f.query.weight.dtype == torch.float64
    assert list(model.state_dict()) == keys
    model.eval()
    fused_attn.unpatch(model)
    back = [m for m in model.modules() if type(m).__name__.endswith("SelfAttention")]
    assert [type(m) for m in back] == [type(m) for m in orig]
    assert all(not b.training and b.value is o.value for b, o in zip(back, orig))
    assert list(model.state_dict()) == keys
    if not TRANSFORMERS_5:
        assert model.attn_implementation == impl   # the 4.x mask form is restored too
    with fused_attn.patched(model):
        assert hf.is_patched(model)
    assert not hf.is_patched(model)


def test_module_from_config_and_from_module_share_weights():
    cfg = tiny("bert").config
    kwargs = {"layer_idx": 0}
    fused = FusedBertSelfAttention(cfg, **kwargs)
    plain = tf.models.bert.modeling_bert.BertSelfAttention(cfg, **kwargs)
    assert list(fused.state_dict()) == list(plain.state_dict())
    shared = FusedBertSelfAttention.from_module(plain)
    assert shared.query.weight is plain.query.weight
    with torch.no_grad():
        plain.value.weight.mul_(2.0)
    assert torch.equal(shared.value.weight, plain.value.weight)
    assert type(shared.unfused()) is type(plain)


def test_structure_detection_not_class_name():
    """A user module with BertSelfAttention's structure and code is patched whatever its name;
    modules with other structure are left alone."""
    base = tf.models.bert.modeling_bert.BertSelfAttention

    class MyEncoderAttention(base):
        pass

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.dropout, self.extra = nn.Dropout(0.0), nn.Linear(8, 8)

    model = tiny("bert")
    layer = model.encoder.layer[0].attention
    mine = MyEncoderAttention.__new__(MyEncoderAttention)
    mine.__dict__.update(layer.self.__dict__)
    layer.self = mine
    model.other = Other()
    fused_attn.patch(model)
    assert isinstance(layer.self, FusedBertSelfAttention) and isinstance(layer.self, MyEncoderAttention)
    assert type(model.other) is Other


def test_training_gradients_match_eager():
    model = tiny("roberta")
    ids, mask = batch(3, 11, [11, 6, 3])
    inputs = dict(input_ids=ids, attention_mask=mask)
    o_losses, o_grads = train_steps(oracle_of(model), inputs)
    e_losses, e_grads = train_steps(copy.deepcopy(model), inputs)
    fused_attn.patch(model)
    f_losses, f_grads = train_steps(model, inputs)
    assert_close_to_oracle("losses", f_losses, o_losses, e_losses)
    assert set(f_grads) == set(o_grads)
    for name in o_grads:
        assert_close_to_oracle(f"grad {name}", f_grads[name], o_grads[name], e_grads[name])


def test_dropout_runs_in_the_kernel(monkeypatch):
    model = tiny("bert", attention_probs_dropout_prob=0.25).train()
    fused_attn.patch(model)
    seen = []
    real = hf.fused_attention_forward.__globals__["fused_attention"]

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setitem(hf.fused_attention_forward.__globals__, "fused_attention", spy)
    ids, mask = batch(2, 9, [9, 5])
    torch.manual_seed(3)
    a = run(model, input_ids=ids, attention_mask=mask)
    torch.manual_seed(3)
    b = run(model, input_ids=ids, attention_mask=mask)
    c = run(model, input_ids=ids, attention_mask=mask)
    assert seen and all(p == 0.25 for p in seen)
    assert torch.equal(a, b), "same seed, same dropout"
    assert not torch.equal(a, c), "dropout had no effect"
    model.eval()
    seen.clear()
    run(model, input_ids=ids, attention_mask=mask)
    assert seen and all(p == 0.0 for p in seen)


def test_mask_is_reduced_once_per_forward(monkeypatch):
    from fused_attn import masks
    calls = []
    real = masks._reduce
    monkeypatch.setattr(masks, "_reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny("bert", num_hidden_layers=3)
    fused_attn.patch(model)
    ids, mask = batch(2, 10, [10, 4])
    run(model, input_ids=ids, attention_mask=mask)
    assert len(calls) == 1


def test_output_attentions_use_eager_math():
    model = tiny("electra")
    ids, mask = batch(2, 8, [8, 5])
    ref64 = oracle_of(model)(input_ids=ids, attention_mask=mask, output_attentions=True)
    ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    fused_attn.patch(model)
    got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(ref.attentions) == TINY["num_hidden_layers"]
    for i, (g, r, o) in enumerate(zip(got.attentions, ref.attentions, ref64.attentions)):
        assert_close_to_oracle(f"attentions[{i}]", g, o, r)
    assert_close_to_oracle("hidden", got.last_hidden_state, ref64.last_hidden_state, ref.last_hidden_state)


@pytest.mark.skipif(TRANSFORMERS_5, reason="transformers 5 removed head_mask from BERT's forward")
def test_head_mask():
    model = tiny("bert")
    ids, mask = batch(3, 9, [9, 4, 6])
    head_mask = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]])
    kw = dict(input_ids=ids, attention_mask=mask, head_mask=head_mask)
    oracle = run(oracle_of(model), **as_dtype(kw, torch.float64))
    eager = run(model, **kw)
    fused_attn.patch(model)
    assert_close_to_oracle("head_mask", run(model, **kw), oracle, eager)


def _decoder(cross):
    return tiny("bert", is_decoder=True, add_cross_attention=cross)


@pytest.mark.parametrize("cross", [False, True], ids=["decoder", "decoder+cross"])
def test_decoder_with_past_key_values(cross):
    """is_decoder: causal self-attention, then a second call with a cache (Sk > Sq, bottom-right
    aligned); with cross-attention to padded encoder states."""
    model = _decoder(cross)
    ids, mask = batch(3, 10, [10, 8, 9])
    extra = {}
    if cross:
        g = torch.Generator().manual_seed(5)
        enc = torch.randn(3, 7, TINY["hidden_size"], generator=g)
        enc_mask = (torch.arange(7)[None] < torch.tensor([[7], [3], [5]])).long()
        extra = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)

    def two_calls(m, dtype):
        ex = as_dtype(extra, dtype)
        first = m(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True, **ex)
        second = m(input_ids=ids[:, 6:], attention_mask=mask, past_key_values=first.past_key_values,
                   use_cache=True, **ex)
        return torch.cat([first.last_hidden_state, second.last_hidden_state], 1)

    oracle = two_calls(oracle_of(model), torch.float64)
    eager = two_calls(model, torch.float32)
    fused_attn.patch(model)
    n = len(hf.fused_modules(model))
    assert n >= TINY["num_hidden_layers"]
    assert_close_to_oracle("decoder", two_calls(model, torch.float32), oracle, eager)


def test_padded_rows_match_eager_with_left_padding():
    model = tiny("xlm-roberta")
    ids, _ = batch(2, 9, [9, 9])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    oracle = run(oracle_of(model), input_ids=ids, attention_mask=mask)
    eager = run(model, input_ids=ids, attention_mask=mask)
    fused_attn.patch(model)
    assert_close_to_oracle("left padding", run(model, input_ids=ids, attention_mask=mask), oracle, eager)


def test_patch_on_model_without_bert_attention_warns():
    with pytest.warns(UserWarning, match="nothing was changed"):
        fused_attn.patch(nn.Sequential(nn.Linear(4, 4)))


def test_patch_rejects_a_model_name_and_an_unknown_backend_at_patch_time():
    """A model name instead of a model raised AttributeError from inside patch; an unknown backend
    was accepted and only failed at the first forward."""
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module .*AutoModel.from_pretrained\('bert-base"):
        fused_attn.patch("bert-base-uncased")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        with fused_attn.patched("bert-base-uncased"):
            pass
    model = tiny()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="backend: 'gpu' is not one of 'auto'"):
        fused_attn.patch(model, backend="gpu")
    assert [type(m) for m in model.modules()] == before          # nothing was swapped


def test_unpatch_of_a_container_undoes_patch_of_the_model_inside():
    """patch(st[0].auto_model) then unpatch(st): the modules came back but the attn_implementation
    (5.x) / mask form (4.x) that patch switched stayed switched."""
    outer = nn.ModuleList([tiny(impl="sdpa")])
    model = outer[0]
    before = model.config._attn_implementation, getattr(model, "attn_implementation", None)
    fused_attn.patch(model)
    assert hf.is_patched(model)
    fused_attn.unpatch(outer)
    assert not hf.is_patched(model) and not any(isinstance(m, FusedBertSelfAttention) for m in outer.modules())
    assert (model.config._attn_implementation, getattr(model, "attn_implementation", None)) == before


def test_a_patched_model_in_float64_says_what_to_do():
    """model.double() after patch: the kernels take fp16 / bf16 / fp32; the error named q's dtype only."""
    model = tiny()
    fused_attn.patch(model)
    model.double()
    ids, mask = batch(2, 9, [9, 4])
    with pytest.raises(TypeError, match=r"q: dtype torch.float64 .*model.float\(\), or fused_attn.unpatch\(model\)"):
        model(input_ids=ids, attention_mask=mask)
    fused_attn.unpatch(model)
    assert model(input_ids=ids, attention_mask=mask).last_hidden_state.dtype == torch.float64


def test_import_fused_attn_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, fused_attn; assert 'transformers' not in sys.modules; fused_attn.patch"
    subprocess.run([sys.executable, "-c", code], check=True)



@pytest.mark.parametrize("lengths", [[9, 4], [9, 9]], ids=["padded", "unpadded"])
def test_hf_masks_never_look_like_float_zero_one_masks(lengths, monkeypatch):
    """HF's additive masks (4.x: 0 / finfo.min, also for cross-attention) and 5.x's boolean ones are
    never taken for float 0/1 masks (which raise), nor warned about."""
    import warnings
    ids, mask = batch(2, 9, lengths)
    enc = torch.randn(2, 7, TINY["hidden_size"])
    enc_mask = (torch.arange(7)[None] < torch.tensor([[7], [3]])).long()
    encoder, decoder = fused_attn.patch(tiny("bert")), fused_attn.patch(_decoder(True))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for train in (False, True):
            encoder.train(train)
            decoder.train(train)
            run(encoder, input_ids=ids, attention_mask=mask)
            run(decoder, input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
                encoder_attention_mask=enc_mask)
    assert not [w for w in rec if "0s and 1s" in str(w.message)], [str(w.message) for w in rec]


def test_gradient_checkpointing_with_dropout_matches():
    """HF gradient checkpointing recomputes the fused layers with torch's RNG state restored, so the
    in-kernel dropout draws the same keep-mask: the gradients equal those without checkpointing."""
    base = tiny("bert", attention_probs_dropout_prob=0.3)
    ids, mask = batch(2, 9, [9, 5])
    grads = []
    for checkpointing in (False, True):
        model = fused_attn.patch(copy.deepcopy(base)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(1)
        run(model, input_ids=ids, attention_mask=mask).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.manual_seed(2)
    model = fused_attn.patch(copy.deepcopy(base)).train()
    run(model, input_ids=ids, attention_mask=mask).square().mean().backward()
    other_seed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0)
    assert any(not torch.equal(other_seed[n], grads[0][n]) for n in grads[0]), "dropout had no effect"
