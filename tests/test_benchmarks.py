"""The benchmark scripts run (on the CPU, tiny settings) and their tables say
what the kernels compute is right: a benchmark that silently timed a wrong
result would be worse than none.  Speed itself is never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_profile_train_times_real_optimizer_steps(tmp_path):
    data, table = bench("profile_train.py", "--models", "macnn", "vgg16", "--width", "0.125", "--batch-sizes", "8",
                        "--steps", "6", "--profile", "macnn", tmp_path=tmp_path)
    rows = data["rows"]
    assert [(r["model"], r["layout"]) for r in rows] == [(m, f) for m in ("macnn", "vgg16")
                                                         for f in ("channels_last", "nchw")]
    for r in rows:
        assert r["img_per_s"] > 0 and r["batch"] == 8
        # nine steps on one batch of 8 random faces: a step that trains lowers the loss
        assert r["loss_last"] < 0.8 * r["loss_first"], r
    assert "convolution" in data["profile"] and "Self CPU" in table


def test_ship_weights_round_trip(tmp_path):
    """A checkpoint split into float16 parts (the GPU machine's file limits)
    comes back as a float32 checkpoint with its metadata and the same model."""
    import torch

    from fer_edge import models
    from fer_edge.checkpoint import load_checkpoint, read_meta, save_checkpoint

    torch.manual_seed(0)
    m = models.create("macnn", width=0.25).eval()
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, m, extra={"epoch": 3})
    subprocess.run([sys.executable, str(BENCH / "ship_weights.py"), "pack", str(src), str(tmp_path / "out" / "m"),
                    "--chunk-mib", "1"], check=True, capture_output=True)
    parts = sorted((tmp_path / "out").glob("m.part*"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 2**20 for p in parts)
    dst = tmp_path / "back.safetensors"
    subprocess.run([sys.executable, str(BENCH / "ship_weights.py"), "unpack", *map(str, parts), str(dst)],
                   check=True, capture_output=True)
    meta = read_meta(dst)
    assert meta["extra"]["epoch"] == 3 and meta["extra"]["shipped_as_float16"]["source_sha256"]
    back, _ = load_checkpoint(dst)
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert b.dtype == a.dtype, k
        if a.is_floating_point():  # float16 rounding: 2^-11 relative
            torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=2e-2, atol=2e-2)


def test_eval_ensemble_maps_classes_by_name_and_averages_probabilities(trained, tmp_path):
    """A member stored with its classes (and head rows) reversed is the same
    model; the ensemble row is the accuracy of the mean of the members'
    probabilities, computed here from the library for comparison."""
    import numpy as np
    import torch

    from fer_edge.checkpoint import load_checkpoint, save_checkpoint
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import predict_probs, remap_labels
    from fer_edge.metrics import summarize
    from fer_edge.weights import default_weights

    weights, calib, _ = trained
    model, meta = load_checkpoint(weights, use_kernel=False)
    with torch.no_grad():
        model.fc.weight.copy_(model.fc.weight.flip(0))
        model.fc.bias.copy_(model.fc.bias.flip(0))
    rev = tmp_path / "reversed.safetensors"
    save_checkpoint(rev, model, classes=list(meta["classes"])[::-1], preprocess=meta["preprocess"])
    default = default_weights()
    data, _ = bench("eval_ensemble.py", "--weights", weights, rev, default, "--data", calib, tmp_path=tmp_path)
    a, r, d, ens = data["rows"]
    assert r["plain"] == a["plain"] and ens["weights"] == "ensemble of 3"

    ds = load_dataset(calib, size=48)
    classes = list(meta["classes"])
    probs = []
    for w in (weights, default):
        m, mt = load_checkpoint(w, use_kernel=False)
        probs.append(predict_probs(m, ds.images, mt["preprocess"])[:, [list(mt["classes"]).index(c) for c in classes]])
    expect = summarize(remap_labels(ds, classes), (2 * probs[0] + probs[1]) / 3, classes)
    assert ens["plain"]["accuracy"] == expect["accuracy"]
    assert ens["plain"]["mean_class_accuracy"] == expect["mean_class_accuracy"]
    assert d["plain"]["accuracy"] == summarize(remap_labels(ds, classes), probs[1], classes)["accuracy"]
    assert np.isfinite(ens["plain"]["accuracy"])


def test_promote_default_writes_weights_and_a_card_that_matches_eval(trained, tmp_path):
    """The model card's numbers are those `fer-edge eval --tta` reports for the
    same checkpoint and data; its sha256 is the copied file's; a merged
    checkpoint or an occupied destination is a one-line refusal."""
    import hashlib

    from fer_edge.checkpoint import load_checkpoint, save_checkpoint
    from fer_edge.reparam import merge

    weights, calib, _ = trained
    script = [sys.executable, str(BENCH / "promote_default.py")]
    common = ["--data", str(calib), "--train-command", "fer-edge train ...", "--status", "test",
              "--dest", str(tmp_path / "w"), "--name", "m"]
    proc = subprocess.run([*script, str(weights), *common], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((tmp_path / "w" / "m.json").read_text())
    copied = tmp_path / "w" / "m.safetensors"
    assert card["file"] == "m.safetensors" and card["sha256"] == hashlib.sha256(copied.read_bytes()).hexdigest()
    assert copied.read_bytes() == Path(weights).read_bytes()
    ev = tmp_path / "e.json"
    from helpers import run_cli

    e = run_cli("eval", "--weights", weights, "--data", calib, "--tta", "--json", ev)
    assert e.returncode == 0, e.stderr[-2000:]
    rep = json.loads(ev.read_text())
    t = card["publictest"]
    assert t["accuracy"] == round(rep["accuracy"], 4) and t["tta_ten_crop_accuracy"] == round(rep["tta"]["accuracy"], 4)
    assert t["mean_class_accuracy"] == round(rep["mean_class_accuracy"], 4)

    again = subprocess.run([*script, str(weights), *common], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "pass --force" in again.stderr and "Traceback" not in again.stderr
    model, meta = load_checkpoint(weights)
    merged = tmp_path / "merged.safetensors"
    save_checkpoint(merged, merge(model, use_kernel=False), classes=meta["classes"], preprocess=meta["preprocess"])
    bad = subprocess.run([*script, str(merged), *common, "--force"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "train-form" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_cutlass_headers_packs_the_include_folders_of_a_wheel(tmp_path):
    """The headers for a GPU machine without internet: cutlass/ and cute/ out of
    an nvidia-cutlass wheel's include folder, nothing else; a file that is not
    a wheel is one line on stderr and exit 2, and leaves no archive."""
    import tarfile
    import zipfile

    wheel = tmp_path / "nvidia_cutlass-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ("cutlass/cutlass.h", "cute/tensor.hpp", "other/skip.h"):
            z.writestr(f"cutlass_library/source/include/{name}", f"// {name}\n")
        z.writestr("cutlass_library/__init__.py", "")
    out = tmp_path / "headers.tar.xz"
    script = str(BENCH / "cutlass_headers.py")
    proc = subprocess.run([sys.executable, script, str(wheel), "--all", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["cute/tensor.hpp", "cutlass/cutlass.h"]
        assert tar.extractfile("cutlass/cutlass.h").read() == b"// cutlass/cutlass.h\n"
    bad = tmp_path / "bad.tar.xz"
    proc = subprocess.run([sys.executable, script, str(BENCH.parent / "README.md"), "--out", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a zip file" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not bad.exists() and not list(tmp_path.glob("*.part"))


def test_sweep_mma_refuses_without_a_cuda_gpu_and_lists_its_chunks():
    """The tile sweep runs on a GPU only: here one line and exit 2.  Its chunks
    double from 128 up to the first that holds the layer's longest K whole."""
    sys.path.insert(0, str(BENCH))
    import sweep_mma

    assert sweep_mma.chunks_for(64, 32, 48, 48) == [128, 256, 512, 1024, 2048]   # L2: 25 x 64 = 1600
    assert sweep_mma.chunks_for(512, 0, 512, 0) == [128, 256, 512, 1024, 2048, 4096, 8192]   # P5: 9 x 512
    assert sweep_mma.chunks_for(8, 8, 0, 0) == [128]
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the sweep would run")
    proc = subprocess.run([sys.executable, str(BENCH / "sweep_mma.py"), "--layers", "L4"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in proc.stderr


def test_sweep_cutlass90_refuses_without_a_hopper_gpu_and_lists_its_launches():
    """The Hopper tile sweep runs on a 9.0 GPU only: here one line and exit 2.  A
    window kernel is one launch over every channel, the others one per branch."""
    sys.path.insert(0, str(BENCH))
    import sweep_cutlass90

    assert sweep_cutlass90.launch_couts("cutlass90", 32, 48, 48) == [48, 48, 32]
    assert sweep_cutlass90.launch_couts("cutlass90", 0, 512, 0) == [512]
    assert sweep_cutlass90.launch_couts("cutlass90_window", 128, 192, 192) == [512]
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the sweep would run")
    proc = subprocess.run([sys.executable, str(BENCH / "sweep_cutlass90.py"), "--layers", "L4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible on this machine")
def test_bench_msconv_on_cuda_times_every_kernel_right_in_one_process(tmp_path):
    """Every CUDA kernel of ours in one benchmark process, as the dispatch table is
    measured (L4 and L5 at batch 1, fp16): each one's error is fp16 rounding and no
    kept buffer is left dirty.  Each kernel's CUDA graph must keep its buffers alive:
    a graph holds no reference to them, and once freed their memory went to other
    tensors, which overwrote the split-K kernels' counters (error 1.0)."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_msconv.py"), "--device", "cuda", "--json", str(out),
                           "--layers", "L4", "L5", "--batches", "1", "--dtypes", "fp16", "--repeat", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["layer"] for r in rows] == ["L4", "L5"]
    for r in rows:
        errs = {k: v for k, v in r.items() if k.startswith("fused_") and k.endswith("_err")}
        assert {"fused_splitk_err", "fused_simt_err"} <= set(errs), r
        assert all(v <= 5e-3 for v in errs.values()), errs
        assert "dirty_buffers" not in r, r["dirty_buffers"]
