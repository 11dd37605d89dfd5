"""The benchmark CLI and the demo run end to end on CPU and write well-formed results."""
import contextlib
import csv
import io
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import report
from benchmarks.cli import main
from benchmarks.presets import PRESETS, Case
from benchmarks.workloads import make_inputs, max_error, oracle, tolerance, visible_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)     # as `make demo` runs: conftest's interpreter switch is for the tests
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m benchmarks --preset tiny ...` in-process (saves a torch import): (exit code, stdout, dir)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = main(["--preset", "tiny", "--device", "cpu", "--out", str(out), "--quiet", "--min-time", "0.01",
                         "--threads", "1", "--modes", "fwd,bwd,fwd+bwd"])
    finally:
        torch.set_num_threads(threads)
    return code, buf.getvalue(), out


def test_cli_writes_wellformed_csv(tiny_run):
    code, stdout, out = tiny_run
    assert code == 0, stdout
    with open(out / "tiny.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.COLUMNS
        rows = list(reader)
    n_cases = len({c.data_key() for c in PRESETS["tiny"].cases}) * 3
    assert len({(r["S"], r["mode"]) for r in rows}) == n_cases
    methods = {r["method"] for r in rows}
    assert {"eager", "sdpa_mask", "sdpa_nomask", "reference"} <= methods
    for r in rows:
        where = f"{r['method']} {r['mode']} S={r['S']} fill={r['fill']}"
        assert r["status"] == "ok", f"{where}: {r['status']}"
        for col in ("ms", "ms_q20", "ms_q80", "tflops", "speedup_vs_eager"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, f"{where}: {col}={r[col]!r}"
        assert float(r["ms_q20"]) <= float(r["ms"]) <= float(r["ms_q80"]), where
        assert r["check"] == ("n/a" if r["method"] == "sdpa_nomask" else "PASS"), where
        assert r["device_name"] and r["torch"] == torch.__version__ and r["date"], where
    # the summary table went to the terminal
    assert "eager ms" in stdout and "wrote" in stdout


def test_cli_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, out = tiny_run
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert len(pngs) == 3, pngs              # one panel x 3 modes
    for p in pngs:
        with open(out / p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
    # redraw from the CSV alone
    assert main(["--plot", str(out / "tiny.csv"), "--out", str(tmp_path)]) == 0
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".png")) == pngs


def test_cli_refuses_gpu_preset_on_cpu(tmp_path, capsys):
    assert main(["--preset", "long", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "GPU sizes" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_demo_exits_zero():
    proc = _run(["-m", "benchmarks.demo", "--device", "cpu", "--min-time", "0.02", "--repeats", "2", "--threads", "1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "backend 'auto' ->" in proc.stdout and "vs sdpa_mask" in proc.stdout
    # the timing says how often it repeated, its spread, and the machine's load
    assert "2 rounds" in proc.stdout and "min-max" in proc.stdout and "load average" in proc.stdout


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fill", ["uniform", "0.25", "full"])
def test_useful_pairs_match_the_dense_mask(fill, causal):
    case = Case("p", "S", 5, 3, 37, 16, dtype="fp32", fill=fill, causal=causal)
    inp = make_inputs(case, torch.device("cpu"))
    dense = inp.sdpa_mask.expand(case.B, case.H, case.S, case.S)
    assert inp.pairs == int(dense.sum()) == visible_pairs(inp.lengths, case.S, case.H, causal)
    assert bool((inp.lengths >= 1).all() and (inp.lengths <= case.S).all())
    assert not torch.equal(inp.q, torch.zeros_like(inp.q))


def test_check_flags_a_wrong_result():
    inp = make_inputs(Case("p", "S", 2, 2, 40, 16, dtype="fp32"), torch.device("cpu"))
    ref = oracle(inp)
    tol = tolerance(inp, ref)
    assert max_error(ref, ref) <= tol
    assert max_error(ref + 10 * tol, ref) > tol
    assert math.isnan(max_error(ref.masked_fill(ref > 0, float("nan")), ref))


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    """Redirected to a file or CI log, progress is one plain line per measurement, not a tqdm bar."""
    pytest.importorskip("tqdm")
    from benchmarks.cli import _Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    p = _Progress(2, "tiny", quiet=False)
    assert p.bar is None
    p.step("case 1")
    p.close()
    assert sys.stderr.getvalue() == "[1/2] case 1\n"
    monkeypatch.setattr(sys, "stderr", Tty())
    p = _Progress(2, "tiny", quiet=False)
    assert p.bar is not None
    p.close()


@pytest.mark.parametrize("B,S", [(8, 128), (8, 512), (5, 7), (16, 3)])
def test_bench_hf_stratified_lengths(B, S):
    """bench_hf's default length draw: the B quantile midpoints of U[1, S] (about half the tokens
    real), shuffled; "random" stays a seeded draw from U[1, S]."""
    from benchmarks.bench_hf import draw_lengths

    got = draw_lengths(B, S, "stratified", torch.Generator().manual_seed(S))
    want = [math.ceil((i + 0.5) * S / B) for i in range(B)]
    assert sorted(got.tolist()) == want
    assert abs(got.sum().item() / (B * S) - (S + 1) / (2 * S)) <= 0.5 / S + 1 / B     # U[1, S]'s mean share
    rnd = draw_lengths(B, S, "random", torch.Generator().manual_seed(S))
    assert rnd.tolist() == torch.randint(1, S + 1, (B,), generator=torch.Generator().manual_seed(S)).tolist()
    with pytest.raises(ValueError, match="stratified"):
        draw_lengths(B, S, "uniform", torch.Generator())


def test_bench_embed_writes_its_conditions(tmp_path):
    """benchmarks/bench_embed.py (smallest sizes, random-init MiniLM shape, no ONNX): every row says
    its spread, load, CPU flags and versions; bf16 autocast is compared with fp32 sdpa by cosine."""
    pytest.importorskip("transformers")
    out = tmp_path / "embed.csv"
    proc = _run(["benchmarks/bench_embed.py", "--parts", "batch,kernel", "--random-init", "tiny", "--batch", "2",
                 "--max-len", "8", "--repeats", "1", "--threads", "1", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert {r["method"] for r in rows} >= {"sdpa fp32", "padding-free fp32", "padding-free bf16 autocast",
                                           "kernel fp32", "kernel bf16"}
    for r in rows:
        assert r["cpu"] and r["avx512_bf16"] in ("yes", "no") and r["amx_bf16"] in ("yes", "no") and r["load_avg"]
        assert float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
    cos = {r["method"]: float(r["cosine_min_vs_sdpa_fp32"]) for r in rows if r["part"] == "batch"}
    assert cos["padding-free fp32"] > 0.99999 and 0.99 < cos["padding-free bf16 autocast"] <= 1.0 + 1e-6, cos
