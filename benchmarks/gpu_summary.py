"""The summary of a benchmarks/gpu_check.py run: steps, the issue's targets against what was
measured, Triton cache hits.  Reads only what the steps wrote under OUT, so it works on a partial
run (missing numbers show as '-') and again later: ``python -m benchmarks.gpu_summary OUT``.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional


def _rows(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ms(rows: List[Dict], method: str, mode: str, dropout: float) -> Optional[float]:
    for r in rows:
        if (r.get("method") == method and r.get("mode") == mode and r.get("status") == "ok"
                and float(r.get("dropout") or 0) == dropout and r.get("ms")):
            return float(r["ms"])
    return None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _host_us(out: str, results: List[Dict]) -> Optional[float]:
    """The forward's host time per call with direct launches, from the host step's log."""
    for r in results:
        if r.get("step") == "host" and r.get("log"):
            try:
                with open(os.path.join(out, r["log"])) as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) >= 2 and parts[0] == "fwd":
                            return float(parts[1])
            except (OSError, ValueError):
                return None
    return None


def _hf(out: str) -> Dict:
    """{(phase, mode): speedup vs sdpa} for BERT-base at S=512."""
    got = {}
    for r in _rows(os.path.join(out, "bench_hf.csv")):
        if r.get("model") == "bert-base" and r.get("speedup_vs_sdpa"):
            got[(r["phase"], r["mode"])] = float(r["speedup_vs_sdpa"])
    return got


def _deberta_train(out: str, method: str) -> Optional[float]:
    """The training step's speed-up vs HF eager of deberta-v3-base (bench_deberta's CSV)."""
    for r in _rows(os.path.join(out, "deberta_train.csv")):
        if (r.get("model") == "deberta-v3-base" and r.get("phase") == "train" and r.get("method") == method
                and r.get("speedup_vs_hf")):
            return float(r["speedup_vs_hf"])
    return None


def targets(out: str, results: List[Dict]) -> List[List[str]]:
    """[what, measured, goal, verdict] for each target of the issue (ratios in one run)."""
    k = _rows(os.path.join(out, "kernels", "train-target.csv"))
    fx = _rows(os.path.join(out, "flex", "train-target.csv"))
    cu = _rows(os.path.join(out, "cuda", "train-target.csv"))
    hf = _hf(out)
    rows = []

    def add(what, value, goal, ok, fmt="{:.2f}x"):
        rows.append([what, "-" if value is None else fmt.format(value), goal,
                     "-" if value is None else ("MET" if ok(value) else "missed")])

    add("fwd: Triton / SDPA+mask", _ratio(_ms(k, "fused_triton", "fwd", 0), _ms(k, "sdpa_mask", "fwd", 0)),
        "(was 0.57x)", lambda v: True)
    add("fwd+bwd: Triton / SDPA+mask", _ratio(_ms(k, "fused_triton", "fwd+bwd", 0), _ms(k, "sdpa_mask", "fwd+bwd", 0)),
        "<= 0.9x (was 1.14x)", lambda v: v <= 0.9)
    add("fwd+bwd p=0.1: Triton / SDPA+mask", _ratio(_ms(k, "fused_triton", "fwd+bwd", 0.1),
                                                     _ms(k, "sdpa_mask", "fwd+bwd", 0.1)),
        "<= 1.0x (was 1.9x)", lambda v: v <= 1.0)
    for mode in ("fwd", "fwd+bwd"):
        add(f"{mode}: varlen / padded Triton", _ratio(_ms(k, "varlen_triton", mode, 0), _ms(k, "fused_triton", mode, 0)),
            "<= 0.7x", lambda v: v <= 0.7)
    for mode in ("fwd", "fwd+bwd"):
        add(f"{mode}: varlen / Flex document mask", _ratio(_ms(fx, "varlen_triton", mode, 0), _ms(fx, "flex_doc", mode, 0)),
            "< 1x", lambda v: v < 1.0)
    for phase in ("train", "infer"):
        add(f"BERT-base {phase}: padding-free speed-up vs HF sdpa", hf.get((phase, "padding_free")), ">= 1.8x",
            lambda v: v >= 1.8)
        add(f"BERT-base {phase}: patched (padded) speed-up vs HF sdpa", hf.get((phase, "fused_attn")), "(info)",
            lambda v: True)
    for r in _rows(os.path.join(out, "deberta_kernel.csv")):
        if r.get("mode") == "inference" and r.get("speedup"):
            add(f"DeBERTa attention fwd S={r['S']} B={r['B']} H={r['H']}: HF math / fused", float(r["speedup"]),
                ">= 5x" if r["S"] == "4096" else "(info)", (lambda v: v >= 5) if r["S"] == "4096" else (lambda v: True))
    for method, goal in (("padding_free", ">= 2x"), ("fused", "(info)")):
        add(f"DeBERTa-v3-base B=32 S=512 train step: {'padding-free' if goal != '(info)' else 'patched (padded)'} "
            "speed-up vs HF eager", _deberta_train(out, method), goal, (lambda v: v >= 2) if goal != "(info)" else
            (lambda v: True))
    for feature, csv_name in (("window_size", "local.csv"), ("rel_bias", "deberta_sdpa.csv")):
        for r in _rows(os.path.join(out, csv_name)):
            if r.get("method") == "fused_triton" and r.get("speedup_vs_sdpa"):
                add(f"{feature} S={r['S']} {r['mode']}: SDPA / Triton ({r.get('check', '')})",
                    float(r["speedup_vs_sdpa"]), "(info: > 1 is faster)", lambda v: True)
    add("host cost of a forward call (direct launch)", _host_us(out, results), "<= 25 µs", lambda v: v <= 25,
        fmt="{:.1f} µs")
    add("CUDA fallback / Triton, fwd", _ratio(_ms(cu, "fused_cuda", "fwd", 0), _ms(cu, "fused_triton", "fwd", 0)),
        "<= 2x", lambda v: v <= 2.0)
    return rows


def _pytest(out: str, name: str) -> Optional[str]:
    path = os.path.join(out, f"{name}.xml")
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {a: sum(int(s.get(a, 0)) for s in suites) for a in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def cache_note(res: Dict) -> str:
    if "triton_miss" not in res or res.get("status", "").startswith("skipped"):
        return ""
    return (f"triton: {res['triton_miss']} compiled / {res['triton_hit']} from disk (fused_attn), "
            f"{res['triton_other_miss']} / {res['triton_other_hit']} (Inductor), launchers {res['triton_so_miss']} built")


def cache_log_ok(out: str) -> bool:
    try:
        with open(os.path.join(out, "env.json")) as f:
            return json.load(f).get("cache_log_ok", True) is not False
    except (OSError, ValueError):
        return True


def log_tail(path: str, lines: int = 20, chars: int = 2500) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = "".join(f.readlines()[-lines:])[-chars:]
    except OSError:
        return ""
    return "    | " + tail.rstrip("\n").replace("\n", "\n    | ")


def _table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(out: str, results: List[Dict], meta: Dict) -> str:
    env: Dict = {}
    if os.path.exists(os.path.join(out, "env.json")):
        with open(os.path.join(out, "env.json")) as f:
            env = json.load(f)
    head = [f"# gpu_check {meta.get('started', '')}" + (" (interrupted)" if meta.get("interrupted") else ""),
            "",
            f"device: {env.get('device') or env.get('nvidia_smi') or '-'}; nvidia-smi: {env.get('nvidia_smi') or '-'}",
            f"torch {env.get('torch', '-')} (CUDA {env.get('cuda', '-')}), triton {env.get('triton', '-')}, "
            f"transformers {env.get('transformers', '-')}, python {env.get('python', '-')}, "
            f"fused_attn {env.get('fused_attn', '-')} at {env.get('commit') or '-'}; date {env.get('date', '-')}",
            f"elapsed {meta.get('elapsed', '-')} s of a {meta.get('budget', '-')} s budget", ""]
    steps = []
    for r in results:
        note = cache_note(r)
        tests = _pytest(out, r["step"]) if r["step"] in ("smoke", "rest") else None
        steps.append([r["step"], r["status"], f"{r['seconds']:.0f} / {r['box']}",
                      "; ".join(x for x in (tests, note) if x)])
    parts = head + ["## Steps", "", _table(["step", "status", "s / box", "result; Triton cache"], steps), "",
                    "## Targets (H100, fp16, B=32 H=12 S=512 D=64, lengths U[1,S]; ratios measured in this run)", "",
                    _table(["what", "measured", "goal", ""], targets(out, results)), ""]
    cache = meta.get("cache", {})
    line = f"dir {cache.get('cache_dir', '-')}; prebuilt: {cache.get('prebuilt') or 'none'}"
    if cache.get("manifest"):
        line += f" ({cache['manifest'].get('installed_groups')} kernels, built {cache['manifest'].get('built')})"
    if cache.get("prebuilt_error"):
        line += f"; error: {cache['prebuilt_error']}"
    parts += ["## Triton cache", "", line]
    if "prebuilt_mismatch" in env:
        mm = env["prebuilt_mismatch"]
        parts.append("key components: " + ("all match the prebuilt manifest (hits expected)" if not mm else
                                           "DIFFER from the prebuilt manifest: "
                                           + "; ".join(f"{k}: {v}" for k, v in mm.items())))
    keys = env.get("triton_keys", {})
    if keys:
        shown = ("triton", "python", "libtriton_sha256", "triton_key_sha256", "ptxas", "options_hash")
        parts.append("this machine: " + ", ".join(
            f"{k} {str(keys[k])[:16] if 'sha' in k or 'hash' in k else keys[k]}" for k in shown if k in keys))
    if cache.get("log"):
        parts.append(cache["log"])
    hits = sum(int(r.get("triton_hit") or 0) for r in results)
    misses = sum(int(r.get("triton_miss") or 0) for r in results)
    parts += [f"fused_attn kernels over all steps: {misses} compiled here, {hits} found on disk", ""]
    return "\n".join(parts)


def _main(argv=None) -> int:
    out = (argv or sys.argv[1:])[0]
    with open(os.path.join(out, "steps.csv"), newline="") as f:
        results = [dict(r, seconds=float(r["seconds"] or 0)) for r in csv.DictReader(f)]
    print(render(out, results, {}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
