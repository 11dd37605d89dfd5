"""transformers 5.x: ``fused_attn.register()`` -> ``attn_implementation="fused_attn"`` through HF's
AttentionInterface + AttentionMaskInterface, for BERT and for other families that use them."""
import pytest
import torch

import fused_attn
from _hf import TINY, TRANSFORMERS_5, assert_close_to_oracle, batch, load_minilm, oracle_of
from fused_attn.integrations import hf

import transformers as tf  # noqa: E402

pytestmark = pytest.mark.skipif(not TRANSFORMERS_5, reason="attn_implementation='fused_attn' is the 5.x path "
                                "(4.x BERT does not use the attention interface: fused_attn.patch)")

SMALL = dict(vocab_size=TINY["vocab_size"], hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_hidden_layers=2)


def _model(family):
    """Tiny random-init models of families that use HF's attention interface."""
    torch.manual_seed(0)
    if family == "bert":
        return tf.BertModel(tf.BertConfig(attn_implementation="eager", **TINY))
    if family == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=97, dim=64, hidden_dim=96, n_heads=4, n_layers=2,
                                                      dropout=0.0, attention_dropout=0.0, attn_implementation="eager"))
    if family == "albert":
        return tf.AlbertModel(tf.AlbertConfig(embedding_size=32, attention_probs_dropout_prob=0.0,
                                              hidden_dropout_prob=0.0, attn_implementation="eager", **SMALL))
    if family == "llama":   # causal, grouped-query attention (4 query heads, 2 key/value heads)
        return tf.LlamaModel(tf.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64,
                                            attn_implementation="eager", **SMALL))
    if family == "bart":    # encoder-decoder: padded encoder, causal decoder, cross-attention
        return tf.BartModel(tf.BartConfig(vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=2,
                                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                          decoder_ffn_dim=96, max_position_embeddings=64, dropout=0.0,
                                          attention_dropout=0.0, attn_implementation="eager"))
    raise ValueError(family)


FAMILIES = ["bert", "distilbert", "albert", "llama", "bart"]


def _run(model, ids, mask):
    kw = dict(input_ids=ids, attention_mask=mask)
    if isinstance(model, tf.BartModel):
        kw.update(decoder_input_ids=ids[:, :7], decoder_attention_mask=mask[:, :7])
    return model(**kw).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_implementation_matches_eager(family, monkeypatch):
    fused_attn.register()
    model = _model(family).eval()
    ids, mask = batch(3, 12, [12, 8, 3])        # right padding: every query row sees a key
    oracle = _run(oracle_of(model), ids, mask)
    eager = _run(model, ids, mask)
    seen = []
    real = hf.fused_attention_forward

    def spy(module, q, k, v, attention_mask, *a, **kw):
        seen.append(type(attention_mask).__name__)
        return real(module, q, k, v, attention_mask, *a, **kw)

    monkeypatch.setitem(tf.AttentionInterface._global_mapping, "fused_attn", spy)
    model.set_attn_implementation("fused_attn")
    got = _run(model, ids, mask)
    assert seen and set(seen) == {"FusedMask"}, seen       # HF handed every layer the reduced mask
    assert_close_to_oracle(f"{family} hidden states", got, oracle, eager)


def test_from_pretrained_minilm_reduces_the_mask_once(monkeypatch):
    from fused_attn import masks
    fused_attn.register()
    tok, _ = load_minilm()
    from _hf import SENTENCES, minilm_path
    model = tf.AutoModel.from_pretrained(minilm_path(), attn_implementation="fused_attn").eval()
    assert model.config._attn_implementation == "fused_attn"
    calls = []
    real = masks._reduce
    monkeypatch.setattr(masks, "_reduce", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    enc = tok(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).last_hidden_state
    assert calls == [enc["attention_mask"].shape[:1] + enc["attention_mask"].shape[1:]], calls  # one [B, S]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**enc).last_hidden_state
        oracle = oracle_of(model)(**enc).last_hidden_state
    assert_close_to_oracle("MiniLM via attn_implementation", got, oracle, eager)


def test_output_attentions_with_fused_implementation():
    fused_attn.register()
    model = _model("bert").eval()
    ids, mask = batch(2, 9, [9, 4])
    ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    ref64 = oracle_of(model)(input_ids=ids, attention_mask=mask, output_attentions=True)
    model.set_attn_implementation("fused_attn")
    got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == TINY["num_hidden_layers"]
    for i, (g, r, o) in enumerate(zip(got.attentions, ref.attentions, ref64.attentions)):
        assert_close_to_oracle(f"attentions[{i}]", g, o, r)


def test_mask_function_falls_back_to_hf_dense_mask_for_other_patterns():
    """Patterns other than padding / causal / sliding windows / packed sequences (here a custom
    and_mask_function) get HF's exact boolean mask inside the FusedMask, reduced like any other
    mask; HF's sliding windows become a window, with no dense mask."""
    from transformers import masking_utils as mu
    pad = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 1)
    fm = hf.fused_attn_mask(batch_size=2, q_length=6, kv_length=6, q_offset=0, kv_offset=0,
                            mask_function=custom, attention_mask=pad, device=torch.device("cpu"), dtype=torch.float32)
    want = mu.sdpa_mask(batch_size=2, q_length=6, kv_length=6, q_offset=0, kv_offset=0, mask_function=custom,
                        attention_mask=pad, allow_is_causal_skip=False, device=torch.device("cpu"))
    assert isinstance(fm, hf.FusedMask) and fm.dense is not None and torch.equal(fm.dense, want)
    for fn, causal, window in [(mu.sliding_window_causal_mask_function(3), True, (2, -1)),
                               (mu.sliding_window_bidirectional_mask_function(3), False, (3, 3))]:
        sw = hf.fused_attn_mask(batch_size=2, q_length=6, kv_length=6, q_offset=0, kv_offset=0,
                                mask_function=fn, attention_mask=pad, device=torch.device("cpu"))
        assert not sw.is_dense and sw.causal == causal and sw.window == window and torch.equal(sw.padding, pad)
        # the window it stands for is HF's exactly
        from fused_attn.reference import window_visible
        hf_dense = mu.sdpa_mask(batch_size=1, q_length=6, kv_length=6, q_offset=0, kv_offset=0, mask_function=fn,
                                allow_is_causal_skip=False, allow_is_bidirectional_skip=False)[0, 0]
        ours = window_visible(6, 6, window, "cpu") & (torch.ones(6, 6).tril().bool() if causal else True)
        assert torch.equal(hf_dense, ours), (hf_dense, ours)
    plain = hf.fused_attn_mask(batch_size=2, q_length=6, kv_length=6, q_offset=0, kv_offset=0,
                               mask_function=mu.bidirectional_mask_function, attention_mask=pad)
    assert plain.dense is None and not plain.causal and torch.equal(plain.padding, pad)
    causal = hf.fused_attn_mask(batch_size=2, q_length=2, kv_length=6, q_offset=4, kv_offset=0,
                                mask_function=mu.causal_mask_function, attention_mask=pad)
    assert causal.causal and causal.dense is None
