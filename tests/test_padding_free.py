"""patch(model, padding_free=True): the encoder runs on the real tokens only (varlen attention).

Against HF's eager model (the fp64 eager copy as the oracle, DESIGN.md's rule) on every real token,
exact zeros at padding; eval, train without dropout, gradients of every parameter; hidden states;
unpatch; fallbacks; threads; torch.compile; HF Trainer; flattened batches
(DataCollatorWithFlattening without a mask); sentence-transformers.  HF's flattened batches under
attn_implementation="fused_attn" are in test_hf_flattened.py, layer hooks and gradient
checkpointing in test_padding_free_layers.py.  Runs with the installed
transformers (5.x in .venv, 4.x in .venv-hf4: `make test-hf4`).
"""
import copy
import threading
import warnings

import pytest
import torch

import fused_attn
from _hf import (SENTENCES, TINY, TRANSFORMERS_5, assert_close_to_oracle, batch, load_minilm, minilm_path,
                 oracle_of)
from fused_attn import packing
from fused_attn.integrations import packed_layers
from fused_attn.integrations import padding_free as pf

import transformers as tf  # noqa: E402  (_hf skipped the module if transformers is missing)

FAMILIES = ["bert", "roberta", "electra", "distilbert"]

# right padding, a full row, left padding, holes (any 0/1 mask works)
MASK = torch.tensor([[1] * 7 + [0] * 6,
                     [1] * 13,
                     [0] * 4 + [1] * 9,
                     [1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0]])


def tiny(family="bert", head=None, **over):
    """A tiny random-init model of ``family`` (base model, or with ``head``: "mlm", "seq")."""
    kw = dict(TINY, **over)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=kw["vocab_size"], dim=kw["hidden_size"], hidden_dim=kw["intermediate_size"],
                                  n_heads=kw["num_attention_heads"], n_layers=kw["num_hidden_layers"],
                                  max_position_embeddings=kw["max_position_embeddings"], dropout=kw["hidden_dropout_prob"],
                                  attention_dropout=kw["attention_probs_dropout_prob"], attn_implementation="eager")
        classes = {None: tf.DistilBertModel, "mlm": tf.DistilBertForMaskedLM, "seq": tf.DistilBertForSequenceClassification}
    else:
        prefix = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra"}[family]
        if family == "electra":
            kw["embedding_size"] = 32                   # ELECTRA's projection between embeddings and encoder
        if family == "roberta":
            kw.update(pad_token_id=1, max_position_embeddings=kw["max_position_embeddings"] + 2)
        cfg = getattr(tf, prefix + "Config")(attn_implementation="eager", **kw)
        classes = {None: getattr(tf, prefix + "Model"), "mlm": getattr(tf, prefix + "ForMaskedLM"),
                   "seq": getattr(tf, prefix + "ForSequenceClassification")}
    torch.manual_seed(0)
    return classes[head](cfg).eval()


def inputs(mask=MASK, seed=0):
    ids, _ = batch(mask.shape[0], mask.shape[1], [mask.shape[1]] * mask.shape[0], seed=seed)
    return dict(input_ids=ids * mask + (1 - mask), attention_mask=mask)      # padding id where masked


def check_real_tokens(name, got, oracle, eager, mask):
    """DESIGN's rule on the real tokens; exact zeros at padding."""
    real = mask.bool()
    assert_close_to_oracle(name, got[real], oracle[real], eager[real])
    pad = got[~real]
    assert torch.equal(pad, torch.zeros_like(pad)), f"{name}: padding rows are not zero (max {pad.abs().max()})"


def masked_loss(out, mask, seed=1):
    """A loss over the real tokens only (distinct weights per position) and the pooler, if any (for
    rows whose first token, the one it pools, is real)."""
    hidden = out.last_hidden_state
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden.shape[1:], generator=g).to(hidden.dtype)
    loss = (hidden * w * mask[..., None].to(hidden.dtype)).sum() / mask.sum()
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        first_real = mask[:, :1].to(pooled.dtype)
        loss = loss + (pooled * first_real * torch.randn(pooled.shape[1:], generator=g).to(pooled.dtype)).mean()
    return loss


def grads_of(model, batch_inputs):
    model.train()
    model.zero_grad()
    loss = masked_loss(model(**batch_inputs), batch_inputs["attention_mask"])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


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
# patch / unpatch


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_unpatch_restores_exactly(family):
    model = tiny(family, head="seq")
    x = inputs()
    base = model.distilbert if family == "distilbert" else model.bert
    encoder = base.transformer if family == "distilbert" else base.encoder
    enc_cls = type(encoder)
    keys = list(model.state_dict())
    before = model(**x).logits
    hooks = [dict(m._forward_pre_hooks) for m in model.modules()], [dict(m._forward_hooks) for m in model.modules()]
    fused_attn.patch(model, padding_free=True)
    fused_attn.patch(model, padding_free=True)           # idempotent: one set of hooks
    assert isinstance(encoder, enc_cls) and type(encoder) is not enc_cls
    assert len(base._forward_pre_hooks) == 1 and len(base._forward_hooks) == 1
    assert all(type(layer.__dict__.get("forward")) is packed_layers.LayerForward and layer.forward.previous is None
               for layer in encoder.layer)
    assert list(model.state_dict()) == keys
    assert fused_attn.integrations.hf.is_patched(model)
    patched = model(**x).logits
    assert_close_to_oracle("patched logits", patched[[0, 1, 3]], before[[0, 1, 3]], before[[0, 1, 3]])
    fused_attn.unpatch(model)
    assert type(encoder) is enc_cls and encoder.forward.__func__ is enc_cls.forward
    assert not any(k.startswith("_fused_pf") for k in encoder.__dict__)
    assert not any("forward" in m.__dict__ for m in model.modules())          # the layers' instance forwards
    assert ([dict(m._forward_pre_hooks) for m in model.modules()],
            [dict(m._forward_hooks) for m in model.modules()]) == hooks
    assert list(model.state_dict()) == keys
    assert not fused_attn.integrations.hf.is_patched(model)
    assert torch.equal(model(**x).logits, before)
    with fused_attn.patched(model, padding_free=True):
        assert pf.is_padding_free(model)
    assert not pf.is_padding_free(model) and type(encoder) is enc_cls


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_forward_called_without_hooks_reads_the_encoders_mask(family, monkeypatch):
    """model.forward(...) (what sentence-transformers does) skips the base model's hooks: the padding
    comes from the mask the encoder receives."""
    model = tiny(family)
    x = inputs()
    ref64 = oracle_of(model)(**x).last_hidden_state
    ref = model(**x).last_hidden_state
    fused_attn.patch(model, padding_free=True)
    calls = []
    real = pf.varlen_attention
    monkeypatch.setattr(pf, "varlen_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = model.forward(**x).last_hidden_state
    assert len(calls) == TINY["num_hidden_layers"]
    check_real_tokens(f"{family} via forward()", got, ref64, ref, MASK)


def test_padding_read_back_from_encoder_masks():
    from fused_attn.integrations.hf_attention import FusedMask
    hidden = torch.zeros(4, 13, 8)
    real = MASK.bool()
    additive = torch.where(real, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    forms = {"FusedMask": FusedMask(4, 13, 13, padding=real), "additive 4D": additive,
             "old additive 4D": torch.where(real, 0.0, -10000.0)[:, None, None, :], "bool 4D": real[:, None, None, :],
             "int 2D": MASK, "float 2D": MASK.float()}
    for name, m in forms.items():
        got = pf._padding_of(m, hidden)
        assert got is not None and torch.equal(got, real), name
    not_padding = {"causal": FusedMask(4, 13, 13, padding=real, causal=True),
                   "no padding": FusedMask(4, 13, 13), "dense [B,1,S,S]": additive.expand(4, 1, 13, 13),
                   "soft additive": additive * 0 - 1.0, "float 2D other values": MASK * 0.5, "None": None,
                   "wrong length": MASK[:, :12]}
    for name, m in not_padding.items():
        assert pf._padding_of(m, hidden) is None, name


def test_pickle_and_deepcopy_of_a_padding_free_model():
    import io
    model = tiny("bert")
    fused_attn.patch(model, padding_free=True)
    x = inputs()
    want = model(**x).last_hidden_state
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert pf.is_padding_free(other)
        assert torch.equal(other(**x).last_hidden_state, want)
        fused_attn.unpatch(other)
        assert not pf.is_padding_free(other) and pf.is_padding_free(model)


def test_fallback_warns_once_and_stays_correct():
    model = tiny("electra")
    x = inputs()
    ref64 = oracle_of(model)(**x, output_attentions=True)
    ref = model(**x, output_attentions=True)
    fused_attn.patch(model, padding_free=True)
    with pytest.warns(UserWarning, match="cannot run output_attentions on packed tokens") as record:
        got = model(**x, output_attentions=True)
    assert len([w for w in record if "padding_free" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = model(**x, output_attentions=True)          # said once
        model(input_ids=x["input_ids"])                       # no mask: nothing to unpad, no warning
        as_float = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"].float())   # 0/1 floats
    check_real_tokens("float 0/1 mask", as_float.last_hidden_state, ref64.last_hidden_state, ref.last_hidden_state, MASK)
    for i, (g, o, e) in enumerate(zip(got.attentions, ref64.attentions, ref.attentions)):
        assert_close_to_oracle(f"attentions[{i}]", g, o, e)
    # the padded fused path computes padding rows like eager does: compare everywhere
    assert_close_to_oracle("hidden", got.last_hidden_state, ref64.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(again.last_hidden_state, got.last_hidden_state)


@pytest.mark.skipif(TRANSFORMERS_5, reason="transformers 5 removed head_mask from BERT's forward")
def test_head_mask_falls_back():
    model = tiny("bert")
    x = inputs()
    hm = torch.tensor([1.0, 0.0, 1.0, 0.5])
    ref = model(**x, head_mask=hm).last_hidden_state
    ref64 = oracle_of(model)(**x, head_mask=hm.double()).last_hidden_state
    fused_attn.patch(model, padding_free=True)
    with pytest.warns(UserWarning, match="cannot run head_mask"):
        got = model(**x, head_mask=hm).last_hidden_state
    assert_close_to_oracle("head_mask", got, ref64, ref)


def test_decoder_falls_back():
    model = tiny("bert", is_decoder=True)
    x = inputs(MASK[:2])         # right padding: every causal query row sees a key
    ref = model(**x).last_hidden_state
    ref64 = oracle_of(model)(**x).last_hidden_state
    fused_attn.patch(model, padding_free=True)
    with pytest.warns(UserWarning, match="cannot run a decoder"):
        got = model(**x).last_hidden_state
    assert_close_to_oracle("decoder", got, ref64, ref)


def test_relative_positions_fall_back():
    model = tiny("bert", position_embedding_type="relative_key")
    x = inputs(MASK[:2])
    ref = model(**x).last_hidden_state
    ref64 = oracle_of(model)(**x).last_hidden_state
    fused_attn.patch(model, padding_free=True)
    with pytest.warns(UserWarning, match="cannot run position_embedding_type='relative_key'"):
        got = model(**x).last_hidden_state
    assert_close_to_oracle("relative positions", got, ref64, ref)


def test_concurrent_calls_from_threads_do_not_mix_batches(monkeypatch):
    """Two threads inside the same model at once, each with its own padding: each gets its own."""
    model = tiny("bert")
    fused_attn.patch(model, padding_free=True)
    masks = [MASK, torch.tensor([[1] * 13, [1] * 2 + [0] * 11, [1] * 13, [0] * 12 + [1]])]
    batches = [inputs(m, seed=i) for i, m in enumerate(masks)]
    want = [model(**b).last_hidden_state for b in batches]
    barrier = threading.Barrier(2, timeout=30)
    real = pf._BertLayout.run

    def run_together(layer, x, un, backend):
        barrier.wait()                      # both threads are inside the encoder now
        return real(layer, x, un, backend)

    monkeypatch.setattr(pf._BertLayout, "run", staticmethod(run_together))
    got = [None, None]

    def work(i):
        got[i] = model(**batches[i]).last_hidden_state

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert g is not None and torch.equal(g, w)


def test_torch_compile_aot_eager():
    """torch.compile works.  fullgraph=True is not possible: torch._dynamo.explain shows breaks at
    the gather (nonzero: a data-dependent shape), at the host sync for max_seqlen (.item()), in HF's
    output capturing (a ContextVar) and in the fused_attn mask function HF still calls."""
    model = tiny("bert")
    fused_attn.patch(model, padding_free=True)
    x = inputs()
    want = model(**x).last_hidden_state
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(**x).last_hidden_state
    assert_close_to_oracle("compiled", got, want, want)


def test_hf_trainer_runs_and_loss_falls(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny("bert", head="seq", num_labels=2).train()
    fused_attn.patch(model, padding_free=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        n = int(torch.randint(3, 13, (1,), generator=g))
        ids = torch.randint(5, 97, (13,), generator=g)
        label = i % 2
        ids[1] = 3 + label                               # a learnable signal
        rows.append({"input_ids": ids, "attention_mask": (torch.arange(13) < n).long(), "labels": torch.tensor(label)})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=6,
                             learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(l == l for l in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert pf.is_padding_free(model)


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
