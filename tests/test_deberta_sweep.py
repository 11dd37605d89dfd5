"""benchmarks/deberta_sweep.py on a tiny DeBERTa config: one cell in its own process, methods interleaved,
HF left out above the memory limit (with its estimate), the time budget and --resume."""
import csv

import pytest

from benchmarks import deberta_sweep


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _args(out, *extra):
    return ["--configs", "tiny", "--seqlens", "16", "--phases", "train", "--tokens", "32", "--iters", "2",
            "--out", str(out), *extra]


def test_cell_runs_in_its_own_process_and_hf_is_left_out_above_the_limit(tmp_path):
    out = tmp_path / "sweep.csv"
    est = deberta_sweep.hf_estimate_mib("tiny", 2, 16, "train")
    assert est == pytest.approx(deberta_sweep.HF_BYTES["train"] * 2 * 2 * 16 * 16 * 1 / 2**20)
    deberta_sweep.main(_args(out, "--hf-limit-gib", str(est / 2 / 1024)))         # HF's estimate is over it
    rows = {r["method"]: r for r in _rows(out)}
    assert set(rows) == {"hf", "fused", "padding_free"}
    assert rows["hf"]["status"].startswith("not run (memory: est.") and rows["hf"]["ms"] == ""
    assert float(rows["hf"]["hf_est_mib"]) == round(est)
    for m in ("fused", "padding_free"):
        r = rows[m]
        assert r["status"] == "ok" and r["batch"] == "2" and r["tokens"] == "32", r
        assert len(r["ms_all"].split()) == 2 and float(r["ms"]) > 0 and float(r["step_peak_mib"]) >= 0
        assert r["speedup_vs_hf"] == ""                                              # no HF to compare with

    # --resume keeps the cell (no new process); a spent budget writes the rest as not run
    def no_process(*a, **k):
        raise AssertionError("a finished cell was run again")
    mp = pytest.MonkeyPatch()
    mp.setattr(deberta_sweep, "_cell_process", no_process)
    try:
        deberta_sweep.main(_args(out, "--resume", "--seqlens", "16,32", "--budget-min", "0"))
    finally:
        mp.undo()
    rows = _rows(out)
    assert [(r["seqlen"], r["status"][:16]) for r in rows if r["method"] == "fused"] == [
        ("16", "ok"), ("32", "not run (time bu")]
