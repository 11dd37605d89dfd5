"""transformers 5.x: HF's padding-free batches (DataCollatorWithFlattening: one row [1, T] whose
position_ids restart per sequence, or cu_seq_lens_q/k + max_length_q/k) under
attn_implementation="fused_attn" run on varlen_attention with no dense mask, and give the loss of the
same sequences padded (fp64 eager oracle, DESIGN.md's rule)."""
import copy

import pytest
import torch

import fused_attn
from _hf import TRANSFORMERS_5, assert_close_to_oracle, oracle_of, tiny

import transformers as tf  # noqa: E402

pytestmark = pytest.mark.skipif(not TRANSFORMERS_5, reason="attn_implementation='fused_attn' is the 5.x path")


def flattened_and_padded(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [{"input_ids": torch.randint(5, 97, (n,), generator=g).tolist()} for n in lens]
    for f in feats:
        f["labels"] = list(f["input_ids"])
    S = max(lens)
    ids = torch.zeros(len(lens), S, dtype=torch.long)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    labels = torch.full((len(lens), S), -100)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, 1:n] = torch.tensor(f["labels"][1:])        # the collator hides each first token
    return feats, dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_flattened_batch_loss_equals_padded(family, flash_kwargs, monkeypatch):
    from transformers import DataCollatorWithFlattening
    from transformers import masking_utils as mu
    from fused_attn.integrations import hf_attention

    fused_attn.register()
    if family == "llama":       # causal and grouped-query: packed sequences must stay causal
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                   num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                                   max_position_embeddings=64, attn_implementation="eager")).eval()
    else:
        model = tiny("bert", head="mlm")
    feats, padded = flattened_and_padded([7, 3, 11, 1])
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(feats)
    assert flat["input_ids"].shape == (1, 22) and "attention_mask" not in flat
    o64 = oracle_of(model)
    oracle = o64(**padded).loss
    eager = model(**padded).loss
    model.set_attn_implementation("fused_attn")
    dense, varlen = [], []
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: dense.append(1))
    real = hf_attention.varlen_attention
    monkeypatch.setattr(hf_attention, "varlen_attention", lambda *a, **k: varlen.append(k["causal"]) or real(*a, **k))
    got = model(**flat).loss
    assert not dense, "a dense mask was built"
    assert varlen == [family == "llama"] * 2
    assert_close_to_oracle(f"{family} flattened loss", got, oracle, eager)
    eager_flat = copy.deepcopy(o64).float()(**flat).loss if family == "llama" else None
    if eager_flat is not None:      # HF's eager attends across the packed sequences: not the same loss
        assert abs(eager_flat.item() - oracle.item()) > 1e-4
