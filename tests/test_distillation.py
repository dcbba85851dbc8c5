"""Knowledge distillation: the loss and the teacher ensemble against their
definitions, teacher classes mapped by name, real (tiny) CPU runs that learn
from a teacher or from its stored logits (`fer-edge teacher-logits`) and not
from the labels, and the bad inputs of `fer-edge train --teacher`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import copy_subset  # noqa: E402
from test_training import CKPLUS, TINY, assert_same_weights, load_state, needs_data, run, tiny  # noqa: E402,F401


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


def test_stored_logits_must_have_one_column_per_class(tmp_path):
    """A logits file whose columns do not match its own class list (edited, or
    written by something else) is one line, not an index error mid-training."""
    import json as _json

    from safetensors.torch import save_file

    from fer_edge import UserError
    from fer_edge.training.distill import LOGITS_META_KEY, read_teacher_logits

    info = {"keys": ["a", "b", "c"], "classes": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]}
    save_file({"logits": torch.zeros(3, 5)}, str(tmp_path / "t.safetensors"),
              metadata={LOGITS_META_KEY: _json.dumps(info)})
    with pytest.raises(UserError, match="3 keys and 7 classes"):
        read_teacher_logits(tmp_path / "t.safetensors")
    save_file({"logits": torch.zeros(3, 7)}, str(tmp_path / "ok.safetensors"),
              metadata={LOGITS_META_KEY: _json.dumps(info)})
    assert read_teacher_logits(tmp_path / "ok.safetensors")[0].shape == (3, 7)
