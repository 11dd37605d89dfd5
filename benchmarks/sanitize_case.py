"""Small cases for compute-sanitizer (the sanitizer step of benchmarks/gpu_check.py):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/sanitize_case.py

Each Triton kernel family once on small ragged shapes (tiles only partly inside the tensors):
padded forward + backward with a key-padding mask and dropout (kept words stored), a 4-D mask (the
block-map path) with causal, and varlen forward + backward.  With the caching allocator off, every
tensor is its own allocation, so a read or write past one is reported.  Forward outputs without
dropout are checked against fused_attn.reference; exit 1 on a mismatch.
"""
import argparse
import sys

import torch

import fused_attn


def _close(out, ref, what):
    err = (out.float() - ref.float()).abs().max().item()
    ok = err < 2e-2
    print(f"{what}: max err {err:.2e} {'ok' if ok else 'MISMATCH'}", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cpu: the same calls under Triton's interpreter "
                                                      "(TRITON_INTERPRET=1), to check the script itself")
    dev, dt = torch.device(ap.parse_args(argv).device), torch.float16
    torch.manual_seed(0)
    ok = True
    B, H, Sq, Sk, D = 2, 3, 45, 70, 64
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=True) for S in (Sq, Sk, Sk))
    pad = torch.arange(Sk, device=dev)[None, :] < torch.tensor([70, 33], device=dev)[:, None]
    out = fused_attn.attention(q, k, v, pad, backend="triton")
    ok &= _close(out, fused_attn.reference.attention(q, k, v, pad), "padded fwd")
    out = fused_attn.attention(q, k, v, pad, dropout_p=0.1, backend="triton")
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    m4 = torch.rand(B, H, Sq, Sk, device=dev) > 0.3
    out = fused_attn.attention(q, k, v, m4, causal=True, backend="triton")
    ok &= _close(out, fused_attn.reference.attention(q, k, v, m4, causal=True), "4-D mask causal fwd")
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    lens = torch.tensor([1, 37, 64], dtype=torch.int32, device=dev)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    T = int(lens.sum())
    qp, kp, vp = (torch.randn(T, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    out = fused_attn.varlen_attention(qp, kp, vp, cu, cu, 64, 64, dropout_p=0.1, backend="triton")
    torch.autograd.grad(out, (qp, kp, vp), torch.randn_like(out))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("sanitize cases done" + ("" if ok else ": MISMATCH"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
