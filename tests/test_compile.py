"""torch.compile traces fused_attn without graph breaks; the custom ops pass opcheck."""
import pytest
import torch

import fused_attn
from fused_attn import ops, reduce_mask
from _utils import padding_mask
from cases import make_mask, make_qkv


@pytest.mark.parametrize("mask_kind", ["pad-right", "pair", "none"])
def test_compile_fullgraph_forward_backward(engine, mask_kind):
    name, device = engine
    q, k, v = make_qkv(2, 2, 24, 40, 16, torch.float32, device, requires_grad=True)
    m = make_mask(mask_kind, 2, 2, 24, 40, device=device)

    def f(q, k, v, m):
        return fused_attn.attention(q, k, v, m, causal=True, backend=name)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, m)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    out_ref = f(q, k, v, m)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_opcheck_forward_op(engine):
    name, device = engine
    q, k, v = make_qkv(2, 2, 20, 33, 16, torch.float32, device, requires_grad=True)
    for mask in (padding_mask([5, 33], 33, device=device), make_mask("pair", 2, 2, 20, 33, device=device)):
        red = reduce_mask(mask, 2, 2, 20, 33)
        args = (q, k, v, red.values, red.key_start, red.key_end, red.key_dense, None, None,
                red.kind, red.additive, False, 0.25, 0.0, name)
        torch.library.opcheck(ops.attn_forward, args)
