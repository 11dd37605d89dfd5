"""HF integration on a CUDA GPU (skipped without one): patched random-init BERT-family models vs
HF eager, fp32 and fp16, forward and gradients, against the fp64 eager oracle (docs/design.md rule)."""
import copy

import pytest
import torch

import fused_attn
from _hf import TINY, TRANSFORMERS_5, as_dtype, batch, oracle_of, projection_loss
from _utils import assert_tolerance

import transformers as tf  # noqa: E402

pytestmark = pytest.mark.cuda

CFG = dict(TINY, hidden_size=128, num_attention_heads=4, intermediate_size=256, num_hidden_layers=3,
           max_position_embeddings=300)


def _model(family, **over):
    torch.manual_seed(0)
    kw = dict(CFG, **over)
    if family == "roberta":
        kw.update(pad_token_id=1, max_position_embeddings=kw["max_position_embeddings"] + 2)
        return tf.RobertaModel(tf.RobertaConfig(attn_implementation="eager", **kw)).cuda().eval()
    return tf.BertModel(tf.BertConfig(attn_implementation="eager", **kw)).cuda().eval()


def _inputs(B=4, S=200):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, S + 1, (B,), generator=g).tolist()
    ids, mask = batch(B, S, lengths)
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}


def _forward_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    hidden = model(**inputs).last_hidden_state
    projection_loss(hidden.float()).backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None and "attention.self" in n}
    return hidden.float(), grads


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_patched_matches_eager_on_gpu(family, dtype):
    model = _model(family)
    inputs = _inputs()
    oracle_h, oracle_g = _forward_and_grads(oracle_of(model), inputs)
    eager = copy.deepcopy(model).to(dtype)
    eager_h, eager_g = _forward_and_grads(eager, inputs)
    fused = fused_attn.patch(copy.deepcopy(model).to(dtype))
    got_h, got_g = _forward_and_grads(fused, inputs)
    assert_tolerance(f"{family} {dtype} hidden", got_h, oracle_h, eager_h, dtype=dtype)
    for name in oracle_g:
        assert_tolerance(f"{family} {dtype} grad {name}", got_g[name], oracle_g[name], eager_g[name], dtype=dtype)


@pytest.mark.parametrize("cross", [False, True], ids=["decoder", "decoder+cross"])
def test_decoder_cache_on_gpu(cross):
    model = _model("bert", is_decoder=True, add_cross_attention=cross)
    inputs = _inputs(3, 40)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    mask[:, :20] = 1                                    # the cached prefix is real text
    extra = {}
    if cross:
        g = torch.Generator().manual_seed(2)
        extra = dict(encoder_hidden_states=torch.randn(3, 33, CFG["hidden_size"], generator=g).cuda(),
                     encoder_attention_mask=(torch.arange(33)[None] < torch.tensor([[33], [5], [17]])).long().cuda())

    def two_calls(m, dtype):
        ex = as_dtype(extra, dtype)
        first = m(input_ids=ids[:, :20], attention_mask=mask[:, :20], use_cache=True, **ex)
        second = m(input_ids=ids[:, 20:], attention_mask=mask, past_key_values=first.past_key_values, **ex)
        return torch.cat([first.last_hidden_state, second.last_hidden_state], 1).float()

    with torch.no_grad():
        oracle = two_calls(oracle_of(model), torch.float64)
        eager = two_calls(model, torch.float32)
        got = two_calls(fused_attn.patch(model), torch.float32)
    assert_tolerance("decoder cache", got, oracle, eager, dtype=torch.float32)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="attn_implementation='fused_attn' is the transformers 5.x path")
def test_attn_implementation_on_gpu_fp16():
    fused_attn.register()
    model = _model("bert")
    inputs = _inputs()
    with torch.no_grad():
        oracle = oracle_of(model)(**inputs).last_hidden_state.float()
        eager = copy.deepcopy(model).half()(**inputs).last_hidden_state.float()
        half = copy.deepcopy(model).half()
        half.set_attn_implementation("fused_attn")
        got = half(**inputs).last_hidden_state.float()
    assert_tolerance("fp16 attn_implementation", got, oracle, eager, dtype=torch.float16)


def test_training_with_dropout_on_gpu():
    model = fused_attn.patch(_model("bert", attention_probs_dropout_prob=0.1)).train()
    inputs = _inputs(8, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            hidden = model(**inputs).last_hidden_state
        loss = hidden.float()[..., :8].sub(1.0).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
