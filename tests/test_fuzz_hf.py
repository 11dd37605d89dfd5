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
