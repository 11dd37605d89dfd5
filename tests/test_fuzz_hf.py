"""A fixed slice of tests/fuzz_hf.py in `make test` (under transformers 5 and 4): random padded
batches through every route of the Hugging Face integration against eager, many threads on one
patched model, patch / unpatch racing with calls.  The long form is `make fuzz`."""
import pytest

pytest.importorskip("transformers")
import fuzz_hf  # noqa: E402

SEED = 0


def _slice():
    """Case indices of SEED: two batches per route and dtype, one threads case per route, one race."""
    want = {("batch", r, d): 2 for r in fuzz_hf.ROUTES for d in ("float32", "bfloat16")}
    want.update({("threads", r, "float32"): 1 for r in fuzz_hf.ROUTES})
    want.update({("race",): 1})
    picked = []
    for i in range(2000):
        c = fuzz_hf.draw(fuzz_hf.case_seed(SEED, i))
        key = ("race",) if c["kind"] == "race" else (c["kind"], c["route"], c["dtype"])
        if want.get(key, 0) > 0:
            want[key] -= 1
            picked.append(pytest.param(i, id=f"{i}-{'-'.join(key)}"))
        if not any(want.values()):
            break
    return picked


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("index", _slice())
def test_fuzz_hf_slice(index):
    seed = fuzz_hf.case_seed(SEED, index)
    try:
        fuzz_hf.run_case(seed)
    except AssertionError as e:
        raise AssertionError(f"{fuzz_hf.describe(fuzz_hf.draw(seed))}: {e}\n  reproduce: "
                             f"{fuzz_hf.reproducer(seed)}") from e


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_call_that_outlives_an_unpatch_leaves_no_mask_behind():
    """Call 1 enters a padding-free model, which is unpatched while it runs (its exit hook is gone, its
    mask stays on the thread's call stack); call 2 starts unpatched and is patched before its encoder
    runs (its own entry hook never ran).  Call 2 must not take call 1's mask for its own."""
    import torch

    import fused_attn
    from _hf import MASK, inputs, tiny

    model = tiny("bert")
    first = inputs(MASK)
    second = inputs(MASK.flip(1))                   # same shape, other padding
    eager = fuzz_hf.hidden_of(model, second)
    fused_attn.patch(model, padding_free=True)
    swap = {"fn": lambda: fused_attn.unpatch(model)}

    def mid_call(*_):
        fn, swap["fn"] = swap["fn"], None
        if fn is not None:
            fn()

    hook = model.embeddings.register_forward_hook(mid_call)
    try:
        fuzz_hf.hidden_of(model, first)
    except Exception:  # noqa: BLE001 - a call whose model is swapped under it may raise (documented)
        pass
    if fuzz_hf.TRANSFORMERS_5:
        model.set_attn_implementation("eager")
    swap["fn"] = lambda: fused_attn.patch(model, padding_free=True)
    try:
        got = fuzz_hf.hidden_of(model, second)
    except Exception:  # noqa: BLE001 - loud is allowed; a wrong answer is not
        return
    finally:
        hook.remove()
    real = second["attention_mask"].bool()
    assert torch.allclose(got[real], eager[real], atol=1e-4), "call 2 used call 1's mask"
