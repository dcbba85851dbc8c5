"""`fer-edge predict` as a user runs it: its flags, and hostile input
(decompression bombs, truncated or foreign files, impossible arguments,
outputs that cannot be written or fail half-way), each refused in one line
with nothing written, or skipped and counted in a folder of images."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import jpeg_declaring, one_line_error, png_bomb  # noqa: E402
from helpers import run_cli as run  # noqa: E402
from test_camera import needs_data, skimage_bgr  # noqa: E402


# ------------------------------------------------------------------ the command
@needs_data
def test_predict_flags(tmp_path):
    import cv2

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), skimage_bgr("astronaut"))
    proc = run("predict", img, "--min-confidence", "0.999")
    assert proc.returncode == 0, proc.stderr
    assert "a.png [0]: #1 uncertain" in proc.stdout and "detector blazeface-full" in proc.stdout
    proc = run("predict", img, "--detector", "blazeface-short", "--align", "--min-face", "40")
    assert proc.returncode == 0 and "a.png [0]: #1 " in proc.stdout and "blazeface-short" in proc.stdout
    proc = run("predict", img, "--detector", "haar")
    assert proc.returncode == 0 and "a.png [0]: #1 " in proc.stdout
    one_line_error(run("predict", img, "--detector", "nope"), "invalid choice: 'nope'")
    one_line_error(run("predict", img, "--detector", "yunet"), "needs --yunet-model")
    one_line_error(run("predict", img, "--min-confidence", "2"), "--min-confidence")
    one_line_error(run("predict", img, "--det-threshold", "1.5"), "--det-threshold")
    one_line_error(run("predict", img, "--track-gap", "soon"), "--track-gap")
    one_line_error(run("predict", img, "--min-face", "0"), "--min-face")


# ------------------------------------------------------------------ hostile input
BAD_IMAGES = {"bomb.png": png_bomb(100_000, 100_000), "bomb.jpg": jpeg_declaring(60_000, 60_000),
              "truncated.png": png_bomb(48, 48)[:30], "text.png": b"not an image", "empty.jpg": b""}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A real photograph, a folder of unusable images beside it, and a file where a folder should be."""
    import cv2

    root = tmp_path_factory.mktemp("hostile")
    cv2.imwrite(str(root / "a.png"), skimage_bgr("astronaut"))
    for folder in ("bad", "mixed"):
        (root / folder).mkdir()
        for name, data in BAD_IMAGES.items():
            (root / folder / name).write_bytes(data)
    cv2.imwrite(str(root / "mixed" / "z.png"), skimage_bgr("astronaut"))
    (root / "nothing").mkdir()
    (root / "nothing" / "notes.txt").write_text("no images here")
    (root / "afile").write_text("a file, not a folder")
    for name, data in BAD_IMAGES.items():
        (root / name).write_bytes(data)
    # An ONNX model that loads (any ONNX does) but is not YuNet: one ReLU.
    import onnx
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, "h", "w"]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", io[:1], io[1:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(root / "relu.onnx"))
    return root


def weights_args():
    from fer_edge.checkpoint import weights_or_default

    return ["--weights", str(weights_or_default(None))]   # explicit: no note about the default model


# (arguments, what the one error line says); {r} is the fixture folder.
HOSTILE_PREDICT = [
    (["{r}/bomb.png"], "declares 100000 x 100000 pixels"),
    (["{r}/bomb.jpg"], "declares 60000 x 60000 pixels"),
    (["{r}/truncated.png"], "corrupt or truncated"),
    (["{r}/text.png"], "not an image"),
    (["{r}/empty.jpg"], "empty file"),
    (["{r}/nothing"], "no images in this folder"),
    (["{r}/missing.png"], "no such file"),
    (["{r}/afile"], "cannot read this video"),
    ([""], "give an image"),
    (["/dev/zero"], "not a regular file"),
    (["7"], "camera 7 does not open"),
    (["99999999999"], "give an index from 0 to 1023"),
    (["{r}/a.png", "--max-frames", "-1"], "--max-frames"),
    (["{r}/a.png", "--max-frames", "0"], "--max-frames"),
    (["{r}/a.png", "--margin", "nan"], "--margin"),
    (["{r}/a.png", "--margin", "5"], "--margin"),
    (["{r}/a.png", "--temperature", "0"], "--temperature"),
    (["{r}/a.png", "--det-threads", "0"], "--det-threads"),
    (["{r}/a.png", "--min-face", "99999999999"], "--min-face"),
    (["{r}/a.png", "--min-confidence", "-0.1"], "--min-confidence"),
    (["{r}/a.png", "--det-threshold", "inf"], "--det-threshold"),
    (["{r}/a.png", "--track-gap", "-3"], "--track-gap"),
    (["{r}/a.png", "--track-gap", "infs"], "--track-gap"),
    (["{r}/a.png", "--backend", "gpu"], "invalid choice"),
    (["{r}/a.png", "--detector", "nope"], "invalid choice"),
    (["{r}/a.png", "--save", "{r}/out.xyz"], "no image encoder for .xyz"),
    (["{r}/a.png", "--save", "{r}/out"], "no image encoder"),
    (["{r}/a.png", "--save", "{r}/afile/out.png"], "is a file, not a folder"),
    (["{r}/a.png", "--jsonl", "{r}/afile/events.jsonl"], "is a file, not a folder"),
    (["{r}/a.png", "--jsonl", "{r}/nothing"], "is a folder"),
    (["{r}/a.png", "--jsonl", "/dev/full", "--force"], "not a regular file"),
    (["{r}/a.png", "--jsonl", "{r}/a.png", "--force"], "is the source"),
    (["{r}/a.png", "--jsonl", "{r}/e.jsonl", "--save", "{r}/e.jsonl"], "are one path"),
    (["{r}/a.png", "--save", "{r}/afile"], "exists; pass --force"),
    (["{r}/bad", "--save", "{r}/afile"], "a folder of images is saved into a folder"),
    (["{r}/bad", "--save", "{r}/mixed"], "not empty; pass --force"),
    (["{r}/a.png", "--save", "{r}/out.png", "--jsonl", "{r}/afile"], "exists; pass --force"),
    (["{r}/a.png", "--yunet-model", "{r}/a.png"], "applies to --detector yunet"),
    (["{r}/a.png", "--detector", "yunet", "--yunet-model", "{r}/a.png"], "not a YuNet model"),
    (["{r}/a.png", "--detector", "yunet", "--yunet-model", "{r}/missing.onnx"], "not found"),
    (["{r}/a.png", "--detector", "yunet", "--yunet-model", "{r}/relu.onnx"], "not a YuNet model"),
    (["{r}/mixed", "--save", "{r}/mixed/annotated"], "lies inside the source"),
    (["{r}/a.png", "--bundle", "{r}/bad"], "{r}/bad"),
    (["{r}/a.png", "--bundle", "{r}/missing"], "{r}/missing"),
    (["{r}/a.png", "--weights", "{r}/text.png"], "not a readable safetensors checkpoint"),
    (["{r}/a.png", "--weights", "{r}/missing.safetensors"], "no such checkpoint file"),
    (["{r}/a.png", "--bundle", "{r}/bad", "--weights", "{r}/a.png"], "not both"),
    (["{r}/a.png", "--trust", "{r}/a.png"], "--trust applies to --bundle"),
    (["{r}/a.png", "--backend", "tflite"], "--backend applies to --bundle"),
]


@pytest.mark.parametrize("args, expect", HOSTILE_PREDICT, ids=[" ".join(a) for a, _ in HOSTILE_PREDICT])
def test_hostile_predict_arguments_are_one_line(hostile, args, expect):
    """The real command: exit 2, exactly one stderr line naming the problem, no
    traceback, and nothing written: every check runs before any frame."""
    before = sorted(p.relative_to(hostile) for p in hostile.rglob("*"))
    proc = run("predict", *(a.format(r=hostile) for a in args))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    one_line_error(proc, expect.format(r=hostile))
    assert proc.stdout == ""
    assert sorted(p.relative_to(hostile) for p in hostile.rglob("*")) == before


def test_unusable_images_of_a_folder_are_skipped_and_counted(hostile, tmp_path):
    proc = run("predict", hostile / "mixed", "--jsonl", tmp_path / "e.jsonl", *weights_args())
    assert proc.returncode == 0, proc.stderr
    assert "z.png [0]: #1 " in proc.stdout and "1 frames, 1 faces" in proc.stdout
    assert f"skipped {len(BAD_IMAGES)} image(s)" in proc.stderr and "Traceback" not in proc.stderr
    assert [json.loads(x)["source"] for x in (tmp_path / "e.jsonl").read_text().splitlines()] == ["z.png"]
    # a folder where no image can be used: one line, and no (empty) events file
    proc = run("predict", hostile / "bad", "--jsonl", tmp_path / "none.jsonl", *weights_args())
    one_line_error(proc, "no images in this folder")
    assert not (tmp_path / "none.jsonl").exists()


def test_image_headers_are_read_without_decoding(tmp_path):
    """Every format the sources read gives its size from the header (a 512 x 300
    crop: width and height are not swapped); bombs are refused undecoded."""
    import cv2

    from fer_edge.targets.images import image_problem, image_size, read_image

    img = np.ascontiguousarray(skimage_bgr("astronaut")[:300])
    for name, params in (("a.jpg", []), ("a.png", []), ("a.bmp", []), ("a.tif", []), ("a.webp", []),
                         ("lossless.webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), ("a.ppm", []), ("a.pgm", [])):
        assert cv2.imwrite(str(tmp_path / name), img[:, :, 0] if name.endswith("pgm") else img, params)
        assert image_size(tmp_path / name) == (512, 300), name
        frame, problem = read_image(tmp_path / name)
        assert problem is None and frame.shape[:2] == (300, 512), name
    (tmp_path / "bomb.png").write_bytes(png_bomb(100_000, 100_000))
    assert "not decoded" in image_problem(tmp_path / "bomb.png")
    frame, problem = read_image(tmp_path / "bomb.png")
    assert frame is None and "100000 x 100000" in problem


@pytest.mark.parametrize("args", [["--jsonl", "events.jsonl"], ["--save", "annotated.mp4"],
                                  ["--save", "annotated.avi"]])
def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(tmp_path, args):
    """A file size limit (as a full disk would) stops the events or the video
    half-way: one line, exit 2, and neither the output nor a temp file is left."""
    import subprocess

    import cv2

    from helpers import SCRIPT

    video = tmp_path / "in" / "clip.avi"
    video.parent.mkdir()
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (512, 512))
    for _ in range(6):
        w.write(skimage_bgr("astronaut"))
    w.release()
    out = tmp_path / "out"
    out.mkdir()

    argv = [str(SCRIPT), "predict", str(video), "--quiet", "--no-progress", *weights_args(), args[0],
            str(out / args[1])]
    # The limit is set by the shell (ulimit -f 1: 512 bytes), not by a preexec_fn: forking
    # this multi-threaded test process to run Python code in the child can deadlock.
    proc = subprocess.run(["bash", "-c", 'ulimit -f 1 && exec "$@"', "bash", *argv], capture_output=True,
                          text=True, timeout=600)
    one_line_error(proc, f"cannot write {out / args[1]}")
    assert proc.returncode == 2 and list(out.iterdir()) == []


def test_progress_lines_for_a_folder_unless_no_progress(hostile):
    proc = run("predict", hostile / "mixed", "--quiet", *weights_args())
    assert proc.returncode == 0 and "predict: image 1/1" in proc.stderr, proc.stderr
    proc = run("predict", hostile / "mixed", "--quiet", "--no-progress", *weights_args())
    assert proc.returncode == 0 and "predict: image" not in proc.stderr, proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_work(hostile, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(run("predict", hostile / "a.png", "--save", ro / "a.png"), "cannot write into")
        one_line_error(run("predict", hostile / "a.png", "--jsonl", ro / "e.jsonl"), "cannot write into")
    finally:
        ro.chmod(0o755)
