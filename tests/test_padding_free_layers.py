"""patch(model, padding_free=True): the packed encoder calls each layer as a module
(fused_attn/integrations/packed_layers.py), so what wraps or hooks a layer runs on the packed
tokens: forward hooks, HF's gradient checkpointing, torch's checkpoint_wrapper.  (FSDP2 sharding
each layer: test_distributed.py.)  Runs with the installed transformers (5.x in .venv, 4.x in
.venv-hf4: `make test-hf4`).
"""
import functools

import pytest
import torch

import fused_attn
from _hf import MASK, TINY, grads_of, inputs, tiny
from fused_attn.integrations import packed_layers
from fused_attn.integrations import padding_free as pf


@pytest.mark.parametrize("how", ["hf", "checkpoint_wrapper", "encoder"])
def test_gradient_checkpointing_in_the_packed_loop(how, monkeypatch):
    """Each layer runs again on packed tokens in the backward pass (the recomputation), and the
    gradients are those without checkpointing: HF's gradient_checkpointing_enable() (the layer
    checkpoints itself in __call__, transformers >= 4.52), torch's checkpoint_wrapper around each
    layer, and an encoder that checkpoints its layers (transformers < 4.52, imitated)."""
    model = tiny("roberta").train()
    x = inputs()
    fused_attn.patch(model, padding_free=True)
    plain_loss, plain = grads_of(model, x)
    encoder = model.encoder
    if how == "hf":
        model.gradient_checkpointing_enable()
    elif how == "checkpoint_wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, layer in enumerate(encoder.layer):
            encoder.layer[i] = checkpoint_wrapper(layer)
    else:
        monkeypatch.setattr(packed_layers, "checkpoints_itself", lambda layer: False)
        monkeypatch.setattr(encoder, "gradient_checkpointing", True, raising=False)
        monkeypatch.setattr(encoder, "_gradient_checkpointing_func",
                            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False), raising=False)
    runs = []
    real = pf.varlen_attention
    monkeypatch.setattr(pf, "varlen_attention", lambda *a, **k: runs.append(a[0].shape[0]) or real(*a, **k))
    ckpt_loss, ckpt = grads_of(model, x)
    n = TINY["num_hidden_layers"]
    assert runs == [int(MASK.sum())] * (2 * n), runs           # forward, then recomputed in backward
    assert torch.equal(plain_loss, ckpt_loss)
    ckpt = {name.replace("._checkpoint_wrapped_module", ""): g for name, g in ckpt.items()}
    assert ckpt.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_layer_hooks_run_on_packed_tokens(family):
    """The packed encoder calls each layer as a module, so the layer's hooks run (what FSDP2's
    per-layer sharding and activation checkpoint wrappers rely on); they see the packed tokens
    [1, T, hidden], and a hook's return value replaces the output, as for any module."""
    model = tiny(family)
    x = inputs()
    fused_attn.patch(model, padding_free=True)
    want = model(**x).last_hidden_state
    layers = list((model.transformer if family == "distilbert" else model.encoder).layer)
    seen = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(("pre", m, tuple(args[0].shape))))
        layer.register_forward_hook(lambda m, args, out: seen.append(("post", m, tuple(out.shape))))
    got = model(**x).last_hidden_state
    packed = (1, int(MASK.sum()), TINY["hidden_size"])
    assert seen == [(when, layer, packed) for layer in layers for when in ("pre", "post")], seen
    assert torch.equal(got, want)
    layers[-1].register_forward_hook(lambda m, args, out: out * 0)
    assert torch.equal(model(**x).last_hidden_state, torch.zeros_like(want))
