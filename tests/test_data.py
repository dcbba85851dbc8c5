"""Dataset readers on real files from ../shared/data (and files built from them)."""
from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from fer_edge import UserError
from fer_edge.data import (
    CANONICAL_CLASSES,
    canonical_class,
    load_dataset,
    read_fer2013_csv,
    read_image_folder,
    read_rafdb,
)

_spec = importlib.util.spec_from_file_location("fer_test_helpers", Path(__file__).with_name("helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

FER = H.DATA / "fer2013"
CKPLUS = H.DATA / "ckplus48"
pytestmark = pytest.mark.skipif(not FER.is_dir() or not CKPLUS.is_dir(),
                                reason=f"real data not found under {H.DATA} (set FER_EDGE_DATA)")

# From ../shared/data/README.md
PUBLICTEST_COUNTS = {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "neutral": 607, "sad": 653,
                     "surprise": 415}
CKPLUS_COUNTS = {"angry": 135, "contempt": 54, "disgust": 177, "fear": 75, "happy": 207, "sad": 84,
                 "surprise": 249}


def small_copy(tmp_path, per_class=6, src=FER / "publictest"):
    """A small real class-folder set (first `per_class` images of each class)."""
    for d in sorted(src.iterdir()):
        (tmp_path / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:per_class]:
            shutil.copy(f, tmp_path / d.name / f.name)
    return tmp_path


def test_fer2013_folders_publictest():
    ds = read_image_folder(FER / "publictest")
    assert ds.images.dtype == np.uint8 and ds.images.shape == (3589, 48, 48)
    assert ds.classes == CANONICAL_CLASSES[:7]
    assert ds.class_counts() == {c: PUBLICTEST_COUNTS[c] for c in ds.classes}
    assert ds.subjects is None and not ds.skipped
    # pixel-exact against a direct decode of one file
    import cv2

    i = 1234
    np.testing.assert_array_equal(ds.images[i], cv2.imread(ds.sources[i], cv2.IMREAD_GRAYSCALE))


def test_ckplus_aliases_contempt_and_subjects():
    ds = load_dataset(CKPLUS)
    assert len(ds) == 981
    assert ds.classes == ["angry", "disgust", "fear", "happy", "sad", "surprise", "contempt"]
    assert ds.class_counts() == {c: CKPLUS_COUNTS[c] for c in ds.classes}
    assert ds.subjects is not None and len(set(ds.subjects)) > 100
    i = next(k for k, s in enumerate(ds.sources) if Path(s).name.startswith("S010_004_"))
    assert ds.subjects[i] == "S010"
    assert ds.classes[ds.labels[i]] == canonical_class(Path(ds.sources[i]).parent.name)


def test_fer2013_csv_matches_the_images(tmp_path):
    src = read_image_folder(small_copy(tmp_path / "imgs"))
    csv_path = tmp_path / "fer2013.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for k, (img, lab) in enumerate(zip(src.images, src.labels)):
            usage = "PublicTest" if k % 3 else "PrivateTest"
            w.writerow([int(lab), " ".join(map(str, img.ravel())), usage])
        w.writerow([3, "1 2 3", "PublicTest"])  # wrong pixel count
    pub = read_fer2013_csv(csv_path, usage="PublicTest")
    priv = read_fer2013_csv(csv_path, usage="PrivateTest")
    assert len(pub) + len(priv) == len(src)
    assert pub.skipped and "3 pixels instead of 2304" in pub.skipped[0][1]
    keep = [k for k in range(len(src)) if k % 3]
    np.testing.assert_array_equal(pub.images, src.images[keep])
    np.testing.assert_array_equal(pub.labels, src.labels[keep])  # folder order == FER2013 label order
    with pytest.raises(UserError, match="3 pixels instead of 2304"):
        read_fer2013_csv(csv_path, usage="PublicTest", strict=True)
    assert len(load_dataset(csv_path, usage="PrivateTest")) == len(priv)
    # A row of no FER2013 split is malformed whichever split is read: skipped, or an error under --strict.
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow([int(src.labels[0]), " ".join(map(str, src.images[0].ravel())), "Bogus"])
    assert len(read_fer2013_csv(csv_path, usage="PublicTest")) == len(pub)
    assert any("unknown Usage 'Bogus'" in why for _, why in read_fer2013_csv(csv_path, usage="PrivateTest").skipped)
    with pytest.raises(UserError, match="unknown Usage 'Bogus'"):
        read_fer2013_csv(csv_path, usage="PrivateTest", strict=True)


def test_rafdb_list_and_aligned_images(tmp_path):
    src = read_image_folder(small_copy(tmp_path / "imgs", per_class=3))
    root = tmp_path / "raf" / "basic"
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    raf_label = {c: i + 1 for i, c in enumerate(["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"])}
    lines = []
    for k, (path, lab) in enumerate(zip(src.sources, src.labels)):
        split = "train" if k % 2 == 0 else "test"
        name = f"{split}_{k:05d}.jpg"
        shutil.copy(path, root / "Image" / "aligned" / f"{split}_{k:05d}_aligned.jpg")
        lines.append(f"{name} {raf_label[src.classes[lab]]}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    train = read_rafdb(root, split="train")
    test = load_dataset(root, split="test")
    assert len(train) + len(test) == len(src)
    np.testing.assert_array_equal(train.images, src.images[::2])
    assert [train.classes[i] for i in train.labels] == [src.classes[i] for i in src.labels[::2]]


def test_unknown_folder_lists_known_names_unless_classes_given(tmp_path):
    root = small_copy(tmp_path / "d", per_class=2)
    (root / "happy").rename(root / "joyful-ish")
    with pytest.raises(UserError, match="unknown class folder 'joyful-ish'; known names: .*anger"):
        read_image_folder(root)
    names = sorted(p.name for p in root.iterdir())
    ds = read_image_folder(root, classes=names)
    assert ds.classes == names and len(ds) == 14


def test_corrupt_and_truncated_images_are_skipped_or_strict(tmp_path):
    root = small_copy(tmp_path / "d", per_class=3)
    (root / "fear" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = next((root / "sad").iterdir())
    (root / "sad" / "truncated.jpg").write_bytes(good.read_bytes()[:40])
    (root / "sad" / "empty.png").write_bytes(b"")
    ds = read_image_folder(root)
    assert len(ds) == 21
    assert len(ds.skipped) == 3
    with pytest.raises(UserError, match="cannot read image .*(garbage|truncated|empty)"):
        read_image_folder(root, strict=True)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="no such"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        read_image_folder(tmp_path / "e")
    (tmp_path / "e" / "happy").mkdir()
    with pytest.raises(UserError, match="hold no images"):
        read_image_folder(tmp_path / "e")


def test_resize_to_model_input():
    ds = read_image_folder(CKPLUS, size=112)
    assert ds.images.shape == (981, 112, 112)


def test_ckplus_folds_are_subject_independent():
    from fer_edge.data.folds import make_folds

    ds = load_dataset(CKPLUS)
    folds, kind = make_folds(ds, 10, seed=0)
    assert kind == "subject-grouped" and len(folds) == 10
    allidx = np.concatenate(folds)
    assert sorted(allidx.tolist()) == list(range(len(ds))), "folds partition the data"
    owner = {}
    for f, idx in enumerate(folds):
        for i in idx:
            assert owner.setdefault(ds.subjects[i], f) == f, f"subject {ds.subjects[i]} in two folds"
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= max(len([s for s in ds.subjects if s == g]) for g in set(ds.subjects))
    assert make_folds(ds, 10, seed=0)[0][3].tolist() == folds[3].tolist(), "deterministic for a seed"


def test_stratified_folds_balance_classes():
    from fer_edge.data.folds import stratified_folds

    ds = read_image_folder(FER / "publictest")
    folds = stratified_folds(ds.labels, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(ds)))
    per_class = np.array([np.bincount(ds.labels[f], minlength=7) for f in folds])
    assert (per_class.max(0) - per_class.min(0) <= 1).all()
    with pytest.raises(UserError, match="--folds 1"):
        stratified_folds(ds.labels, 1)
