"""Training at library level: metrics against independent references, the
augmentation, the learning-rate schedule and class weights, the run folder's
bookkeeping, and the head rows a fine-tuning start maps by class name.  The
shared pieces of the training tests (the tiny real data, `run`, weight
comparison) live here too, for the command-line, distillation, recipe and
HSNet tests to import."""
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
from helpers import DATA, copy_subset  # noqa: E402

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


# ------------------------------------------------------------------ run bookkeeping
def test_epochs_within_budget():
    from fer_edge.training.trainer import epochs_within_budget

    # 100 s budget, 30 s gone after 2 epochs of 10 s: 7 more fit
    assert epochs_within_budget(100, 30, 10, 2, 60) == 9
    assert epochs_within_budget(100, 30, 10, 2, 5) == 5       # never more than the cap
    assert epochs_within_budget(100, 130, 10, 2, 60) == 2     # over budget: stop here
    assert epochs_within_budget(100, 91, 10, 2, 60) == 2      # 9 s left: no whole epoch fits
    assert epochs_within_budget(100, 90, 10, 2, 60) == 3


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
    (done / "resume.safetensors").write_text("x")
    (done / "config.json").write_text("x")
    discard_failed_start(done, had_files=False)
    assert sorted(p.name for p in done.iterdir()) == ["config.json", "resume.safetensors"]


def test_the_model_choices_are_the_registered_models():
    from fer_edge import models
    from fer_edge.commands.train import MODELS

    assert sorted(MODELS) == models.list_models()


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
