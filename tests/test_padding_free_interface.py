"""patch(model, padding_free=True) on models whose attention goes through transformers' attention
interface (integrations/packed_interface.py): ModernBERT (local + global layers, task heads), GTE,
NomicBERT, Jina embeddings v3, EuroBERT (grouped-query k/v).  Outputs and every gradient against
HF's eager model on the real tokens (fp64 oracle, DESIGN's rule), zeros at padding; training with
dropout, gradient checkpointing, torch.compile, sentence-transformers and the Trainer; the
fallbacks.  transformers 5 only (4.x: one warning for ModernBERT, see test_modernbert_4x_warns).
"""
import copy
import warnings

import pytest
import torch

import fused_attn
from _hf import TRANSFORMERS_5, assert_close_to_oracle, check_real_tokens, masked_loss
from fused_attn.integrations import packed_interface as pi

transformers = pytest.importorskip("transformers")
needs_5 = pytest.mark.skipif(not TRANSFORMERS_5, reason="the attention interface route needs transformers 5")

V = 97
# right padding, a full row, left padding (no holes: see test_holes_with_local_layers_fall_back).
# No run of padding is longer than ModernBERT's half window (5): HF's eager local layers give NaN
# (0 * NaN from fully masked padding rows) otherwise, in fp32 and fp64
MASK = torch.tensor([[1] * 12 + [0] * 5,
                     [1] * 17,
                     [0] * 5 + [1] * 12,
                     [1] * 14 + [0] * 3])
HOLES = torch.tensor([[1] * 17, [1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])


def config(family, **over):
    tf = transformers
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  pad_token_id=1)
    if family == "modernbert":
        # local_attention=10: a window of 5 tokens each side, smaller than the rows; layer 0 global, 1-2 local
        kw = dict(common, local_attention=10, global_attn_every_n_layers=3, max_position_embeddings=64,
                  classifier_pooling="mean", bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
        return tf.ModernBertConfig(**dict(kw, **over))
    if family == "eurobert":
        kw = dict(common, num_key_value_heads=2, head_dim=16, bos_token_id=2, eos_token_id=3, mask_token_id=4)
        return tf.EuroBertConfig(**dict(kw, **over))
    cls = {"gte": tf.GteConfig, "nomic": tf.NomicBertConfig, "jina": tf.JinaEmbeddingsV3Config}[family]
    kw = dict(common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    if family == "nomic":
        kw["head_dim"] = 16
    return cls(**dict(kw, **over))


def model_of(family, head=None, **over):
    tf = transformers
    prefix = {"modernbert": "ModernBert", "gte": "Gte", "nomic": "NomicBert", "jina": "JinaEmbeddingsV3",
              "eurobert": "EuroBert"}[family]
    cls = getattr(tf, prefix + {None: "Model", "mlm": "ForMaskedLM", "seq": "ForSequenceClassification",
                                "tok": "ForTokenClassification"}[head])
    cfg = config(family, **over)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg).eval()


def batch(mask=MASK, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, mask.shape, generator=g)
    return dict(input_ids=ids * mask + (1 - mask), attention_mask=mask)


def eager_copy(model, dtype):
    m = copy.deepcopy(model).to(dtype)
    m.set_attn_implementation("eager")
    return m


def padding_free(model):
    fused_attn.patch(model, padding_free=True)
    assert pi.is_packed(model), "the model did not qualify"
    return model


FAMILIES = ["modernbert", "gte", "nomic", "jina", "eurobert"]


@needs_5
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_gradients_match_eager(family):
    model = model_of(family)
    x = batch()
    oracle, eager = eager_copy(model, torch.float64), eager_copy(model, torch.float32)
    pf = padding_free(copy.deepcopy(model))
    want, ref = oracle(**x), eager(**x)
    assert torch.isfinite(want.last_hidden_state).all()
    got = pf(**x)
    check_real_tokens(f"{family} last_hidden_state", got.last_hidden_state, want.last_hidden_state,
                      ref.last_hidden_state, MASK)
    if getattr(want, "pooler_output", None) is not None:      # rows whose first token (what it pools) is real
        first = MASK[:, 0].bool()
        assert_close_to_oracle("pooler", got.pooler_output[first], want.pooler_output[first], ref.pooler_output[first])

    grads = {}
    for name, m in (("oracle", oracle), ("eager", eager), ("pf", pf)):
        m.train()
        m.zero_grad()
        masked_loss(m(**x), MASK).backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads["pf"]) == set(grads["eager"]) and len(grads["pf"]) > 10
    for n in grads["pf"]:
        assert torch.isfinite(grads["oracle"][n]).all(), n
        assert_close_to_oracle(f"{family} grad {n}", grads["pf"][n], grads["oracle"][n], grads["eager"][n])


@needs_5
@pytest.mark.parametrize("head", ["mlm", "seq", "tok"])
def test_modernbert_task_heads(head):
    model = model_of("modernbert", head=head, num_labels=3)
    x = batch()
    oracle, eager = eager_copy(model, torch.float64), eager_copy(model, torch.float32)
    pf = padding_free(copy.deepcopy(model))
    got, want, ref = pf(**x).logits, oracle(**x).logits, eager(**x).logits
    assert torch.isfinite(want).all()
    if head == "seq":
        assert_close_to_oracle("seq logits", got, want, ref)
    else:                         # per token: the real ones (the head maps zeros at padding to its bias)
        real = MASK.bool()
        assert_close_to_oracle(f"{head} logits", got[real], want[real], ref[real])


@needs_5
def test_packed_call_sees_real_tokens_only(monkeypatch):
    """Every attention call gets the packed sequences ([1, T] tokens, cu_seq_lens of the rows) and
    no mask: nothing is computed on padding."""
    from fused_attn.integrations import hf_attention

    seen = []
    real_forward = hf_attention.fused_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append((tuple(query.shape), attention_mask, kw.get("cu_seq_lens_q"), kw.get("sliding_window")))
        return real_forward(module, query, key, value, attention_mask, **kw)

    model = padding_free(model_of("modernbert"))
    transformers.AttentionInterface.register("fused_attn", spy)
    try:
        model(**batch())
    finally:
        fused_attn.register()
    T = int(MASK.sum())
    assert len(seen) == 3
    for shape, mask, cu, _ in seen:
        assert shape[0] == 1 and shape[2] == T
        assert mask is None or (getattr(mask, "padding", None) is None and getattr(mask, "_dense", None) is None)
        assert cu.tolist() == [0, 12, 29, 41, 55]
    assert [w for *_, w in seen] == [None, 6, 6]        # HF's sliding_window (half window + 1) on the local layers


@needs_5
def test_unpatch_restores_and_patch_is_idempotent():
    model = model_of("modernbert", head="mlm")
    x = batch()
    before = model(**x).logits
    fused_attn.patch(model, padding_free=True)
    fused_attn.patch(model, padding_free=True)
    assert type(model.model.__dict__["forward"]) is pi.PackedForward
    assert model.model.forward.previous is None
    fused_attn.unpatch(model)
    assert "forward" not in model.model.__dict__ and not pi.is_packed(model)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(model(**x).logits, before, rtol=0, atol=0)


@needs_5
def test_holes_with_local_layers_fall_back():
    """A mask with holes on a model with local layers runs padded (one warning), and stays correct;
    without local layers (GTE) holes are packed."""
    x = batch(HOLES)
    for family, warns in (("modernbert", True), ("gte", False)):
        model = model_of(family)
        eager = eager_copy(model, torch.float32)
        oracle = eager_copy(model, torch.float64)
        padding_free(model)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = model(**x).last_hidden_state
            model(**x)
        msgs = [str(m.message) for m in w if "holes" in str(m.message)]
        assert len(msgs) == (1 if warns else 0), msgs
        real = HOLES.bool()
        want = oracle(**x).last_hidden_state[real]
        assert torch.isfinite(want).all()
        assert_close_to_oracle(family, got[real], want, eager(**x).last_hidden_state[real])


@needs_5
def test_fallbacks_warn_once():
    model = padding_free(model_of("gte"))
    x = batch()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = model(**x, output_attentions=True)
        model(**x, output_attentions=True)
    assert a.attentions is not None and len(a.attentions) == 3
    assert len([m for m in w if "output_attentions" in str(m.message)]) == 1
    model.set_attn_implementation("sdpa")           # sdpa ignores the sequence boundaries: padded path
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model(**x)
    assert len([m for m in w if "attn_implementation='sdpa'" in str(m.message)]) == 1


@needs_5
def test_training_dropout_checkpointing_and_hidden_states():
    """Dropout (attention and MLP) trains; gradient checkpointing gives the same gradients (dropout
    off); output_hidden_states come back padded, zeros at padding."""
    x = batch()
    model = padding_free(model_of("modernbert", attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1))
    model.train()
    out = model(**x)
    loss = masked_loss(out, MASK)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.equal(out.last_hidden_state[~MASK.bool()], torch.zeros_like(out.last_hidden_state[~MASK.bool()]))

    plain = padding_free(model_of("modernbert"))
    ckpt = padding_free(model_of("modernbert"))
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    grads = []
    for m in (plain, ckpt):
        m.train()
        out = m(**x, output_hidden_states=True)
        masked_loss(out, MASK).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        assert len(out.hidden_states) == 4
        for h in out.hidden_states:
            assert h.shape == (*MASK.shape, 64) and not h[~MASK.bool()].any()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


@needs_5
def test_torch_compile():
    model = padding_free(model_of("gte"))
    x = batch()
    want = model(**x).last_hidden_state
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager")(**x).last_hidden_state
    assert_close_to_oracle("compiled", got, want, want)


@needs_5
def test_hf_trainer_runs_and_loss_falls(tmp_path):
    from _hf import assert_trainer_loss_falls

    model = padding_free(model_of("modernbert", head="seq", num_labels=2))
    assert_trainer_loss_falls(model, tmp_path, seq_len=17, vocab=V)
    assert pi.is_packed(model)


@needs_5
def test_sentence_transformers_encode(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from _hf import SENTENCES, minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = model_of("modernbert", vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    sbert = st.SentenceTransformer(str(tmp_path), device="cpu")        # Transformer + mean pooling
    hf = next(m for m in sbert.modules() if isinstance(m, transformers.PreTrainedModel))
    hf.set_attn_implementation("eager")
    want = sbert.encode(SENTENCES, convert_to_tensor=True)
    fused_attn.patch(sbert, padding_free=True)
    assert pi.is_packed(sbert)
    got = sbert.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(TRANSFORMERS_5, reason="transformers 4.x")
def test_modernbert_4x_warns():
    tf = transformers
    if not hasattr(tf, "ModernBertModel"):
        pytest.skip("no ModernBERT")
    cfg = tf.ModernBertConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, pad_token_id=1, attn_implementation="eager")
    model = tf.ModernBertModel(cfg)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fused_attn.patch(model, padding_free=True)
    msgs = [str(m.message) for m in w if "fused_attn" in str(m.message)]
    assert len(msgs) == 1 and "ModernBERT on transformers 4.x" in msgs[0], msgs
    assert not pi.is_packed(model)


@needs_5
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "padding_free"])
def test_patch_backend_reaches_every_interface_call(monkeypatch, packed):
    """patch(model, backend=...) of an interface model: every attention call gets that backend (a
    second patch updates it; unpatch removes it)."""
    from fused_attn.integrations import hf_attention

    seen = []
    for name in ("fused_attention", "varlen_attention"):
        def spy(*a, _real=getattr(hf_attention, name), _name=name, **kw):
            seen.append((_name, kw.get("backend")))
            return _real(*a, **kw)
        monkeypatch.setattr(hf_attention, name, spy)
    model = model_of("modernbert")
    kernel = "varlen_attention" if packed else "fused_attention"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused_attn.patch(model, backend="reference", padding_free=packed)
    model(**batch())
    assert seen == [(kernel, "reference")] * 3
    seen.clear()
    fused_attn.patch(model, backend="cpu", padding_free=packed)
    model(**batch())
    assert seen == [(kernel, "cpu")] * 3
    fused_attn.unpatch(model)
    assert not any(hf_attention.BACKEND_ATTR in m.__dict__ for m in model.modules())


@needs_5
@pytest.mark.parametrize("where", ["embeddings", "layer 1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_during_a_packed_call_raises(family, where):
    """unpatch() (another thread's, here a layer's pre-hook) in the middle of a packed call switches
    the later layers to eager attention on packed tokens: the call must raise, never return that.
    Unpatched before HF builds the mask (at the embeddings), every layer would run eager attention
    with no mask across the packed sequences; later, eager attention fails on the FusedMask."""
    model = padding_free(model_of(family))
    layer = (getattr(model, "embeddings", None) or model.embed_tokens) if where == "embeddings" else \
        [m for m in model.modules() if type(m).__name__.endswith("Layer")][1]

    def unpatch_now(module, args):
        fused_attn.unpatch(model)

    handle = layer.register_forward_pre_hook(unpatch_now)
    with torch.inference_mode(), pytest.raises((RuntimeError, TypeError), match="in flight|FusedMask"):
        model(**batch())
    handle.remove()
    assert not pi.is_packed(model) and model.config._attn_implementation == "eager"
