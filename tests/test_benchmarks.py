"""The benchmark scripts run (on the CPU, tiny settings) and their tables say
what the kernels compute is right: a benchmark that silently timed a wrong
result would be worse than none.  Speed itself is never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(script, *args, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_msconv_table_on_cpu(tmp_path):
    data, table = bench("bench_msconv.py", "--layers", "L1", "L3", "--batches", "1", "--repeat", "2",
                        "--width", "0.25", tmp_path=tmp_path)
    rows = data["rows"]
    assert [r["layer"] for r in rows] == ["L1", "L3"]
    for r in rows:
        assert r["rel_err_vs_eager"] < 1e-4, r  # Winograd rounding is ~1e-5 of the output
        assert r["fused_us"] > 0  # the ratio is of the unrounded times: equal to 3 decimals, +- rounding
        assert abs(r["speedup_vs_eager"] - r["eager_us"] / r["fused_us"]) < 1e-3 * r["speedup_vs_eager"] + 1e-3
    assert table.splitlines()[-1].startswith("x<m> = ")


def test_bench_model_table_on_cpu(tmp_path):
    data, table = bench("bench_model.py", "--width", "0.125", "--batches", "1", "2", "--repeat", "2",
                        "--skip", "merged+compile", tmp_path=tmp_path)
    rows = data["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(n, v) for n in (1, 2) for v in ("train", "merged", "kernel")]
    for r in rows:
        assert r["ms"] > 0 and r["note"] == "", r
        # train form, merged and merged + fused kernel compute the same logits
        assert r["rel_err_vs_fp32_merged"] < 1e-5, r
    assert "x compile" in table
