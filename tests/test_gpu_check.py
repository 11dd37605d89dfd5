"""The one-device-call entry point (benchmarks/gpu_check.py) on CPU: plan, guards, time boxes,
partial results, summary; the offline Triton cache (benchmarks/triton_cache.py): packed, installed
elsewhere and hit; the gpu_smoke selection."""
import csv
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import gpu_check, gpu_summary, triton_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_the_plan_in_order(capsys):
    assert gpu_check.main(["--dry-run", "--out", "/nonexistent/out"]) == 0
    text = capsys.readouterr().out
    names = [s.name for s in gpu_check.STEPS if s.default]
    assert names[:2] == ["env", "kernels"] and names[-1] == "rest"
    positions = [text.index(f"  {n} ") for n in names]
    assert positions == sorted(positions)
    assert "  cuda-ext " not in text and "  hf-large " not in text    # not in the default plan
    assert "would skip: no CUDA device" in text        # this machine has no GPU
    assert "--out /nonexistent/out/kernels" in text    # commands are shown as they would run
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--dry-run", "--steps", "kernels,nope"])


def test_guards():
    assert gpu_check.guard("exe:bash") is None
    assert "not found" in gpu_check.guard("exe:no-such-program-here")
    assert gpu_check.guard("module:json") is None
    assert gpu_check.guard("api:attention:causal") is None
    assert "no no_such_kw=" in gpu_check.guard("api:attention:no_such_kw")
    assert "does not exist" in gpu_check.guard("attr:NoSuchThing")
    assert "unknown guard" in gpu_check.guard("bogus:x")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_steps_run_in_boxes_and_leave_results_after_each(tmp_path, monkeypatch):
    out, bundle = tmp_path / "out", tmp_path / "bundle"
    steps = [
        gpu_check.step("ok", 20, "echo hello; echo method,ms > {out}/a.csv", "writes a CSV", needs=()),
        # a child in the background: the whole process group goes at the box
        gpu_check.step("hog", 2, "sleep 60 & echo $! > {out}/child.pid; wait", "overruns its box", needs=()),
        gpu_check.step("bad", 20, "echo boom >&2; exit 3", "fails", needs=()),
        gpu_check.step("later", 20, "echo", "not yet possible", needs=("api:attention:no_such_kw",)),
        gpu_check.step("rest", None, "echo {out} > {out}/rest.txt", "the rest", needs=()),
    ]
    monkeypatch.setattr(gpu_check, "MIN_BOX", 1)
    t0 = time.monotonic()
    res = gpu_check.run_all(steps, str(out), budget=120, bundle=str(bundle), prebuilt=None, cache_log=False)
    elapsed = time.monotonic() - t0
    assert elapsed < 60                                # the hog was stopped at its box, not after 60 s
    status = {r["step"]: r["status"] for r in res}
    assert status == {"ok": "ok", "hog": "timeout (2 s)", "bad": "failed (exit 3)",
                      "later": "skipped: fused_attn.attention has no no_such_kw= yet", "rest": "ok"}
    assert not _alive(int((out / "child.pid").read_text()))
    assert (out / "a.csv").exists() and (out / "rest.txt").read_text().strip() == str(out)
    assert "boom" in (out / "logs" / "02_bad.log").read_text()
    rest = next(r for r in res if r["step"] == "rest")
    assert 120 - 5 - elapsed - 1 <= rest["box"] <= 120 - 5 - 2      # what the budget had left (after the hog's 2 s)
    with open(out / "steps.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["ok", "hog", "bad", "later", "rest"]
    summary = (bundle / "summary.md").read_text()
    assert "| hog | timeout (2 s) |" in summary and "## Targets" in summary
    with tarfile.open(bundle / "gpu_check.tar.gz") as tar:
        assert "gpu_check/a.csv" in tar.getnames() and "gpu_check/logs/00_ok.log" in tar.getnames()


def test_steps_are_skipped_when_the_budget_is_spent(tmp_path):
    steps = [gpu_check.step("ok", 20, "true", "", needs=())]
    res = gpu_check.run_all(steps, str(tmp_path), budget=gpu_check.MIN_BOX, prebuilt=None, cache_log=False)
    assert res[0]["status"].startswith("skipped:") and "budget left" in res[0]["status"]


def _write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_targets_from_partial_results(tmp_path):
    def row(method, mode, p, ms):
        return dict(method=method, mode=mode, dropout=p, ms=ms, status="ok")
    _write_csv(str(tmp_path / "kernels" / "train-target.csv"),
               [row("fused_triton", "fwd", 0.0, 1.0), row("sdpa_mask", "fwd", 0.0, 2.0),
                row("fused_triton", "fwd+bwd", 0.0, 3.0), row("sdpa_mask", "fwd+bwd", 0.0, 3.0),
                row("varlen_triton", "fwd", 0.0, 0.5)])
    _write_csv(str(tmp_path / "bench_hf.csv"), [dict(model="bert-base", phase="train", mode="padding_free",
                                                     speedup_vs_sdpa="2.0")])
    got = {r[0]: r[1:] for r in gpu_summary.targets(str(tmp_path), [])}
    assert got["fwd: Triton / SDPA+mask"][0] == "0.50x"
    assert got["fwd+bwd: Triton / SDPA+mask"] == ["1.00x", "<= 0.9x (was 1.14x)", "missed"]
    assert got["fwd: varlen / padded Triton"] == ["0.50x", "<= 0.7x", "MET"]
    assert got["fwd+bwd p=0.1: Triton / SDPA+mask"][0] == "-"          # not measured: no verdict
    assert got["BERT-base train: padding-free speed-up vs HF sdpa"] == ["2.00x", ">= 1.8x", "MET"]


def test_cache_pack_install_relocates_group_files(tmp_path):
    src = tmp_path / "built" / "ABC"
    src.mkdir(parents=True)
    for name in ("k.json", "k.cubin", "k.ptx"):
        (src / name).write_text(name)
    (src / "__grp__k.json").write_text(json.dumps({"child_paths": {n: str(src / n) for n in ("k.json", "k.cubin", "k.ptx")}}))
    (tmp_path / "built" / "LAUNCHER").mkdir()
    (tmp_path / "built" / "LAUNCHER" / "__triton_launcher.so").write_text("so")
    tarball = str(tmp_path / "c.tar.gz")
    stats = triton_cache.pack(str(tmp_path / "built"), tarball, {"keys": {"triton": "x"}})
    assert stats["entries"] == 1 and stats["files"] == 3              # json, cubin, group; not the ptx, not the .so
    manifest = triton_cache.install(tarball, str(tmp_path / "there"))
    assert manifest["keys"] == {"triton": "x"} and manifest["installed_groups"] == 1
    grp = json.loads((tmp_path / "there" / "ABC" / "__grp__k.json").read_text())
    assert grp["child_paths"] == {n: str(tmp_path / "there" / "ABC" / n) for n in ("k.json", "k.cubin")}
    assert triton_cache.compare(manifest, {"triton": "y"})["triton"] == "built x, here y"


def test_offline_cache_is_hit_after_install_elsewhere(tmp_path):
    """Built with the stand-in sm_90 driver, packed (json + cubin), installed in another directory:
    a fresh process making the same call compiles nothing (the logging cache manager says so)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = ROOT
    tarball = str(tmp_path / "c.tar.gz")
    subprocess.run([sys.executable, "-m", "benchmarks.triton_cache", "build", "--workload", "tiny",
                    "--libtriton-sha256", "", "--out", tarball], env=env, check=True, cwd=ROOT, timeout=600,
                   capture_output=True)
    cache = str(tmp_path / "elsewhere")
    assert triton_cache.install(tarball, cache)["installed_groups"] >= 1
    log = str(tmp_path / "lookups.log")
    env.update(TRITON_CACHE_DIR=cache, TRITON_CACHE_MANAGER=gpu_check.CACHE_LOG_CLASS,
               FUSED_ATTN_TRITON_CACHE_LOG=log)
    subprocess.run([sys.executable, "-m", "benchmarks.triton_cache", "replay", "--workload", "tiny",
                    "--libtriton-sha256", ""], env=env, check=True, cwd=ROOT, timeout=600, capture_output=True)
    from benchmarks.triton_cache_log import count
    got = count(log)
    assert got["hit"] >= 1 and got["miss"] == 0, got


def test_gpu_smoke_patterns_each_select_a_test():
    """Every GPU_SMOKE pattern names existing tests (a renamed test would silently leave the smoke set)."""
    import conftest
    files = sorted({"tests/" + p.split("::")[0] for p in conftest.GPU_SMOKE})
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "-m", "gpu_smoke",
                        *files], cwd=ROOT, capture_output=True, text=True, timeout=600)
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    matched = conftest.gpu_smoke_patterns_matched(ids)
    assert all(matched.values()), {p: n for p, n in matched.items() if not n}
    assert 20 <= len(ids) <= 60


def test_case_selection_of_the_kernels_step(capsys):
    from benchmarks.cli import main
    from benchmarks.presets import PRESETS, select
    cases = gpu_check.kernel_cases()
    assert [(c.mode, c.dropout) for c in cases] == [("fwd", 0.0), ("fwd", 0.1), ("fwd+bwd", 0.0), ("fwd+bwd", 0.1)]
    assert all((c.B, c.H, c.S, c.D, c.dtype, c.fill) == (32, 12, 512, 64, "fp16", "uniform") for c in cases)
    tiny = PRESETS["tiny"].cases
    assert [c.S for c in select(tiny, "S=16,causal=false")] == [16, 16]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        select(tiny, "bogus=1")
    with pytest.raises(SystemExit, match="no case"):
        main(["--preset", "tiny", "--cases", "S=999", "--out", "/tmp/unused-bench-out", "--no-plot", "--quiet"])


def test_shell_entry_points_parse():
    assert subprocess.run(["bash", "-n", "benchmarks/run_gpu.sh"], cwd=ROOT).returncode == 0
    r = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x", "BUNDLE=/tmp/y"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "-m benchmarks.gpu_check --out /tmp/x --budget 540 --bundle /tmp/y" in r.stdout


def test_feature_bench_harness_with_a_stand_in_window(tmp_path, monkeypatch):
    """feature_bench's timing, check and CSV on CPU, fused_attn.attention replaced by the reference with
    the band mask (the real window_size= comes from another branch; the local step runs it on a GPU)."""
    import torch

    import fused_attn
    from benchmarks import feature_bench

    def banded(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None, head_mask=None, backend="auto",
               window_size=(-1, -1)):
        i = torch.arange(q.shape[2])
        band = (i[None, :] >= i[:, None] - window_size[0]) & (i[None, :] <= i[:, None] + window_size[1])
        vis = band[None, None] & mask[:, None, None, :]
        return fused_attn.reference.attention(q.float(), k.float(), v.float(), vis).to(q.dtype)

    monkeypatch.setattr(fused_attn, "attention", banded)
    out = str(tmp_path / "local.csv")
    assert feature_bench.run("window", out, torch.device("cpu"), small=True) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["mode"], r["method"]) for r in rows] == [("fwd", "sdpa"), ("fwd", "fused_triton"),
                                                        ("fwd+bwd", "sdpa"), ("fwd+bwd", "fused_triton")]
    assert all(r["check"] == "PASS" and float(r["ms"]) > 0 for r in rows)
    got = {r[0]: r[1] for r in gpu_summary.targets(str(tmp_path), [])}
    assert "window_size S=40 fwd: SDPA / Triton (PASS)" in got


def test_summary_renders_again_from_the_files(tmp_path, capsys):
    steps = [gpu_check.step("ok", 20, "true", "", needs=()), gpu_check.step("never", 20, "true", "", needs=("bogus",))]
    gpu_check.run_all(steps, str(tmp_path), budget=60, prebuilt=None, cache_log=False)
    capsys.readouterr()
    assert gpu_summary._main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| ok | ok |" in text and "| never | skipped: unknown guard 'bogus' |" in text


def test_deberta_step_measures_the_gpu_targets():
    """The deberta step runs exactly the two GPU targets: the rel_bias forward at S=4096 (H=12, fp16 autocast)
    against HF's attention math, and the deberta-v3-base B=32 S=512 training step against HF eager."""
    import shlex

    from benchmarks import bench_deberta, deberta_kernel
    cmd = next(s for s in gpu_check.STEPS if s.name == "deberta").cmd
    kernel, train = (shlex.split(part) for part in cmd.split("&&"))
    assert kernel[:3] == ["{py}", "-m", "benchmarks.deberta_kernel"] and train[:3] == ["{py}", "-m", "benchmarks.bench_deberta"]
    k = deberta_kernel.parser().parse_args(kernel[3:])
    assert (k.device, k.dtype, k.seq, k.heads, k.head_dim, k.modes, k.backend) == (
        "cuda", "fp16", [4096], 12, 64, "inference", "triton")
    assert k.out.endswith("/deberta_kernel.csv") and k.tokens // 4096 >= 1
    t = bench_deberta.parser().parse_args(train[3:])
    assert (t.device, t.configs, t.seqlens, t.batch, t.phases, t.backend, t.lengths) == (
        "cuda", "base", "512", 32, "train", "triton", "stratified")
    assert set(t.methods.split(",")) == {"hf", "fused", "padding_free"} and t.out.endswith("/deberta_train.csv")
    assert bench_deberta.CONFIGS["base"] == dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                                                 intermediate_size=3072)


def test_summary_reports_the_deberta_targets(tmp_path):
    _write_csv(str(tmp_path / "deberta_kernel.csv"), [dict(S=4096, B=8, H=12, mode="inference", speedup="5.5")])
    rows = [dict(model="deberta-v3-base", phase="train", method=m, speedup_vs_hf=x)
            for m, x in (("hf", "1.0"), ("fused", "1.6"), ("padding_free", "1.9"))]
    _write_csv(str(tmp_path / "deberta_train.csv"), rows)
    got = {r[0]: r[1:] for r in gpu_summary.targets(str(tmp_path), [])}
    assert got["DeBERTa attention fwd S=4096 B=8 H=12: HF math / fused"] == ["5.50x", ">= 5x", "MET"]
    assert got["DeBERTa-v3-base B=32 S=512 train step: padding-free speed-up vs HF eager"] == ["1.90x", ">= 2x", "missed"]
    assert got["DeBERTa-v3-base B=32 S=512 train step: patched (padded) speed-up vs HF eager"][0] == "1.60x"
    empty = {r[0]: r[1:] for r in gpu_summary.targets(str(tmp_path / "none"), [])}
    assert empty["DeBERTa-v3-base B=32 S=512 train step: padding-free speed-up vs HF eager"][2] == "-"


def test_prebuilt_cache_covers_every_default_step_that_launches_triton():
    """Each default gpu_check step is either covered by a workload of the cache build or listed as not
    covered, with why: a new step must be placed in one of the two."""
    from benchmarks import triton_cache_steps as tcs
    default = {s.name for s in gpu_check.STEPS if s.default}
    assert set(tcs.COVERS) | set(tcs.NOT_COVERED) == default and not set(tcs.COVERS) & set(tcs.NOT_COVERED)
    assert set(tcs.COVERS.values()) == set(tcs.STEPS) == set(tcs.WORKLOADS)
    with pytest.raises(SystemExit, match="unknown"):
        triton_cache._workload("kernels,nope")


def test_cache_build_takes_its_shapes_from_the_step_commands(monkeypatch):
    """The build's calls for the local, deberta and hf steps are read off those steps' command lines
    (parsed by the step scripts' own parsers): a change of a step's shapes changes what is compiled."""
    from benchmarks import triton_cache_steps as tcs
    assert tcs.local_plan() == [(32, 12, 512, 64, 64), (8, 12, 2048, 64, 64)]
    d = tcs.deberta_plan()
    assert (d["kernel"].seq, d["kernel"].tokens, d["kernel"].heads, d["kernel"].dtype) == ([4096], 32768, 12, "fp16")
    assert (d["train"].configs, d["train"].batch, d["train"].seqlens, d["train"].phases) == ("base", 32, "512", "train")
    modes, phases = ("fused_attn", "padding_free"), ("train", "infer")
    assert sorted(tcs.hf_plan()) == sorted(("bert-base", 32, 512, m, p, "stratified") for m in modes for p in phases)
    hf = next(s for s in gpu_check.STEPS if s.name == "hf")
    monkeypatch.setattr(hf, "cmd", hf.cmd.replace("--seqlens 512", "--seqlens 256 --batch 8 --phases infer"))
    assert {(B, S, p) for _, B, S, _, p, _ in tcs.hf_plan()} == {(8, 256, "infer")}


def test_fake_gemms_give_the_result_shape_and_dtype():
    import torch
    import torch.nn.functional as F

    from benchmarks.triton_cache_steps import fake_gemms
    x = torch.randn(3, 5, 8, requires_grad=True)
    w, b = torch.randn(4, 8, requires_grad=True), torch.randn(4)
    a, m = torch.randn(2, 3, 5, 8), torch.randn(3, 8, 6)
    with torch.autocast("cpu", dtype=torch.float16), fake_gemms():
        y = F.linear(x, w, b)
        z = torch.matmul(a, m)
        assert torch.nn.Linear(8, 2)(x).shape == (3, 5, 2)
    assert (y.shape, y.dtype, z.shape, z.dtype) == ((3, 5, 4), torch.float16, (2, 3, 5, 6), torch.float16)
    assert not y.any()
    y.float().sum().backward()
    assert (x.grad.shape, x.grad.dtype, w.grad.shape) == (x.shape, torch.float32, w.shape)
    with fake_gemms():
        assert torch.matmul(a, m).dtype == torch.float32                  # no autocast: the inputs' type
    assert torch.matmul(a, m).abs().sum() > 0 and F.linear(x, w, b).abs().sum() > 0    # the real ones again


def test_model_step_shortcuts_launch_the_variants_of_the_real_models():
    """The cache build runs the BERT / DeBERTa steps with 2 layers and fake GEMMs; on tiny models, the
    kernel variants Triton would compile (its jit_cache_hook, nothing compiled, stand-in sm_90 driver)
    are the same as with 3 layers and the real GEMMs under fp16 autocast."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-m", "benchmarks.triton_cache_steps", "shortcut-check"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for model in ("bert", "deberta"):
        real, cheap = got[model]["real"], got[model]["cheap"]
        names = {v.split()[0] for v in real}
        assert {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"} <= names, names
        assert all("*fp16" in v for v in real)
        assert cheap == real, (model, sorted(set(real) ^ set(cheap))[:4])


def test_each_step_log_says_what_it_added_to_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "OLD").mkdir(parents=True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    steps = [gpu_check.step("two", 20, "mkdir $TRITON_CACHE_DIR/A $TRITON_CACHE_DIR/B", "", needs=()),
             gpu_check.step("none", 20, "true", "", needs=())]
    res = gpu_check.run_all(steps, str(tmp_path / "out"), budget=60, prebuilt=None, cache_log=False)
    assert [r["new_cache_dirs"] for r in res] == [2, 0]
    logs = tmp_path / "out" / "logs"
    assert f"# triton cache: 2 new entries (kernels, launchers) in {cache}" in (logs / "00_two.log").read_text()
    assert "# triton cache: 0 new entries" in (logs / "01_none.log").read_text()
