"""Training and evaluation: metrics against independent references, the
augmentation, and real (tiny) CPU runs of `fer-edge train` / `fer-edge eval`
on FER2013 and CK+ images: resume after a SIGKILL, torchrun with two
processes, k-fold, and the bad inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fer_edge import metrics
from fer_edge.evaluate import ten_crop_views
from fer_edge.training import augment as A
from fer_edge.training.recipes import get_recipe, lr_factor
from fer_edge.training.trainer import class_weight_vector

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from helpers import DATA, copy_subset, one_line_error  # noqa: E402

SCRIPT = Path(sys.executable).with_name("fer-edge")
FER = DATA / "fer2013"
CKPLUS = DATA / "ckplus48"
needs_data = pytest.mark.skipif(not FER.is_dir(), reason=f"real data not found at {DATA}")

# A tiny run: width 0.125 MACNN, a few hundred real faces, fp32 on CPU.
TINY = ["--model", "macnn", "--width", "0.125", "--batch-size", "16", "--no-progress"]


# `fer-edge train` with RunHooks (fer_edge.training.settings), driven by a JSON spec:
# killed right after the checkpoint of an epoch, an epoch made slower, a failure
# in an epoch, every process's final weights written to a folder.
HOOKED_TRAIN = r"""
import json, os, signal, sys, time
from pathlib import Path

from fer_edge import UserError
from fer_edge.cli import Parser
from fer_edge.commands.train import add_train_parser, cmd_train
from fer_edge.training.settings import RunHooks

spec = json.loads(sys.argv[1])


def epoch_trained(epoch):
    if spec.get("slow_epoch", [0])[0] == epoch:
        time.sleep(spec["slow_epoch"][1])
    if spec.get("fail_in_epoch") == epoch:
        raise UserError(f"stopped in epoch {epoch} on purpose")


def checkpoint_written(epoch):
    if spec.get("kill_after_epoch") == epoch:
        os.kill(os.getpid(), signal.SIGKILL)


def finished(model, ctx):
    if "dump_ranks" in spec:
        from safetensors.torch import save_file

        folder = Path(spec["dump_ranks"])
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(folder / f"rank{ctx.rank}.safetensors"))


parser = Parser(prog="fer-edge")
add_train_parser(parser.add_subparsers(dest="command"))
args = parser.parse_args(["train", *sys.argv[2:]])
try:
    sys.exit(cmd_train(args, hooks=RunHooks(epoch_trained, checkpoint_written, finished)))
except UserError as exc:
    print(f"fer-edge train: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def run(*args, env=None, cwd=None, timeout=600, hooks=None):
    """`fer-edge ARGS`; with ``hooks`` (see HOOKED_TRAIN), `fer-edge train ARGS` with those hooks."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [str(SCRIPT), *map(str, args)]
    if hooks is not None:
        assert args[0] == "train"
        # -P: the working directory is not put on sys.path (the installed fer_edge is the one under test)
        cmd = [sys.executable, "-P", "-c", HOOKED_TRAIN, json.dumps(hooks), *map(str, args[1:])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not FER.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    root = tmp_path_factory.mktemp("tiny")
    train = copy_subset(FER / "train", root / "train", 24)
    val = copy_subset(FER / "publictest", root / "val", 8)
    return train, val


def load_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------ metrics
def test_confusion_precision_recall_f1_by_hand():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    cm = metrics.confusion_matrix(y, p, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    prec, rec, f1 = metrics.precision_recall_f1(cm)
    np.testing.assert_allclose(prec, [1.0, 0.5, 0.5])
    np.testing.assert_allclose(rec, [2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(f1, [0.8, 0.5, 2 / 3])
    assert metrics.accuracy(cm) == pytest.approx(4 / 6)
    assert metrics.mean_class_accuracy(cm) == pytest.approx((2 / 3 + 0.5 + 1) / 3)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_mann_whitney_statistic(seed):
    """AUC = P(score of a positive > score of a negative), ties counted 1/2."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 20, 300).astype(float)  # many ties on purpose
    pos = rng.random(300) < 0.3 + 0.02 * s
    fpr, tpr = metrics.roc_curve(s, pos)
    diff = s[pos][:, None] - s[~pos][None, :]
    reference = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert metrics.auc(fpr, tpr) == pytest.approx(reference, abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_summary_perfect_and_per_class():
    probs = np.eye(3)[[0, 1, 2, 2]]
    rep = metrics.summarize([0, 1, 2, 2], probs, ["a", "b", "c"])
    assert rep["accuracy"] == 1 and rep["mean_class_accuracy"] == 1 and rep["macro_auc"] == 1
    assert rep["per_class"]["c"]["support"] == 2


# ------------------------------------------------------------------ augmentation
def batch(n=6, seed=0):
    return torch.randn(n, 1, 12, 10, generator=torch.Generator().manual_seed(seed))


def test_flips_are_exact_and_drawn_from_the_generator():
    x = batch()
    state = torch.get_rng_state()
    torch.testing.assert_close(A.random_flips(x, torch.Generator().manual_seed(0), 1.0, 0.0), x.flip(3))
    torch.testing.assert_close(A.random_flips(x, torch.Generator().manual_seed(0), 0.0, 1.0), x.flip(2))
    torch.testing.assert_close(A.random_flips(x, torch.Generator().manual_seed(0), 0.0, 0.0), x)
    assert torch.equal(torch.get_rng_state(), state), "augmentation must not touch the global RNG"


def test_shift_is_pad_and_crop():
    """With shift only, the affine resampling equals a zero-padded integer crop."""
    x = batch()
    g = torch.Generator().manual_seed(3)
    theta = A.affine_matrices(len(x), torch.Generator().manual_seed(3), x.device, x.shape[-2:], shift=3)
    out = A.random_affine(x, g, shift=3)
    xp = F.pad(x, (3, 3, 3, 3))
    h, w = x.shape[-2:]
    for i in range(len(x)):
        tx = round(theta[i, 0, 2].item() * w / 2)
        ty = round(theta[i, 1, 2].item() * h / 2)
        ref = xp[i, :, 3 + ty:3 + ty + h, 3 + tx:3 + tx + w]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)


def test_erasing_zeroes_one_rectangle():
    x = torch.ones(64, 1, 48, 48)
    out = A.random_erasing(x, torch.Generator().manual_seed(0), p=1.0)
    for img in out[:, 0]:
        zero = (img == 0).nonzero()
        assert len(zero) > 0
        (r0, c0), (r1, c1) = zero.min(0).values, zero.max(0).values
        assert len(zero) == (r1 - r0 + 1) * (c1 - c0 + 1), "erased pixels form one rectangle"
        assert 0.02 * 48 * 48 * 0.5 <= len(zero) <= 0.25 * 48 * 48 * 1.5
    assert torch.equal(A.random_erasing(x, torch.Generator(), p=0.0), x)


def test_recipe_augmentation_is_reproducible():
    aug = get_recipe("best")["augment"]
    x = batch(32)
    a = A.augment(x, torch.Generator().manual_seed(5), aug)
    b = A.augment(x, torch.Generator().manual_seed(5), aug)
    c = A.augment(x, torch.Generator().manual_seed(6), aug)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ten_crop_views():
    x = batch(2)
    v = ten_crop_views(x, pad=2)
    assert v.shape == (10, *x.shape)
    torch.testing.assert_close(v[4], x)            # the centre view is the image
    torch.testing.assert_close(v[9], x.flip(3))    # and its mirror
    torch.testing.assert_close(v[0][..., 2:, 2:], x[..., :-2, :-2])  # top-left corner: shifted by +2


def test_lr_schedule_and_class_weights():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(42, 100, 0, "constant") == 1.0
    w = class_weight_vector(np.array([0, 0, 0, 1]), 3)
    torch.testing.assert_close(w, torch.tensor([2 / 3, 2.0, 0.0]))  # mean 1 over present classes
    paper = get_recipe("paper")
    assert (paper["optimizer"], paper["lr"], paper["batch_size"], paper["epochs"]) == ("adam", 1e-4, 32, 100)
    assert paper["augment"] == {"hflip": 0.3, "vflip": 0.3}


# ------------------------------------------------------------------ real runs
@needs_data
def test_train_then_eval_on_real_faces(tiny, tmp_path):
    train, val = tiny
    out = tmp_path / "run"
    proc = run("train", *TINY, "--data", train, "--val", val, "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("best.safetensors", "last.safetensors", "resume.pt", "config.json", "metrics.jsonl",
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
    state = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
    assert state["epoch"] == 3 and {"optimizer", "scheduler", "scaler", "rng"} <= state.keys()
    # resuming with other settings is refused
    other = run("train", *TINY, "--data", train, "--val", val, "--epochs", "5", "--out", tmp_path / "cut",
                "--resume")
    assert other.returncode == 2 and "differs" in other.stderr


def test_epochs_within_budget():
    from fer_edge.training.trainer import epochs_within_budget

    # 100 s budget, 30 s gone after 2 epochs of 10 s: 7 more fit
    assert epochs_within_budget(100, 30, 10, 2, 60) == 9
    assert epochs_within_budget(100, 30, 10, 2, 5) == 5       # never more than the cap
    assert epochs_within_budget(100, 130, 10, 2, 60) == 2     # over budget: stop here
    assert epochs_within_budget(100, 91, 10, 2, 60) == 2      # 9 s left: no whole epoch fits
    assert epochs_within_budget(100, 90, 10, 2, 60) == 3


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
    state = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
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
    state = torch.load(tmp_path / "slow" / "resume.pt", weights_only=True)
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
    """Truncated, foreign, of the wrong structure or holding pickled objects:
    one line naming the file, before any data is read."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = {"epoch": 1, "model": {"w": torch.randn(20_000)}, "optimizer": {}, "scheduler": {}, "scaler": {},
             "rng": [{"cpu": torch.get_rng_state()}], "best_acc": 0.5, "best_epoch": 1, "fingerprint": {}}
    torch.save(state, run_dir / "resume.pt")
    whole = (run_dir / "resume.pt").read_bytes()
    cases = {"truncated": (whole[: len(whole) // 2], "not a readable resume file"),
             "junk": (b"PK\x03\x04" + bytes(range(256)) * 4, "not a readable resume file"),
             "empty": (b"", "not a readable resume file")}
    for name, (raw, expect) in cases.items():
        (run_dir / "resume.pt").write_bytes(raw)
        proc = run("train", "--data", tmp_path / "faces", "--val", tmp_path / "val", "--out", run_dir, "--resume")
        one_line_error(proc, expect)
        assert "resume.pt" in proc.stderr, name
    for obj, expect in (([1, 2, 3], "holds a list"), ({**state, "epoch": "one"}, "'epoch'"),
                        ({**state, "rng": []}, "damaged"), ({**state, "x": argparse_namespace()}, "never unpickled")):
        torch.save(obj, run_dir / "resume.pt")
        one_line_error(run("train", "--data", tmp_path / "faces", "--val", tmp_path / "val", "--out", run_dir,
                           "--resume"), expect)
    assert sorted(p.name for p in run_dir.iterdir()) == ["resume.pt"]  # nothing else was written


def argparse_namespace():
    """An object that only unpickling could rebuild (torch.load(weights_only=True) refuses it)."""
    import argparse

    return argparse.Namespace(x=1)


def test_metrics_lines_that_are_not_epoch_records_are_skipped(tmp_path):
    from fer_edge.training.rundir import read_rows, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 1.0}\nnot json\n[1, 2]\n{"epoch": "2"}\n\n'
                    '{"epoch": 2, "train_loss": 0.5}\n{"epoch": 3, "train_lo')
    said = []
    assert [r["epoch"] for r in read_rows(path, said.append)] == [1, 2]
    assert len(said) == 1 and "skipped 4 line(s)" in said[0]
    truncate_metrics(path, 1)
    assert path.read_text() == '{"epoch": 1, "train_loss": 1.0}\n'


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    from fer_edge.training.rundir import discard_failed_start

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("config.json", "metrics.jsonl", "last.safetensors"):
        (fresh / name).write_text("x")
    (fresh / "plots").mkdir()
    discard_failed_start(fresh, had_files=False)
    assert not fresh.exists()
    mine = tmp_path / "mine"  # a folder with the user's own file: only the run's files go
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("x")
    discard_failed_start(mine, had_files=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    done = tmp_path / "done"  # a checkpoint was written: the run can be resumed, it stays
    done.mkdir()
    (done / "resume.pt").write_text("x")
    (done / "config.json").write_text("x")
    discard_failed_start(done, had_files=False)
    assert sorted(p.name for p in done.iterdir()) == ["config.json", "resume.pt"]


@needs_data
def test_a_run_failing_in_its_first_epoch_can_be_started_again(tiny, tmp_path):
    train, val = tiny
    common = [*TINY, "--data", train, "--val", val, "--epochs", "1", "--limit", "48", "--out", tmp_path / "run"]
    failed = run("train", *common, hooks={"fail_in_epoch": 1})
    one_line_error(failed, "stopped in epoch 1 on purpose")
    assert not (tmp_path / "run").exists()  # no config.json left to refuse the corrected run


def test_the_model_choices_are_the_registered_models():
    from fer_edge import models
    from fer_edge.commands.train import MODELS

    assert sorted(MODELS) == models.list_models()


@needs_data
def test_eval_rejects_classes_the_model_never_saw(tiny, tmp_path):
    train, val = tiny
    assert run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", tmp_path / "r").returncode == 0
    proc = run("eval", "--weights", tmp_path / "r" / "best.safetensors", "--data", CKPLUS)
    assert proc.returncode == 2 and "contempt" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ fine-tuning (--init)
def test_transfer_state_maps_head_rows_by_class_name():
    from fer_edge import models
    from fer_edge.checkpoint import FER2013_CLASSES, class_output_tensors, transfer_state

    torch.manual_seed(0)
    src = models.create("macnn", num_classes=7, width=0.125)
    ck_classes = ["angry", "contempt", "disgust", "fear", "happy", "sad", "surprise"]  # CK+: no neutral
    dst = models.create("macnn", num_classes=7, width=0.125)
    heads = class_output_tensors(dst, 7)
    assert heads == {"fc.weight", "fc.bias"}, heads
    state, report = transfer_state(src.state_dict(), list(FER2013_CLASSES), dst.state_dict(), ck_classes, heads)
    assert report == {"shared_classes": ["angry", "disgust", "fear", "happy", "sad", "surprise"],
                      "new_classes": ["contempt"], "dropped_classes": ["neutral"]}
    s, d = src.state_dict(), dst.state_dict()
    for name in heads:
        for i, c in enumerate(ck_classes):
            expect = s[name][FER2013_CLASSES.index(c)] if c in FER2013_CLASSES else d[name][i]
            torch.testing.assert_close(state[name][i], expect, rtol=0, atol=0)
    for name in set(state) - heads:
        torch.testing.assert_close(state[name], s[name], rtol=0, atol=0)
    # another width is not a fine-tuning start
    with pytest.raises(ValueError, match="cannot initialise"):
        transfer_state(models.create("macnn", width=0.25).state_dict(), list(FER2013_CLASSES), d, ck_classes, heads)


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


# ------------------------------------------------------------------ distillation
def test_distillation_loss_against_its_definition():
    from fer_edge.training.distill import distillation_loss

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(5, 7, generator=g) * 3).requires_grad_(True)
    t = torch.randn(5, 7, generator=g) * 3
    for temp in (1.0, 4.0):
        p_t, p_s = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
        expect = temp ** 2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        got = distillation_loss(s, t, temp)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
        # d/ds of T^2 KL(p_t || p_s) is T (p_s - p_t) / N: the T^2 factor keeps it O(1) in T
        (grad,) = torch.autograd.grad(got, s)
        torch.testing.assert_close(grad, temp * (p_s - p_t).detach() / len(s), rtol=1e-4, atol=1e-6)
    assert distillation_loss(t, t.clone(), 4.0).abs().item() < 1e-6


def test_ensemble_logits_average_the_softened_predictions():
    """softmax(ensemble / T) is the mean of the members' softmax(z / T), at
    every temperature; one member passes through unchanged (same object)."""
    from fer_edge.training.distill import distillation_loss, ensemble_logits

    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 7, generator=g) * 4 for _ in range(3)]
    for temp in (1.0, 4.0):
        expect = torch.stack([F.softmax(z / temp, 1) for z in zs]).mean(0)
        got = F.softmax(ensemble_logits(zs, temp) / temp, 1)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    assert ensemble_logits(zs[:1], 4.0) is zs[0]
    # two copies of a teacher are that teacher (to rounding): no loss against it
    s = zs[0].clone()
    assert distillation_loss(s, ensemble_logits([zs[0], zs[0].clone()], 4.0), 4.0).abs().item() < 1e-5


def test_teacher_columns_map_classes_by_name():
    from fer_edge.training.distill import teacher_columns

    assert teacher_columns(["a", "b", "c"], ["c", "a"]) == [2, 0]
    with pytest.raises(ValueError, match="no contempt class"):
        teacher_columns(["angry", "happy"], ["happy", "contempt"])


def save_random_teacher(path, seed: int, classes: list[str], *, reversed_head: bool = False):
    """A seeded random width-0.125 MACNN saved as a teacher checkpoint (with
    ``reversed_head``: head rows and class names stored in reverse order, which
    must map back by name); returns (model in eval mode, its preprocess)."""
    from fer_edge import models
    from fer_edge.checkpoint import default_preprocess, save_checkpoint

    torch.manual_seed(seed)
    m = models.create("macnn", num_classes=7, width=0.125)
    if reversed_head:
        with torch.no_grad():
            m.fc.weight.copy_(m.fc.weight.flip(0))
            m.fc.bias.copy_(m.fc.bias.flip(0))
    pre = default_preprocess("macnn", m.config)
    save_checkpoint(path, m, classes=classes[::-1] if reversed_head else classes, preprocess=pre)
    return m.eval(), pre


def kd_student(run_dir, faces, labels, **settings):
    """The final weights of one epoch of a width-0.125 MACNN at --kd-weight 1
    on ``faces`` with ``labels`` in place of their own (``settings``: the teacher)."""
    from fer_edge.training.recipes import get_recipe
    from fer_edge.training.trainer import TrainSettings, train_run

    d = faces.subset(np.arange(len(faces)))
    d.labels = labels
    s = TrainSettings(model="macnn", model_config={"width": 0.125}, classes=list(faces.classes), seed=0,
                      recipe=get_recipe("best", epochs=1, batch_size=16), kd_weight=1.0, **settings)
    train_run(s, d, None, run_dir, progress=False, log=lambda m: None)
    return load_state(run_dir / "last.safetensors")


@needs_data
def test_distillation_run_learns_from_the_teacher_not_the_labels(tiny, tmp_path):
    """With --kd-weight 1 the labels carry no gradient: permuting them leaves
    the student's weights bit for bit the same, while another teacher decides
    them.  A teacher whose classes are stored in another order maps back by name."""
    from fer_edge.checkpoint import FER2013_CLASSES
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import normalize
    from fer_edge.training.distill import Teacher

    train, _ = tiny
    data = load_dataset(train, size=48)
    classes = list(data.classes)
    m_ref, pre = save_random_teacher(tmp_path / "t1.safetensors", 1, classes)
    save_random_teacher(tmp_path / "t2.safetensors", 2, classes)
    # teacher 1 again, its head rows and class names stored in reverse order
    save_random_teacher(tmp_path / "t1r.safetensors", 1, classes, reversed_head=True)

    def student(teacher: str, labels, name: str):
        return kd_student(tmp_path / name, data, labels,
                          teacher=[{"path": str(tmp_path / t), "sha256": "-"} for t in teacher.split("+")])

    a = student("t1.safetensors", data.labels, "a")
    permuted = np.random.default_rng(0).permutation(data.labels)
    assert (permuted != data.labels).any()
    assert_same_weights(a, student("t1.safetensors", permuted, "b"))
    # the reversed teacher gives the same logits per class name (to GEMM rounding)
    x = normalize(torch.from_numpy(data.images[:32]), pre)
    t1 = Teacher(tmp_path / "t1.safetensors", classes, pre, torch.device("cpu"))
    t1r = Teacher(tmp_path / "t1r.safetensors", classes, pre, torch.device("cpu"))
    torch.testing.assert_close(t1r(x), t1(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t1(x), m_ref(x), rtol=1e-5, atol=1e-5)
    c = student("t2.safetensors", data.labels, "d")
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    # an ensemble of two teachers is a third target: neither member's student
    e = student("t1.safetensors+t2.safetensors", permuted, "e")
    for other in (a, c):
        assert any(not torch.equal(e[k], other[k]) for k in e if e[k].is_floating_point())
    # ...and, like one teacher, it alone decides the student at --kd-weight 1
    assert_same_weights(e, student("t1.safetensors+t2.safetensors", data.labels, "f"))
    assert set(classes) == set(FER2013_CLASSES)


@needs_data
def test_offline_distillation_from_stored_teacher_logits(tiny, tmp_path):
    """`fer-edge teacher-logits` stores exactly the teacher's (face + mirror)
    logits, keyed by path under --data; `train --teacher-logits` at --kd-weight 1
    learns from them alone (permuted labels: bit-identical weights; another
    teacher's logits: other weights) and records where they came from."""
    from fer_edge.checkpoint import read_meta
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import normalize
    from fer_edge.targets.bundle import sha256_file
    from fer_edge.training.distill import Teacher, read_teacher_logits

    train, val = tiny
    data = load_dataset(train, size=48)
    classes = list(data.classes)
    for seed in (1, 2):
        # stored in reverse class order: the logits file keeps the teacher's order, train maps by name
        _, pre = save_random_teacher(tmp_path / f"t{seed}.safetensors", seed, classes, reversed_head=True)
        made = run("teacher-logits", "--weights", tmp_path / f"t{seed}.safetensors", "--data", train,
                   "--out", tmp_path / f"l{seed}.safetensors")
        assert made.returncode == 0 and "face and mirror averaged" in made.stdout, made.stderr[-2000:]
    logits, info = read_teacher_logits(tmp_path / "l1.safetensors")
    assert info["classes"] == classes[::-1] and info["flip"] is True
    assert info["teacher"]["sha256"] == sha256_file(tmp_path / "t1.safetensors")
    assert sorted(info["keys"]) == sorted(str(Path(p).relative_to(train)) for p in data.sources)
    order = [info["keys"].index(str(Path(p).relative_to(train))) for p in data.sources]
    teacher = Teacher(tmp_path / "t1.safetensors", classes[::-1], pre, torch.device("cpu"))
    x = normalize(torch.from_numpy(data.images), pre)
    torch.testing.assert_close(logits[order], 0.5 * (teacher(x) + teacher(x.flip(3))), rtol=1e-5, atol=1e-5)
    # what a training step gets for a batch: its faces' rows, columns in the student's class order
    from fer_edge.training.distill import OfflineTeacher, face_keys

    offline = OfflineTeacher(tmp_path / "l1.safetensors", face_keys(data.sources, train), classes, "cpu")
    mapped = Teacher(tmp_path / "t1.safetensors", classes, pre, torch.device("cpu"))
    idx = torch.tensor([5, 0, len(data) - 1, 3])
    torch.testing.assert_close(offline(x[idx], idx), 0.5 * (mapped(x[idx]) + mapped(x[idx].flip(3))),
                               rtol=1e-5, atol=1e-5)
    again = run("teacher-logits", "--weights", tmp_path / "t1.safetensors", "--data", train,
                "--out", tmp_path / "l1.safetensors")
    assert again.returncode == 2 and "exists; pass --force" in again.stderr

    def student(logits_file: str, labels, name: str):
        return kd_student(tmp_path / name, data, labels, data={"train": str(train)},
                          teacher_logits=[{"path": str(tmp_path / logits_file), "sha256": "-"}])

    a = student("l1.safetensors", data.labels, "a")
    permuted = np.random.default_rng(0).permutation(data.labels)
    assert (permuted != data.labels).any()
    assert_same_weights(a, student("l1.safetensors", permuted, "b"))
    c = student("l2.safetensors", data.labels, "c")
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    # through the CLI: recorded in the checkpoint and the resume fingerprint
    common = [*TINY, "--data", train, "--val", val, "--epochs", "1", "--out", tmp_path / "cli"]
    ok = run("train", *common, "--teacher-logits", tmp_path / "l1.safetensors")
    assert ok.returncode == 0 and "distilling offline from" in ok.stdout, ok.stderr[-2000:]
    origin = read_meta(tmp_path / "cli" / "best.safetensors")["extra"]["distilled_from"]
    assert origin["teacher_logits"][0]["sha256"] == sha256_file(tmp_path / "l1.safetensors")
    assert origin["teacher_logits"][0]["teacher"]["sha256"] == info["teacher"]["sha256"]
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["teacher_logits"][0]["sha256"] == origin["teacher_logits"][0]["sha256"] and "teacher" not in cfg
    # two stored teachers are one ensemble: the mean of their softened predictions, as online teachers
    from fer_edge.training.distill import ensemble_logits

    pair = OfflineTeacher([tmp_path / "l1.safetensors", tmp_path / "l2.safetensors"], face_keys(data.sources, train),
                          classes, "cpu", temperature=3.0)
    single = [OfflineTeacher(tmp_path / f, face_keys(data.sources, train), classes, "cpu").logits
              for f in ("l1.safetensors", "l2.safetensors")]
    torch.testing.assert_close(pair.logits, ensemble_logits(single, 3.0))
    both = run("train", *common[:-1], tmp_path / "cli2", "--teacher-logits", tmp_path / "l1.safetensors",
               "--teacher-logits", tmp_path / "l2.safetensors")
    assert both.returncode == 0 and "2 teachers (ensemble" in both.stdout, both.stderr[-2000:]
    # bad input: one line each, nothing written
    made = run("teacher-logits", "--weights", tmp_path / "t1.safetensors", "--data", val,
               "--out", tmp_path / "lval.safetensors")
    assert made.returncode == 0, made.stderr[-2000:]
    for args, expect in [(["--teacher-logits", tmp_path / "lval.safetensors"], "no logits for"),
                         (["--teacher-logits", tmp_path / "t1.safetensors"], "not a teacher-logits file"),
                         (["--teacher-logits", tmp_path / "none.safetensors"], "cannot be read"),
                         (["--teacher-logits", tmp_path / "l1.safetensors", "--teacher", tmp_path / "t1.safetensors"],
                          "give one")]:
        p = run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", tmp_path / "bad", *args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and expect in lines[0], p.stderr
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@needs_data
def test_distillation_bad_inputs_are_one_line_errors(tiny, tmp_path):
    train, val = tiny
    teacher = tmp_path / "t" / "best.safetensors"
    assert run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--limit", "32",
               "--out", tmp_path / "t").returncode == 0
    ck = copy_subset(CKPLUS, tmp_path / "ck", 3, classes=["contempt", "happy"])

    def fails(*args, expect):
        p = run("train", *TINY, "--epochs", "1", "--out", tmp_path / "bad", *args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], p.stderr

    fer = ["--data", train, "--val", val]
    fails(*fer, "--kd-weight", "0.5", expect="need --teacher")
    fails(*fer, "--teacher", teacher, "--kd-weight", "2", expect="--kd-weight: 2 is out of range")
    fails(*fer, "--teacher", teacher, "--kd-weight", "0", expect="--kd-weight: 0 is out of range")
    fails(*fer, "--teacher", teacher, "--kd-temperature", "0", expect="--kd-temperature: 0 is out of range")
    fails(*fer, "--teacher", tmp_path / "none.safetensors", expect="no such checkpoint file")
    fails(*fer, "--teacher", teacher, "--teacher", tmp_path / "none.safetensors", expect="no such checkpoint file")
    fails(*fer, "--teacher", teacher, "--teacher", teacher, expect="given twice")
    fails("--data", ck, "--val", ck, "--teacher", teacher, expect="no contempt class")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())  # nothing half-written
    common = [*TINY, "--data", train, "--val", val, "--epochs", "1", "--limit", "32", "--out", tmp_path / "ok"]
    ok = run("train", *common, "--teacher", teacher)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "distilling from" in ok.stdout and "train form" in ok.stdout
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert len(cfg["teacher"]) == 1 and cfg["teacher"][0]["sha256"]
    assert cfg["kd_weight"] == 0.5 and cfg["kd_temperature"] == 4.0
    from fer_edge.checkpoint import read_meta

    origin = read_meta(tmp_path / "ok" / "best.safetensors")["extra"]["distilled_from"]
    assert [t["sha256"] for t in origin["teachers"]] == [cfg["teacher"][0]["sha256"]]
    assert origin["teachers"][0]["arch"] == "macnn" and origin["kd_weight"] == 0.5
    # resuming a distilled run without its teacher (or with another) is refused in one line
    p = run("train", *common, "--resume")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "'teacher' differs" in p.stderr, p.stderr
