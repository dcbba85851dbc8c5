"""`fer-edge train` and `fer-edge eval` run for real: tiny CPU runs on FER2013
and CK+ images that train and evaluate, resume after a SIGKILL, keep to a time
budget, run as two torchrun processes, fold CK+ by subject, and fine-tune from
a checkpoint (--init); and the bad inputs, each refused in one line before any
work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fer_edge.training.rundir import read_resume_state
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import copy_subset, one_line_error  # noqa: E402
from test_training import (  # noqa: E402,F401
    CKPLUS,
    FER,
    HOOKED_TRAIN,
    TINY,
    assert_same_weights,
    load_state,
    needs_data,
    run,
    tiny,
)


# ------------------------------------------------------------------ real runs
@needs_data
def test_train_then_eval_on_real_faces(tiny, tmp_path):
    train, val = tiny
    out = tmp_path / "run"
    proc = run("train", *TINY, "--data", train, "--val", val, "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("best.safetensors", "last.safetensors", "resume.safetensors", "config.json", "metrics.jsonl",
                 "summary.json", "val_eval.json", "plots/confusion.png", "plots/roc.png",
                 "plots/training_curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "val_acc", "val_mean_class_acc", "img_per_s", "lr"} <= rows[0].keys()
    best = max(rows, key=lambda r: r["val_acc"])
    # best.safetensors really is the epoch with the best validation accuracy, and eval agrees with training
    proc = run("eval", "--weights", out / "best.safetensors", "--data", val, "--json", tmp_path / "e.json",
               "--plots", tmp_path / "plots", "--tta")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["accuracy"] == pytest.approx(best["val_acc"], abs=1e-9)
    assert rep["mean_class_accuracy"] == pytest.approx(best["val_mean_class_acc"], abs=1e-9)
    assert rep["images"] == 56 and set(rep["per_class"]) == set(rep["classes"])
    assert np.array(rep["confusion_matrix"]).sum() == 56
    assert 0 <= rep["tta"]["accuracy"] <= 1 and rep["latency"]["median_ms"] > 0
    for png in ("confusion.png", "roc.png", "training_curves.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean-class accuracy" in proc.stdout
    # nothing is overwritten without --force
    proc = run("eval", "--weights", out / "best.safetensors", "--data", val, "--json", tmp_path / "e.json")
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr


@needs_data
def test_resume_after_sigkill_equals_uninterrupted_run(tiny, tmp_path):
    train, val = tiny
    common = [*TINY, "--data", train, "--val", val, "--epochs", "3"]
    full = run("train", *common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run("train", *common, "--out", tmp_path / "cut", hooks={"kill_after_epoch": 1})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    again = run("train", *common, "--out", tmp_path / "cut")
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing run is never clobbered
    # a line cut short (a crash in the middle of a write) is skipped with a warning, and dropped
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo\n')
    resumed = run("train", *common, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    assert "skipped 1 line(s) that are not epoch records" in resumed.stdout, resumed.stdout
    assert_same_weights(load_state(tmp_path / "full" / "last.safetensors"),
                        load_state(tmp_path / "cut" / "last.safetensors"))
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    # the resume file holds only tensors and plain data: it loads without unpickling code
    state = read_resume_state(tmp_path / "cut" / "resume.safetensors")
    assert state["epoch"] == 3 and {"optimizer", "scheduler", "scaler", "rng"} <= state.keys()
    # resuming with other settings is refused
    other = run("train", *TINY, "--data", train, "--val", val, "--epochs", "5", "--out", tmp_path / "cut",
                "--resume")
    assert other.returncode == 2 and "differs" in other.stderr


@needs_data
def test_time_budget_sets_the_epochs_and_survives_resume(tiny, tmp_path):
    """A run whose budget is spent after its second epoch stops there, with the
    schedule shortened to end at that epoch; the decision is part of the
    resume state.  A budget that fits everything trains the --epochs cap."""
    train, val = tiny
    common = [*TINY, "--data", train, "--val", val, "--epochs", "4", "--limit", "48"]
    cut = run("train", *common, "--time-budget", "0.0001", "--out", tmp_path / "cut",
              hooks={"kill_after_epoch": 2})
    assert cut.returncode == -9, cut.stderr[-2000:]
    assert "time budget 0.0001 min" in cut.stdout and "-> 2 epochs (of 4)" in cut.stdout, cut.stdout
    resumed = run("train", *common, "--time-budget", "0.0001", "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "after epoch 2/2" in resumed.stdout
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["recipe_epochs"] == 4 and summary["time_budget_min"] == 0.0001
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2
    state = read_resume_state(tmp_path / "cut" / "resume.safetensors")
    # the cosine schedule was re-planned for 2 epochs: its last step has reached lr 0
    assert state["epochs"] == 2 and state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert state["train_seconds"] > 0  # a resumed run's budget counts the killed process's time
    # A run that slows down after the decision is re-planned to end in time: with epochs of
    # well under 1.5 s the second epoch plans more than 3, then epoch 3 takes 9 s longer.
    slow = run("train", *common, "--epochs", "12", "--time-budget", "0.1", "--out", tmp_path / "slow",
               hooks={"slow_epoch": [3, 9]})
    assert slow.returncode == 0, slow.stderr[-2000:]
    decisions = [line for line in slow.stdout.splitlines() if line.startswith("time budget")]
    assert len(decisions) == 2 and decisions[1].endswith("-> 3 epochs (of %s)" % decisions[0].split("-> ")[1]
                                                            .split()[0]), slow.stdout
    assert int(decisions[0].split("-> ")[1].split()[0]) > 3, decisions
    assert json.loads((tmp_path / "slow" / "summary.json").read_text())["epochs"] == 3
    state = read_resume_state(tmp_path / "slow" / "resume.safetensors")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)  # schedule ended at 3
    roomy = run("train", *common, "--epochs", "3", "--time-budget", "600", "--out", tmp_path / "roomy")
    assert roomy.returncode == 0, roomy.stderr[-2000:]
    assert json.loads((tmp_path / "roomy" / "summary.json").read_text())["epochs"] == 3
    for value, expect in (("0", "--time-budget: 0 is out of range"), ("inf", "not a finite number")):
        bad = run("train", *common, "--time-budget", value, "--out", tmp_path / "bad")
        assert bad.returncode == 2 and expect in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    bad = run("train", *TINY, "--data", train, "--folds", "2", "--time-budget", "5", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "with --folds give --epochs" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@needs_data
def test_torchrun_two_cpu_processes_end_with_identical_weights(tiny, tmp_path):
    train, val = tiny
    dump = tmp_path / "ranks"
    script = tmp_path / "hooked_train.py"
    script.write_text(HOOKED_TRAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), json.dumps({"dump_ranks": str(dump)}), *TINY, "--batch-size", "8", "--data", str(train),
           "--val", str(val), "--epochs", "2", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = load_state(dump / "rank0.safetensors"), load_state(dump / "rank1.safetensors")
    assert_same_weights(r0, r1)
    assert_same_weights(r0, load_state(tmp_path / "ddp" / "last.safetensors"))
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 2
    # 168 faces, 2 processes x 8 = 16 per step: 10 steps of 16 = 160 faces per epoch
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2


@needs_data
def test_kfold_on_ckplus_is_subject_grouped(tmp_path):
    proc = run("train", *TINY, "--data", CKPLUS, "--folds", "3", "--epochs", "1", "--out", tmp_path / "kf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "kf" / "folds.json").read_text())
    assert rep["kind"] == "subject-grouped" and len(rep["per_fold"]) == 3
    assert sum(f["test_images"] for f in rep["per_fold"]) == 981
    accs = [f["accuracy"] for f in rep["per_fold"]]
    assert rep["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert rep["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert "±" in proc.stdout
    for i in (1, 2, 3):
        assert (tmp_path / "kf" / f"fold{i:02d}" / "last.safetensors").is_file()
    # --resume reuses a finished fold only when it was trained as this command would train it
    again = run("train", *TINY, "--data", CKPLUS, "--folds", "3", "--epochs", "1", "--out", tmp_path / "kf",
                "--resume")
    assert again.returncode == 0 and again.stdout.count("done earlier") == 3, again.stderr[-2000:]
    for other, expect in ((("--folds", "2", "--epochs", "1"), "training faces, this fold has"),
                          (("--folds", "3", "--epochs", "2"), "finished with another")):
        proc = run("train", *TINY, "--data", CKPLUS, *other, "--out", tmp_path / "kf", "--resume")
        one_line_error(proc, expect)


# ------------------------------------------------------------------ bad input
@needs_data
def test_bad_training_inputs_are_one_line_errors(tiny, tmp_path):
    train, val = tiny

    def fails(*args, expect):
        proc = run("train", *TINY, "--epochs", "1", *args)
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], proc.stderr

    # validation classes that the training data does not have
    val_extra = copy_subset(CKPLUS, tmp_path / "val_extra", 3, classes=["anger", "contempt"])
    fails("--data", train, "--val", val_extra, "--out", tmp_path / "a", expect="contempt not in training")
    # empty data folder, unknown class folder, resume of nothing
    (tmp_path / "empty").mkdir()
    fails("--data", tmp_path / "empty", "--val", val, "--out", tmp_path / "b", expect="no class folders")
    odd = copy_subset(FER / "publictest", tmp_path / "odd", 2, classes=["happy"])
    (odd / "happy").rename(odd / "giggly")
    fails("--data", odd, "--val", val, "--out", tmp_path / "c", expect="unknown class folder 'giggly'")
    fails("--data", train, "--val", val, "--out", tmp_path / "d", "--resume", expect="nothing to resume")
    fails("--data", train, "--out", tmp_path / "e", expect="--val is required")
    fails("--data", train, "--val", val, "--out", tmp_path / "f", "--recipe", "magic", expect="invalid choice")
    # a corrupt image: skipped with a count, or an error under --strict
    bad = copy_subset(FER / "train", tmp_path / "bad", 3)
    (bad / "sad" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    fails("--data", bad, "--val", val, "--out", tmp_path / "g", "--strict", expect="broken.jpg")
    proc = run("train", *TINY, "--batch-size", "4", "--epochs", "1", "--data", bad, "--val", val,
               "--out", tmp_path / "h")
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped (1 corrupt or truncated)" in proc.stdout
    # a CSV row with the wrong pixel count under --strict
    csv = tmp_path / "fer.csv"
    csv.write_text("emotion,pixels,Usage\n3," + " ".join(["1"] * 2300) + ",Training\n")
    fails("--data", csv, "--val", val, "--out", tmp_path / "i", "--strict", expect="2300 pixels")


# Refused by the parser or the first checks: no data is read (none exists here), nothing is written.
REFUSED_BEFORE_WORK = [
    (("--lr", "nan"), "--lr"), (("--lr", "0"), "--lr"), (("--epochs", "0"), "--epochs"),
    (("--batch-size", "-1"), "--batch-size"), (("--seed", "-1"), "--seed"), (("--limit", "0"), "--limit"),
    (("--width", "inf"), "--width"), (("--kd-weight", "0"), "--kd-weight"), (("--folds", "1"), "--folds"),
    (("--weight-decay", "2"), "--weight-decay"), (("--time-budget", "-5"), "--time-budget"),
    (("--device", "gpu"), "--device"), (("--device", "cuda:7"), "cuda:7"), (("--amp", "fp8"), "--amp"),
    (("--model", "resnet"), "--model"), (("--compile", "fast"), "--compile"), (("--classes", "sad,,happy"), "--classes"),
    (("--classes", "sad,sad"), "twice"), (("--val-usage", "Test"), "--val-usage"),
]


@pytest.mark.parametrize("args, expect", REFUSED_BEFORE_WORK, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_bad_numbers_choices_and_devices_are_refused_at_once(tmp_path, args, expect):
    import time

    start = time.monotonic()
    proc = run("train", "--data", tmp_path / "faces", "--val", tmp_path / "val", "--out", tmp_path / "run", *args)
    one_line_error(proc, expect)
    assert proc.returncode == 2 and time.monotonic() - start < 30
    assert not (tmp_path / "run").exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("a file where a folder should be")
    data = ("--data", tmp_path / "faces")
    one_line_error(run("train", *data, "--val", tmp_path / "val", "--out", tmp_path / "afile" / "run"), "is a file")
    one_line_error(run("train", *data, "--val", tmp_path / "val", "--out", tmp_path / "afile"), "is a file")
    one_line_error(run("eval", *data, "--json", tmp_path / "afile" / "e.json"), "is a file")
    one_line_error(run("eval", *data, "--plots", tmp_path / "afile"), "is a file")
    one_line_error(run("eval", *data, "--device", "cuda:7"), "cuda:7")
    one_line_error(run("teacher-logits", *data, "--out", tmp_path / "afile" / "t.safetensors"), "is a file")
    one_line_error(run("calibrate", *data, "--out", tmp_path / "afile" / "c.safetensors"), "is a file")
    one_line_error(run("calibrate", *data, "--out", tmp_path / "c.safetensors", "--usage", "Some"), "--usage")
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        one_line_error(run("train", *data, "--val", tmp_path / "val", "--out", ro / "run"), "cannot write")
        one_line_error(run("eval", *data, "--json", ro / "e.json"), "cannot write")


def test_a_damaged_resume_file_is_one_line(tmp_path):
    """Truncated, foreign, of the wrong structure, with a broken JSON structure, or
    a pickle of an older fer-edge: one line naming the file, before any data is
    read, and nothing unpickled."""
    from fer_edge.statefile import STATE_KEY, write_state
    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "resume.safetensors"
    state = {"epoch": 1, "model": {"w": torch.randn(20_000)}, "optimizer": {}, "scheduler": {}, "scaler": {},
             "rng": [{"cpu": torch.get_rng_state()}], "best_acc": 0.5, "best_epoch": 1, "fingerprint": {}}
    write_state(path, state)
    whole = path.read_bytes()

    def resume():
        return run("train", "--data", tmp_path / "faces", "--val", tmp_path / "val", "--out", run_dir, "--resume")

    for raw in (whole[: len(whole) // 2], b"PK\x03\x04" + bytes(range(256)) * 4, b""):
        path.write_bytes(raw)
        proc = resume()
        one_line_error(proc, "not a readable resume file")
        assert "resume.safetensors" in proc.stderr
    for obj, expect in (([1, 2, 3], "holds a list"), ({**state, "epoch": "one"}, "'epoch'"),
                        ({**state, "rng": []}, "damaged")):
        write_state(path, obj)
        one_line_error(resume(), expect)
    for meta, expect in (({}, "without a fer-edge state"), ({STATE_KEY: "{"}, "not valid JSON"),
                         ({STATE_KEY: '{"__tensor__": "7"}'}, "a tensor the file does not hold"),
                         ({STATE_KEY: '{"__tuple__": 3}'}, "does not hold a list")):
        save_file({"0": torch.zeros(2)}, str(path), metadata=meta)
        one_line_error(resume(), expect)
    path.unlink()
    torch.save(state, run_dir / "resume.pt")   # what an older fer-edge wrote: a pickle, never read
    one_line_error(resume(), "never unpickles")
    assert sorted(p.name for p in run_dir.iterdir()) == ["resume.pt"]  # nothing else was written


def test_the_state_file_gives_back_what_it_was_given(tmp_path):
    """Tensors of every dtype a run keeps (views and shared storage included),
    tuples, integer keys (an optimizer's per-parameter state), None, inf and
    NaN: back as they were, with no pickle involved; what it cannot hold is refused."""
    import math

    from fer_edge.statefile import read_state, write_state

    base = torch.randn(6, 4)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], betas=(0.8, 0.99))
    state = {"model": {"w": base, "view": base[1:3], "u8": torch.get_rng_state(), "b": torch.ones(2, dtype=torch.bool),
                       "h": torch.randn(3).half(), "i": torch.tensor(7)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3)}, 5: {}},
                           "param_groups": opt.state_dict()["param_groups"]},
             "scheduler": {"best": math.inf, "lr_lambdas": [None], "eps": 1e-8, "mode": "min"},
             "nan": math.nan, "pair": (1, (2.5, "x")), "empty": {}, "none": None, "flag": True}
    write_state(tmp_path / "s.safetensors", state)
    back = read_state(tmp_path / "s.safetensors")
    assert back["pair"] == (1, (2.5, "x")) and back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    assert list(back["optimizer"]["state"]) == [0, 5] and back["scheduler"]["best"] == math.inf
    assert math.isnan(back["nan"]) and back["empty"] == {} and back["none"] is None and back["flag"] is True
    for k, v in state["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    for bad in ({"x": object()}, {1: "a", "b": 2}, {"__tensor__": 1}):
        with pytest.raises(TypeError):
            write_state(tmp_path / "bad.safetensors", bad)
    assert not (tmp_path / "bad.safetensors").exists()


@needs_data
def test_a_run_failing_in_its_first_epoch_can_be_started_again(tiny, tmp_path):
    train, val = tiny
    common = [*TINY, "--data", train, "--val", val, "--epochs", "1", "--limit", "48", "--out", tmp_path / "run"]
    failed = run("train", *common, hooks={"fail_in_epoch": 1})
    one_line_error(failed, "stopped in epoch 1 on purpose")
    assert not (tmp_path / "run").exists()  # no config.json left to refuse the corrected run


@needs_data
def test_eval_rejects_classes_the_model_never_saw(tiny, tmp_path):
    train, val = tiny
    assert run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", tmp_path / "r").returncode == 0
    proc = run("eval", "--weights", tmp_path / "r" / "best.safetensors", "--data", CKPLUS)
    assert proc.returncode == 2 and "contempt" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ fine-tuning (--init)
@needs_data
def test_finetune_from_fer_checkpoint_on_ckplus(tiny, tmp_path):
    from fer_edge.checkpoint import FER2013_CLASSES

    train, val = tiny
    assert run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", tmp_path / "fer").returncode == 0
    init = tmp_path / "fer" / "best.safetensors"
    ck_train = copy_subset(CKPLUS, tmp_path / "ck_train", 6)
    ck_val = copy_subset(CKPLUS, tmp_path / "ck_val", 3, offset=6)
    # lr 1e-30: every update is below float32 resolution, so the weights stay
    # exactly the initialisation and the transfer itself is what is checked
    proc = run("train", "--init", init, "--data", ck_train, "--val", ck_val, "--epochs", "1", "--lr", "1e-30",
               "--batch-size", "8", "--no-progress", "--out", tmp_path / "ft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 of 7 classes' head rows transferred; new: contempt; dropped: neutral" in proc.stdout
    src, out = load_state(init), load_state(tmp_path / "ft" / "last.safetensors")
    classes = json.loads((tmp_path / "ft" / "config.json").read_text())["classes"]
    assert "contempt" in classes and "neutral" not in classes
    conv = next(k for k in src if k.endswith("weight") and src[k].ndim == 4)
    torch.testing.assert_close(out[conv], src[conv], rtol=0, atol=0)
    head = next(k for k in src if k.endswith("weight") and src[k].ndim == 2 and src[k].shape[0] == 7)
    for i, c in enumerate(classes):
        if c in FER2013_CLASSES:
            torch.testing.assert_close(out[head][i], src[head][FER2013_CLASSES.index(c)], rtol=0, atol=0)
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["init"]["sha256"] and cfg["model_config"]["width"] == 0.125

    def fails(*args, expect):
        p = run("train", "--init", *args, "--data", ck_train, "--val", ck_val, "--epochs", "1", "--no-progress",
                "--out", tmp_path / "bad")
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], p.stderr

    fails(init, "--width", "0.25", expect="has width 0.125, not 0.25")
    fails(init, "--model", "hsnet", expect="is a macnn checkpoint, not --model hsnet")
    fails(tmp_path / "nope.safetensors", expect="no such checkpoint file")
    merged = tmp_path / "merged.safetensors"
    assert run("merge", "--weights", init, "--out", merged).returncode == 0
    fails(merged, expect="merged-form checkpoint cannot be trained")
