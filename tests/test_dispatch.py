"""The kernel dispatch table: its buckets, its parsing, the override, the
package's own table, and how a GPU benchmark becomes rows."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fer_edge import dispatch as D

REPO = Path(__file__).resolve().parents[1]


def load_make_dispatch():
    spec = importlib.util.spec_from_file_location("make_dispatch", REPO / "benchmarks" / "make_dispatch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(**kw):
    base = {"cc": "9.0", "cin": 64, "c1": 32, "c3": 48, "c5": 48, "h": 24, "w": 24, "dtype": "fp16",
            "batch": "1", "choice": "splitk"}
    return {**base, **kw}


@pytest.mark.parametrize("n,bucket", [(1, "1"), (2, "2-8"), (8, "2-8"), (9, "9-64"), (64, "9-64"), (65, "65-256"),
                                      (256, "65-256"), (257, ">256"), (4096, ">256")])
def test_batch_buckets(n, bucket):
    assert D.batch_bucket(n) == bucket


def test_batch_bucket_refuses_empty_batches():
    with pytest.raises(ValueError):
        D.batch_bucket(0)


def test_the_shipped_table_parses_and_runs_cudnn_where_it_has_no_row():
    table = D.load_table()
    assert all(choice in D.CHOICES for choice in table.values())
    unmeasured = D.LayerKey("1.0", 3, 1, 1, 1, 7, 7, "fp32", "1")
    assert D.choose(unmeasured, table) == D.CUDNN


def test_choose_prefers_the_override_then_the_row_then_cudnn():
    table = D.parse_table({"format": D.TABLE_FORMAT, "entries": [row()]})
    key = D.key_of(row())
    assert D.choose(key, table) == "splitk"
    assert D.choose(key, table, forced="cudnn") == "cudnn"
    assert D.choose(D.key_of(row(batch="65-256")), table) == "cudnn"   # another bucket: not measured
    assert D.choose(D.key_of(row(cc="8.7")), table) == "cudnn"         # another GPU: not measured


@pytest.mark.parametrize("doc,match", [
    ({"format": "other", "entries": []}, "not a kernel dispatch table"),
    ({"format": D.TABLE_FORMAT, "entries": {}}, "must be a list"),
    ({"format": D.TABLE_FORMAT, "entries": [row(choice="fastest")]}, "choice must be one of"),
    ({"format": D.TABLE_FORMAT, "entries": [row(cin="many")]}, "malformed"),
    ({"format": D.TABLE_FORMAT, "entries": [row(dtype="bf16")]}, "dtype must be one of"),
    ({"format": D.TABLE_FORMAT, "entries": [{"choice": "simt"}]}, "malformed"),
])
def test_malformed_tables_are_refused(doc, match):
    with pytest.raises(D.DispatchError, match=match):
        D.parse_table(doc)


def test_override_is_read_once_and_checked(monkeypatch):
    try:
        monkeypatch.setenv(D.OVERRIDE_ENV, " SplitK ")
        D.override.cache_clear()
        assert D.override() == "splitk"
        monkeypatch.setenv(D.OVERRIDE_ENV, "wmma")
        assert D.override() == "splitk", "read once per process"
        D.override.cache_clear()
        monkeypatch.setenv(D.OVERRIDE_ENV, "fastest")
        with pytest.raises(D.DispatchError, match="choose one of"):
            D.override()
    finally:
        monkeypatch.delenv(D.OVERRIDE_ENV, raising=False)
        D.override.cache_clear()


def bench_row(**kw):
    base = {"layer": "L2", "batch": 1, "dtype": "fp16", "device": "cuda", "channels": [64, 32, 48, 48], "hw": 24,
            "cc": "9.0", "eager_us": 60.0, "pad5_us": 50.0, "graph_us": 40.0,
            "fused_simt_us": 80.0, "fused_splitk_us": 8.0, "fused_wmma_us": 30.0,
            "fused_simt_err": 1e-4, "fused_splitk_err": 2e-4, "fused_wmma_err": 3e-4}
    return {**base, **kw}


def test_benchmark_rows_become_table_rows():
    md = load_make_dispatch()
    r = md.choose_row(bench_row(), margin=1.05)
    assert (r["choice"], r["speedup"], r["batch"], r["cudnn_us"]) == ("splitk", 5.0, "1", 40.0)
    # a kernel with a wrong result is never chosen, however fast
    assert md.choose_row(bench_row(fused_splitk_err=0.1), 1.05)["choice"] == "wmma"
    # no kernel beats cuDNN by the margin: cuDNN
    slow = bench_row(fused_splitk_us=39.0, fused_wmma_us=45.0)
    assert md.choose_row(slow, 1.05)["choice"] == "cudnn"
    assert md.choose_row(slow, 1.0)["choice"] == "splitk"
    # a kernel whose kept buffers the run left dirty was not measured as it runs: never chosen
    assert md.choose_row(bench_row(dirty_buffers=["splitk counters"]), 1.05)["choice"] == "wmma"


def test_new_measurements_replace_only_their_gpu_rows():
    md = load_make_dispatch()
    old = [row(cc="8.7"), row(cc="9.0", choice="simt")]
    merged = md.merge_rows(old, [row(cc="9.0", choice="splitk")])
    assert {(r["cc"], r["choice"]) for r in merged} == {("8.7", "splitk"), ("9.0", "splitk")}


def test_make_dispatch_writes_a_table_the_package_reads(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"meta": {}, "rows": [bench_row(), bench_row(batch=256, fused_splitk_us=500.0,
                                                                             fused_wmma_us=400.0)]}))
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_dispatch.py"), str(bench), "--out",
                           str(out), "--device", "a GPU", "--command", "bench"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = D.load_table(str(out))
    assert table[D.key_of(row())] == "splitk"
    assert table[D.key_of(row(batch="65-256"))] == "cudnn"
    doc = json.loads(out.read_text())
    assert doc["measured_on"][0]["device"] == "a GPU" and doc["measured_on"][0]["cc"] == "9.0"
    # A benchmark that wrote nothing (cut before its first row): one line, the table untouched.
    before = out.read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_dispatch.py"), str(tmp_path / "none.json"),
                           "--out", str(out), "--device", "a GPU", "--command", "bench"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("make_dispatch: cannot read the benchmark rows")
    assert out.read_bytes() == before


def test_direct_kernel_and_describe_use_the_one_override(monkeypatch):
    """fused_ms_conv called directly runs simt unless FER_EDGE_CUDA_KERNEL names one
    of our kernels; `fer-edge info` reports a bad override instead of failing."""
    try:
        for asked, direct in (("", "simt"), ("cudnn", "simt"), ("wmma", "wmma"), ("splitk", "splitk")):
            monkeypatch.setenv(D.OVERRIDE_ENV, asked)
            D.override.cache_clear()
            assert D.direct_kernel() == direct
            assert D.describe()["override"] == (asked or None)
        monkeypatch.setenv(D.OVERRIDE_ENV, "fastest")
        D.override.cache_clear()
        described = D.describe()
        assert described["override"] is None and "choose one of" in described["override_error"]
    finally:
        monkeypatch.delenv(D.OVERRIDE_ENV, raising=False)
        D.override.cache_clear()


def test_only_the_dispatch_module_reads_the_kernel_environment():
    """One reader of FER_EDGE_CUDA_KERNEL (dispatch.override): the layers, the op
    and the compiled kernels take the choice as an argument."""
    for path in (REPO / "fer_edge" / "kernels.py", REPO / "fer_edge" / "models" / "layers.py"):
        text = path.read_text()
        assert "environ" not in text and "getenv" not in text, path
    for path in sorted((REPO / "csrc").iterdir()):
        assert "getenv" not in path.read_text(errors="replace"), path
