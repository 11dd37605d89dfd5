"""The randomised differential tests (tests/fuzz.py, the runner; tests/fuzz_checks.py, the cases
and checks) in `make test`: a short, fixed slice of the fuzzer's cases on every engine, the
fuzzer's own machinery (worker processes, crash reports, reproducers, sensitivity), and the known
limitations it classifies, pinned as strict xfails.

The long form is `make fuzz N=10000 SEED=...` (docs/testing.md)."""
import os
import subprocess
import sys

import pytest
import torch

import fuzz
import fuzz_checks
from _utils import assert_tolerance, eager_attention
from fused_attn import masks, reference
from fused_attn._rng import philox_rng
import fused_attn

# cases per engine in `make test`: the interpreted / emulated engines are slower per case
SLICE = {"cpu": 32, "triton-interp": 8, "cuda-emu": 24, "triton-gpu": 64, "cuda-ext": 64}
ENGINE_IDS = {("cpu", "cpu"): "cpu", ("triton", "cpu"): "triton-interp", ("cuda-emu", "cpu"): "cuda-emu",
              ("triton", "cuda"): "triton-gpu", ("cuda", "cuda"): "cuda-ext"}
SLICE_SEED = int(os.environ.get("FUSED_ATTN_FUZZ_SEED", "0"))


def _engine_id(request):
    return ENGINE_IDS[request.node.callspec.params["engine"]]


def run_slice(engine, engine_id, n, seed=SLICE_SEED, first=0, family="dense"):
    """(failures, known) over cases first..first+n-1 of `seed`; each failure with its reproducer."""
    name, device = engine
    failures, known = [], []
    for i in range(first, first + n):
        cs = fuzz.case_seed(seed, i)
        case = fuzz_checks.draw(engine_id, cs, family)
        try:
            fuzz_checks.FAMILIES[case["family"]](name, device, case, cs)
        except fuzz_checks.KnownIssue as e:
            known.append((i, e.name))
        except Exception as e:  # noqa: BLE001 - any exception is a failure, reported with its case
            failures.append(f"case {i} ({fuzz_checks.describe(case)}): {type(e).__name__}: {str(e)[:300]}\n"
                            f"  reproduce: {fuzz.reproducer(engine_id, cs, case['family'])}")
    return failures, known


def test_fuzz_slice(engine, request):
    """A fixed slice of the fuzzer's cases: forward and gradients within DESIGN.md's rule."""
    engine_id = _engine_id(request)
    failures, _ = run_slice(engine, engine_id, SLICE[engine_id])
    assert not failures, f"{len(failures)} of {SLICE[engine_id]} cases failed:\n" + "\n".join(failures)


def test_fuzz_varlen_slice(engine, request):
    """A fixed slice of the fuzzer's packed batches (varlen_attention): forward and gradients."""
    engine_id = _engine_id(request)
    n = SLICE[engine_id] // 2
    failures, _ = run_slice(engine, engine_id, n, family="varlen")
    assert not failures, f"{len(failures)} of {n} packed cases failed:\n" + "\n".join(failures)


def test_fuzzer_catches_a_broken_mask_reduction(monkeypatch):
    """Sensitivity: key-padding masks with holes reduced as if they were contiguous runs
    (key_needs_mask forced to 0, so the kernel never loads the mask inside a row's range) must fail cases."""
    real = masks._reduce_keys

    def broken(*args):
        red = real(*args)
        red.key_needs_mask = torch.zeros_like(red.key_needs_mask)
        return red

    monkeypatch.setattr(masks, "_reduce_keys", broken)
    masks._CACHE.clear()
    masks._BY_VALUES.clear()
    failures, _ = run_slice(("cpu", "cpu"), "cpu", 24)
    masks._CACHE.clear()
    masks._BY_VALUES.clear()
    assert len(failures) >= 2, failures


def test_fuzz_cli_reports_failures_crashes_and_reproducers(tmp_path):
    """The long form's runner: worker processes, a crashed case named with its reproducer (the
    run goes on with a fresh worker), the summary with versions and seed, exit status 1."""
    env = dict(os.environ, FUSED_ATTN_FUZZ_CRASH_AT="2", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "fuzz.py"), "--engine", "cpu",
                        "--n", "4", "--seed", "3", "--jobs", "1"], env=env, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "CRASH case 2" in out and f"--case {fuzz.case_seed(3, 2)}" in out, out
    assert "4 cases (of 4)" in out and "1 failures (1 crashes or hangs)" in out, out
    assert f"torch {torch.__version__}" in out and "seed 3" in out, out



def test_interp_cases_draw_tiles_that_reach_the_launcher():
    """triton-interp cases carry tile sizes (cases.random_tiles): the interpreter defaults on about
    a quarter, larger tiles on the others; fuzz_checks.tiles() makes the launcher use them, then
    restores it."""
    from cases import INTERP_DEFAULT_TILES
    from fused_attn.backends import triton_backend as tb

    drawn = [fuzz_checks.draw("triton-interp", fuzz.case_seed(0, i))["tiles"] for i in range(400)]
    assert 60 <= sum(t == INTERP_DEFAULT_TILES for t in drawn) <= 140, drawn
    assert len(set(drawn)) > 50
    assert "tiles" not in fuzz_checks.draw("cpu", fuzz.case_seed(0, 0))
    cpu = torch.device("cpu")
    before = tb.fwd_config(64, torch.float16, cpu), tb.bwd_config(64, torch.float16, cpu)
    q = torch.randn(1, 1, 200, 16)
    red = fused_attn.reduce_mask(None, 1, 1, 200, 200)

    def query_blocks():   # the forward's grid, seen through its per-block statistics
        return tb.forward(q, q, q, red, False, 0.25, 0.0, None, stats=True)[2].shape[-1]

    default_blocks = query_blocks()
    with fuzz_checks.tiles(dict(tiles=((64, 32), (32, 64), (128, 64)))):
        assert tb.fwd_config(64, torch.float16, cpu) == tb.TileConfig(64, 32, 4, 1)
        assert tb.bwd_config(64, torch.float16, cpu) == (tb.TileConfig(32, 64, 4, 1), tb.TileConfig(128, 64, 4, 1))
        assert query_blocks() == 4                       # ceil(200 / 64): the cached launch plan follows
    assert (tb.fwd_config(64, torch.float16, cpu), tb.bwd_config(64, torch.float16, cpu)) == before
    assert query_blocks() == default_blocks == -(-200 // before[0].block_m)

# -- known limitations the fuzzer classifies (fuzz_checks.KNOWN_ISSUES), pinned as strict xfails


@pytest.mark.xfail(strict=True, reason=(
    "known issue delta-rounding: every engine's backward takes delta = rowsum(dO * O) from the "
    "output rounded to fp16, so with O scaled by head_mask a row that sees a single key gets "
    "dS = fac * dP - delta = O(eps * |dO| |O|) instead of exactly 0; dq reaches ~1e-3 where the "
    "oracle and eager are exactly 0 (floor 1e-4)"))
def test_single_key_rows_get_exact_zero_dq(engine):
    name, device = engine
    g = torch.Generator().manual_seed(1)
    B, H, Sq, Sk, D = 2, 2, 64, 1, 64
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(device, torch.float16).requires_grad_()
               for S in (Sq, Sk, Sk))
    go = torch.randn(B, H, Sq, D, generator=g).to(device, torch.float16)
    hm = torch.tensor([0.3, 0.7], device=device)
    out = fused_attn.attention(q, k, v, head_mask=hm, backend=name)
    dq, = torch.autograd.grad(out, (q,), go)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    oracle, = torch.autograd.grad(reference.attention(q32, k32, v32, head_mask=hm), (q32,), go.float())
    eager, = torch.autograd.grad(eager_attention(q, k, v, head_mask=hm), (q,), go)
    assert (oracle == 0).all() and (eager == 0).all()        # one key: softmax has no gradient
    assert_tolerance("dq", dq, oracle, eager)


def test_fp32_large_scores(engine, request):
    """fp32 with scores of large magnitude (scale 2 at D = 128): gradients within the rule
    against an fp64 oracle (fuzz_checks.check_dense's rule for fp32)."""
    name, device = engine
    if (name, device) == ("triton", "cpu"):
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "known issue fp32-relative: the interpreted Triton backward's fp32 dk / dv err ~2x the "
            "bound (1e-4 on values ~30, 3e-6 relative): scores recomputed by a different dot "
            "(k q^T instead of q k^T) than the forward's log-sum-exp, amplified by |scores| ~ 30")))
    elif (name, device) == ("triton", "cuda"):
        request.applymarker(pytest.mark.xfail(strict=False, reason="fp32-relative: not measured on a GPU yet"))
    case = dict(family="dense", B=1, H=2, Sq=65, Sk=65, D=128, dtype=torch.float32, layout="contiguous",
                mask="none", causal=False, dropout_p=0.0, head_mask=None, scale=2.0, grad=True)
    for seed in range(3):
        try:
            fuzz_checks.check_dense(name, device, case, seed)
        except fuzz_checks.KnownIssue as e:
            raise AssertionError(str(e)) from None


def test_dropout_scale_rounds_like_the_reference(engine):
    """Rows that see one key output v / (1 - p), rounded once: bitwise the fp32 oracle's value
    rounded to fp16.  Every engine takes the scale 1 / (1 - p) computed on the host in double and
    rounded once to fp32 (2.5 for p = 0.6); 1 / (1.f - float(p)) in fp32 is 2.5000002, and outputs
    on rounding ties then round away from the oracle's (~5% of the fp16 elements here).  (Found by
    the fuzzer: the biased scale made delta = rowsum(dO * O) drift with D and dq exceed the bound.)"""
    name, device = engine
    B, H, Sq, Sk, D, p = 1, 2, 64, 1, 128, 0.6
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(device, torch.float16) for S in (Sq, Sk, Sk))
    torch.manual_seed(11)                  # the rng draw comes from q's device's generator
    out = fused_attn.attention(q, k, v, dropout_p=p, backend=name)
    torch.manual_seed(11)                  # the same draw again
    seed, offset = philox_rng(torch.device(device)).tolist()
    keep = fuzz_checks.keep_mask(name, B, H, Sq, Sk, p, seed, offset, device)
    ref = reference.attention(q.float(), k.float(), v.float(), dropout_p=p, dropout_mask=keep)
    assert keep.any() and not keep.all()
    differ = out != ref.half()
    assert not differ.any(), f"{int(differ.sum())} of {out.numel()} outputs round differently from the oracle"
