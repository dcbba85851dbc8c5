"""Attacks found by reading the code adversarially, each kept as a test: outputs
that are not regular files, folders that are not runs, crafted state and
logits files, environment variables, names that print as something else.
Each must end in one clear line (or be harmless), never a traceback, a hang,
or a user's file gone."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from helpers import DATA, copy_subset, one_line_error  # noqa: E402
from helpers import run_cli as run  # noqa: E402

from fer_edge import UserError  # noqa: E402

FER = DATA / "fer2013"
posix = pytest.mark.skipif(os.name != "posix", reason="POSIX links, pipes and modes")


# ------------------------------------------------------------------ outputs that are not files
@posix
def test_force_never_turns_a_pipe_or_a_link_to_one_into_a_file(tmp_path):
    from fer_edge.fileio import write_bytes_atomic
    from fer_edge.weights import default_weights

    fifo, link = tmp_path / "fifo.safetensors", tmp_path / "link.safetensors"
    os.mkfifo(fifo)
    link.symlink_to(fifo)                      # like a link to /dev/stdout
    for out in (fifo, link):
        one_line_error(run("merge", "--weights", default_weights(), "--out", out, "--force"), "not a regular file")
    assert link.is_symlink() and not fifo.is_file()
    with pytest.raises(UserError, match="device, pipe or socket"):
        write_bytes_atomic(link, b"x", force=True)
    # a link to a regular file is replaced by the output, as before; its target stays
    target = tmp_path / "target.txt"
    target.write_text("keep")
    latest = tmp_path / "latest.json"
    latest.symlink_to(target)
    write_bytes_atomic(latest, b"{}", force=True)
    assert latest.read_bytes() == b"{}" and not latest.is_symlink() and target.read_text() == "keep"


# ------------------------------------------------------------------ run folders
def test_a_folder_of_the_users_files_is_not_a_run(tmp_path):
    from fer_edge.training.rundir import check_run_dir, discard_failed_start, killed_start

    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "config.json").write_text('{"my": 1}')                  # the user's, not a run's
    (mine / "plots" / "thesis-figure.png").write_bytes(b"png")
    assert not killed_start(mine)
    for force in (False, True):
        with pytest.raises(UserError, match="holds files but no fer-edge run"):
            check_run_dir(mine, resume=False, force=force)
    # folders named like folds but holding the user's files are not a fold run
    splits = tmp_path / "splits"
    for fold in ("fold01", "fold02"):
        (splits / fold).mkdir(parents=True)
        (splits / fold / "a.png").write_bytes(b"png")
    with pytest.raises(UserError, match="holds files but no fer-edge run"):
        check_run_dir(splits, resume=False, force=True)
    # a start killed before its first checkpoint: fer-edge's own config.json
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_text(json.dumps({"fer_edge_version": "0.1.0"}))
    (killed / "metrics.jsonl").write_text("")
    assert killed_start(killed)
    check_run_dir(killed, resume=False, force=False)
    # an empty folder the user made stays when the run fails before its first checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    discard_failed_start(empty, had_files=False, existed=True)
    assert empty.is_dir()


def test_resume_continues_the_same_kind_of_run(tmp_path):
    from fer_edge.training.rundir import RESUME_FILE, check_run_dir

    folds = tmp_path / "folds"
    (folds / "fold01").mkdir(parents=True)
    (folds / "fold01" / RESUME_FILE).write_bytes(b"x")
    with pytest.raises(UserError, match="holds a fold run; --resume continues it .*with --folds"):
        check_run_dir(folds, resume=True, force=False, folds=False)
    check_run_dir(folds, resume=True, force=False, folds=True)
    single = tmp_path / "single"
    single.mkdir()
    (single / RESUME_FILE).write_bytes(b"x")
    with pytest.raises(UserError, match="holds a single run"):
        check_run_dir(single, resume=True, force=False, folds=True)


def test_resume_state_entries_are_checked_before_they_are_used():
    from fer_edge.training.rundir import optional_resume_problem

    assert optional_resume_problem({"epochs": 60, "train_seconds": 12.5, "epochs_decided": True}) is None
    for bad in ({"epochs": "abc"}, {"epochs": None}, {"epochs": 10 ** 30}, {"epochs": True}, {"epochs": 0},
                {"train_seconds": "x"}, {"train_seconds": -1.0}, {"epochs_decided": "yes"}, {"ema": [1]}):
        assert optional_resume_problem(bad), bad


def test_same_data_named_another_way_is_the_same_data(tmp_path, monkeypatch):
    from fer_edge.training.settings import comparable_fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    fp = lambda train: comparable_fingerprint({"data": {"train": train, "val": None, "limit": 5}}, False)  # noqa
    assert fp("tiny") == fp(str(tmp_path / "tiny")) == fp("tiny/") == fp("./tiny")
    assert fp("tiny") != fp("other")


def test_training_needs_two_classes_with_faces():
    from fer_edge.commands.train import check_training_classes

    check_training_classes("d", {"happy": 3, "sad": 1})
    with pytest.raises(UserError, match="a classifier needs at least two"):
        check_training_classes("d", {"happy": 6})
    with pytest.raises(UserError, match="no usable training faces of 'sad'"):
        check_training_classes("d", {"happy": 6, "sad": 0})


# ------------------------------------------------------------------ crafted files
def test_crafted_teacher_logits_are_one_line(tmp_path):
    from safetensors.torch import save_file

    from fer_edge.training.distill import LOGITS_META_KEY, read_teacher_logits

    def write(info, name):
        path = tmp_path / name
        save_file({"logits": torch.zeros(2, 2)}, str(path), metadata={LOGITS_META_KEY: info})
        return path

    good = {"classes": ["a", "b"], "keys": ["x", "y"], "teacher": {"arch": "macnn"}}
    read_teacher_logits(write(json.dumps(good), "good.safetensors"))
    for name, info in (("listkeys", json.dumps(dict(good, keys=[["x"], ["y"]]))),
                       ("teacher", json.dumps(dict(good, teacher="abc"))),
                       ("nested", "[" * 100000 + "]" * 100000)):
        with pytest.raises(UserError, match="--teacher-logits"):
            read_teacher_logits(write(info, f"{name}.safetensors"))
    if os.name == "posix":
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(UserError, match="not a regular file"):
            read_teacher_logits(tmp_path / "fifo")


def test_stem_weights_must_be_finite_floats(tmp_path):
    from safetensors.torch import save_file

    from fer_edge.models.stem import read_stem_state

    w = torch.zeros(32, 3, 3, 3)
    save_file({"conv2d_1a.conv.weight": w}, str(tmp_path / "ok.safetensors"))
    read_stem_state(tmp_path / "ok.safetensors")
    save_file({"conv2d_1a.conv.weight": torch.full_like(w, float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="NaN"):
        read_stem_state(tmp_path / "nan.safetensors")
    save_file({"conv2d_1a.conv.weight": torch.zeros(32, 3, 3, 3, dtype=torch.int32)}, str(tmp_path / "i.safetensors"))
    with pytest.raises(ValueError, match="not floating point"):
        read_stem_state(tmp_path / "i.safetensors")


def test_a_checkpoint_input_size_must_be_square():
    from fer_edge.checkpoint import check_preprocess

    pre = {"input_size": [48, 48], "scale": 1 / 255, "mean": 0.5, "std": 0.5, "gray": True}
    check_preprocess(pre)
    with pytest.raises(ValueError, match="must be square"):
        check_preprocess(dict(pre, input_size=[32, 1024]))


def test_a_width_that_leaves_no_channels_is_refused():
    from fer_edge import models

    with pytest.raises(ValueError, match="fewer than 4 channels"):
        models.create("hsnet-lite", width=0.01)


def test_keygen_never_leaves_half_a_pair(tmp_path):
    from fer_edge.converters import keys

    private, public = keys.keygen(tmp_path / "k")
    old = private.read_bytes(), public.read_bytes()
    real_replace = os.replace
    for failing in (private, public):             # whichever rename fails: the old pair, whole
        def failing_replace(src, dst, failing=failing):
            if Path(dst) == failing:
                raise PermissionError(1, "Operation not permitted")
            return real_replace(src, dst)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(keys.os, "replace", failing_replace)
            with pytest.raises(UserError):
                keys.keygen(tmp_path / "k", force=True)
        assert (private.read_bytes(), public.read_bytes()) == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.pub"]
    # into a folder that is not there yet
    assert all(p.is_file() for p in keys.keygen(tmp_path / "new" / "sub" / "k"))


# ------------------------------------------------------------------ environment and printing
def test_garbage_torchrun_variables_are_one_line(monkeypatch):
    from fer_edge.training.distributed import context_from_env

    for env in ({"WORLD_SIZE": "abc"}, {"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "5"},
                {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}):
        with monkeypatch.context() as m:
            for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
                m.delenv(k, raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(UserError):
                context_from_env()


def test_class_names_are_shown_as_text_not_math(tmp_path):
    from fer_edge.plots import plot_confusion, plot_roc

    classes = [r"$\foo$", "b"]
    plot_confusion(np.array([[3, 1], [0, 4]]), classes, tmp_path / "c.png")
    plot_roc({c: ([0, 1], [0, 1]) for c in classes}, {c: 0.5 for c in classes}, tmp_path / "r.png")
    plot_confusion(np.eye(300, dtype=int), [str(i) for i in range(300)], tmp_path / "big.png")
    assert all((tmp_path / f).stat().st_size > 0 for f in ("c.png", "r.png", "big.png"))


@pytest.mark.skipif(not FER.is_dir(), reason=f"real data not found at {DATA}")
@posix
def test_names_with_newlines_and_bad_opencv_limits(tmp_path):
    faces = copy_subset(FER / "publictest", tmp_path / "faces", 2)
    (faces / "happy" / "b\nerror: injected.jpg").write_bytes(b"not an image")
    proc = run("eval", "--data", faces, "--strict", "--no-progress")
    one_line_error(proc, "b\\nerror: injected.jpg")
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="abc")
    (faces / "happy" / "b\nerror: injected.jpg").unlink()
    import subprocess

    from helpers import SCRIPT

    proc = subprocess.run([str(SCRIPT), "eval", "--data", str(faces)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "accuracy" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.skipif(not FER.is_dir(), reason=f"real data not found at {DATA}")
def test_an_interrupted_folder_run_leaves_no_saved_images(tmp_path):
    from fer_edge.targets.sources import Sink, Source

    faces = copy_subset(FER / "publictest", tmp_path / "faces", 5, classes=("happy",)) / "happy"
    source = Source(str(faces))
    out = tmp_path / "annotated"
    sink = Sink(out, source)
    for index, t, frame, name in source:
        sink.write(frame, name)
    assert len(list(out.iterdir())) == 5
    sink.close(ok=False)                                    # Ctrl-C or an error mid-folder
    assert not out.exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("mine")
    sink = Sink(keep, source, force=True)
    for index, t, frame, name in source:
        sink.write(frame, name)
    sink.close(ok=False)
    assert [p.name for p in keep.iterdir()] == ["mine.txt"]


def test_an_empty_output_name_is_not_the_current_folder(tmp_path):
    from fer_edge.weights import default_weights

    for cmd in (["train", "--data", tmp_path, "--out", ""], ["merge", "--weights", default_weights(), "--out", ""],
                ["convert", "--target", "onnx", "--out", ""]):
        one_line_error(run(*cmd, cwd=tmp_path), "--out: give a")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not FER.is_dir(), reason=f"real data not found at {DATA}")
def test_native_decoders_print_nothing_of_their_own(tmp_path):
    """libpng writes "libpng error: Not enough image data" straight to stderr;
    fer-edge says it once, in its own line."""
    import struct
    import zlib

    from helpers import png_chunk

    faces = copy_subset(FER / "publictest", tmp_path / "faces", 2, classes=("happy", "sad"))
    ihdr = struct.pack(">IIBBBBB", 48, 48, 8, 0, 0, 0, 0)
    one_row = zlib.compress(b"\x00" + b"\x80" * 48)
    (faces / "happy" / "short.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                                                + png_chunk(b"IDAT", one_row) + png_chunk(b"IEND", b""))
    one_line_error(run("eval", "--data", faces, "--strict", "--no-progress"), "short.png: corrupt or truncated")
    proc = run("eval", "--data", faces, "--no-progress")
    assert proc.returncode == 0 and "libpng" not in proc.stderr and "1 skipped" in proc.stderr, proc.stderr


def test_options_that_do_not_apply_are_said_not_ignored(tmp_path):
    rows = ["emotion,pixels,Usage"] + [f"{e},{' '.join(['128'] * 2304)},PublicTest" for e in (3, 4, 3, 4)]
    csv = tmp_path / "fer.csv"
    csv.write_text("\n".join(rows) + "\n")
    proc = run("eval", "--data", csv, "--classes", "happy,sad", "--no-progress")
    assert proc.returncode == 0 and "note: --classes applies to class folders" in proc.stderr, proc.stderr
    if os.name == "posix":
        os.mkfifo(tmp_path / "pipe")
        one_line_error(run("eval", "--data", tmp_path / "pipe", "--no-progress"), "not a regular file or a folder")


def test_a_model_that_is_not_yunet_is_one_line(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx makes the stand-in model")
    from onnx import TensorProto, helper

    # like a 48x48 expression classifier given by mistake: OpenCV fails on its shapes, loudly
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 48, 48])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2304])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 2304])
    model = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y],
                                                initializer=[shape]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "notyunet.onnx"))
    import cv2

    img = tmp_path / "face.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))
    one_line_error(run("predict", img, "--detector", "yunet", "--yunet-model", tmp_path / "notyunet.onnx"),
                   "not a YuNet model")
