"""Randomised checks of the Hugging Face integrations under load (issue 23): random padded batches
through every route, many threads on one patched model, patch / unpatch racing with calls.

    python tests/fuzz_hf.py --n 300 --seed 1 --time-limit 600      # the long form (make fuzz)
    python tests/fuzz_hf.py --seed 1 --case 17                     # one case, verbose

Case i of a run with seed S has its own seed (S << 32) + i, so every failure is reproduced by one
command (printed with it).  tests/test_fuzz_hf.py runs a fixed slice of the same cases in
`make test`, under transformers 5 and 4.  Kinds of case (drawn from the case's seed):

* "batch": a tiny random-init encoder (BERT, RoBERTa, ELECTRA, DistilBERT; 1, 2 or 4 heads of 16
  or 32 dims; fp32 or bf16), a batch of B <= 4 rows of S <= 16 tokens, each row with 0..S real
  tokens (right padding, left padding, or holes), through one route -- ``patch(model)``,
  ``patch(model, padding_free=True)`` or (transformers 5) ``attn_implementation="fused_attn"`` --
  against the same model run eagerly, under docs/design.md's rule (the fp64 eager model is the
  oracle).  Compared: every position of rows with a real token (padding_free: the real tokens,
  and exact zeros at padding); a row with no real token has no key to see (its attention is 0 by
  the contract, HF eager's is uniform): it is only checked to be finite.
* "threads": one patched model, 4 threads calling it with 12 random batches in a shuffled order:
  every result bitwise equal to the serial one.
* "race": one thread patches and unpatches the model (random route) in a loop while 3 threads call
  it.  Never a silent wrong answer: every result a call returns is within the rule (each layer ran
  fused or eager, both correct).  A call in flight while the model is half swapped may raise
  (docs/design.md, "Hugging Face integration": swap between calls); the count is reported.  After
  the race the model is whole: unpatched it gives the eager result bitwise, patched the rule's.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fused_attn  # noqa: E402
from _hf import assert_close_to_oracle, oracle_of, tiny  # noqa: E402
from _utils import assert_tolerance  # noqa: E402
from fused_attn.integrations.hf import TRANSFORMERS_5  # noqa: E402

FAMILIES = ("bert", "roberta", "electra", "distilbert")
ROUTES = ("patch", "padding_free", "register") if TRANSFORMERS_5 else ("patch", "padding_free")
KINDS = ("batch",) * 8 + ("threads", "race")


def case_seed(run_seed: int, index: int) -> int:
    return (run_seed << 32) + index


def draw(seed: int) -> dict:
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4])
    case = dict(kind=KINDS[rng.randrange(len(KINDS))], family=rng.choice(FAMILIES), route=rng.choice(ROUTES),
                heads=heads, hidden=heads * rng.choice([16, 32]), B=rng.randint(1, 4), S=rng.randint(1, 16),
                dtype=rng.choice(["float32", "float32", "bfloat16"]), side=rng.choice(["right", "left", "holes"]))
    case["lengths"] = [rng.randint(0, case["S"]) for _ in range(case["B"])]
    if case["family"] == "distilbert" and case["route"] == "patch":
        case["route"] = "padding_free"            # patch alone finds no BertSelfAttention in DistilBERT
    if case["kind"] != "batch":
        case.update(family="bert", dtype="float32")
    return case


def describe(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def make_mask(rng: random.Random, lengths, S: int, side: str) -> torch.Tensor:
    rows = []
    for n in lengths:
        if side == "right":
            row = [1] * n + [0] * (S - n)
        elif side == "left":
            row = [0] * (S - n) + [1] * n
        else:
            keep = set(rng.sample(range(S), n))
            row = [int(i in keep) for i in range(S)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def make_batch(rng: random.Random, B: int, S: int, lengths, side: str, vocab: int = 97) -> dict:
    mask = make_mask(rng, lengths, S, side)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    ids = torch.randint(5, vocab, (B, S), generator=g)
    return dict(input_ids=ids * mask + (1 - mask), attention_mask=mask)    # padding id 1 where masked


def model_for(case: dict):
    hidden = case["hidden"]
    return tiny(case["family"], hidden_size=hidden, num_attention_heads=case["heads"], intermediate_size=2 * hidden)


def fuse(model, route: str):
    """``model`` (in place) through one route of the integration."""
    if route == "register":
        fused_attn.register()
        model.set_attn_implementation("fused_attn")
        return model
    return fused_attn.patch(model, padding_free=route == "padding_free")


def hidden_of(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).last_hidden_state


def compare(name: str, route: str, got, oracle, eager, mask, dtype) -> None:
    """docs/design.md's rule where the contract makes the fused model equal to eager (see module)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    seen = mask.bool().any(1)                                   # rows with a real token
    if route == "padding_free":
        real = mask.bool()
        pad = got[~real]
        assert torch.equal(pad, torch.zeros_like(pad)), f"{name}: padding is not exactly 0"
        sel = real
    else:
        sel = seen[:, None].expand_as(mask)
    if sel.any():
        assert_tolerance(name, got[sel].float(), oracle[sel], eager[sel].float(), dtype=dtype)


def check_batch(case: dict, seed: int) -> None:
    rng = random.Random(seed ^ 0x5EED)
    dtype = getattr(torch, case["dtype"])
    model = model_for(case)
    batch = make_batch(rng, case["B"], case["S"], case["lengths"], case["side"])
    oracle = hidden_of(oracle_of(model), batch)
    model = model.to(dtype)
    eager = hidden_of(model, batch)
    got = hidden_of(fuse(model, case["route"]), batch)
    compare(f"{case['family']}/{case['route']}", case["route"], got, oracle, eager, batch["attention_mask"], dtype)


def _batches(rng: random.Random, n: int):
    out = []
    for _ in range(n):
        B, S = rng.randint(1, 4), rng.randint(1, 16)
        lengths = [rng.randint(1, S) for _ in range(B)]
        out.append(make_batch(rng, B, S, lengths, rng.choice(["right", "left", "holes"])))
    return out


def check_threads(case: dict, seed: int, workers: int = 4, n: int = 12) -> None:
    rng = random.Random(seed ^ 0x7EAD)
    model = fuse(model_for(case), case["route"])
    batches = _batches(rng, n)
    serial = [hidden_of(model, b) for b in batches]
    order = [i for i in range(n) for _ in range(3)]
    rng.shuffle(order)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                                   # switch threads often: races show
    try:
        with ThreadPoolExecutor(workers) as pool:
            for i, got in zip(order, pool.map(lambda i: hidden_of(model, batches[i]), order)):
                assert torch.equal(got, serial[i]), f"batch {i}: a threaded result differs from the serial one"
    finally:
        sys.setswitchinterval(old)


def check_race(case: dict, seed: int, callers: int = 3, calls: int = 8) -> None:
    """Patch / unpatch (a random route each time) in a loop while `callers` threads call the model."""
    rng = random.Random(seed ^ 0xACE)
    model = model_for(case)
    batches = _batches(rng, calls)
    oracle = [hidden_of(oracle_of(model), b) for b in batches]
    eager = [hidden_of(model, b) for b in batches]
    routes = [rng.choice(ROUTES) for _ in range(64)]
    stop = threading.Event()
    errors = []

    def toggle():
        i = 0
        try:
            while not stop.is_set():
                route = routes[i % len(routes)]
                fuse(model, route)
                time.sleep(0.0005)
                fused_attn.unpatch(model)
                if route == "register":
                    model.set_attn_implementation("eager")
                i += 1
        except Exception:  # noqa: BLE001 - reported by the caller
            errors.append("patch/unpatch: " + traceback.format_exc(limit=4))

    raised = []

    def call(j):
        out = []
        for i in range(calls):
            k = (i + j) % calls
            try:
                got = hidden_of(model, batches[k])
            except Exception as e:  # noqa: BLE001 - a loud failure of a half-swapped model (documented)
                raised.append(f"{type(e).__name__}: {e}")
                continue
            out.append((k, got))
        return out

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        with warnings.catch_warnings():    # padding_free's fallback notes about half-swapped calls
            warnings.simplefilter("ignore")
            with ThreadPoolExecutor(callers) as pool:
                results = [r for rs in pool.map(call, range(callers)) for r in rs]
    finally:
        stop.set()
        toggler.join()
        sys.setswitchinterval(old)
        fused_attn.unpatch(model)
        if TRANSFORMERS_5:
            model.set_attn_implementation("eager")
    assert not errors, "\n".join(errors[:3])
    RACE_STATS["calls"] += len(results) + len(raised)
    RACE_STATS["raised"] += len(raised)
    for k, got in results:
        mask = batches[k]["attention_mask"]
        seen = mask.bool().any(1)[:, None].expand_as(mask)
        real = mask.bool()
        # a call that ran padding-free has zeros at padding; any other is eager-equal everywhere
        sel = real if torch.equal(got[~real], torch.zeros_like(got[~real])) else seen
        assert_close_to_oracle(f"race call {k}", got[sel], oracle[k][sel], eager[k][sel])
    for k in range(calls):                                       # the model is whole again
        assert torch.equal(hidden_of(model, batches[k]), eager[k]), f"unpatched after the race: batch {k}"
    route = rng.choice(ROUTES)
    fuse(model, route)
    for k in range(calls):
        mask = batches[k]["attention_mask"]
        sel = mask.bool() if route == "padding_free" else mask.bool().any(1)[:, None].expand_as(mask)
        assert_close_to_oracle(f"{route} after the race: batch {k}", hidden_of(model, batches[k])[sel],
                               oracle[k][sel], eager[k][sel])
    fused_attn.unpatch(model)
    if TRANSFORMERS_5:
        model.set_attn_implementation("eager")


RACE_STATS = {"calls": 0, "raised": 0}


CHECKS = {"batch": check_batch, "threads": check_threads, "race": check_race}


def run_case(seed: int) -> None:
    case = draw(seed)
    CHECKS[case["kind"]](case, seed)


def reproducer(seed: int) -> str:
    return f"{sys.executable} tests/fuzz_hf.py --case {seed}"


def fuzz(n: int, run_seed: int, first: int = 0, time_limit=None, log=print) -> dict:
    t0 = time.time()
    failures, done = [], 0
    for i in range(first, first + n):
        if time_limit and time.time() - t0 > time_limit:
            break
        seed = case_seed(run_seed, i)
        try:
            run_case(seed)
        except Exception as e:  # noqa: BLE001 - every exception is a failure, with its case
            text = str(e).strip()
            msg = f"case {i} ({describe(draw(seed))}): {type(e).__name__}: {text.splitlines()[0] if text else ''}"
            failures.append(msg + f"\n  reproduce: {reproducer(seed)}")
            log("FAIL " + failures[-1])
        done += 1
    return dict(cases=done, failures=failures, seconds=time.time() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=None, help="stop starting cases after this many s")
    ap.add_argument("--case", type=int, default=None, help="run one case (its full seed) and show the error")
    a = ap.parse_args(argv)
    if a.case is not None:
        print(describe(draw(a.case)))
        run_case(a.case)
        print("ok")
        return 0
    import transformers
    print(f"fuzz_hf: seed {a.seed}, up to {a.n} cases, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, routes {', '.join(ROUTES)}")
    s = fuzz(a.n, a.seed, a.first, a.time_limit)
    print(f"fuzz_hf: {s['cases']} cases, {len(s['failures'])} failures, {s['seconds']:.0f} s; race cases: "
          f"{RACE_STATS['raised']} of {RACE_STATS['calls']} calls raised while the model was half swapped")
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
