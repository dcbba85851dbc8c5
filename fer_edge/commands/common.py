"""Pieces several commands share: argparse types and checks that run before
any work (torch-free: building the parser must not import torch)."""
from __future__ import annotations

import argparse
from pathlib import Path

from fer_edge import UserError
from fer_edge.fileio import check_writable_parent, os_error_line, refuse_existing, refuse_special, shown

# Rows of a FER2013 CSV (its Usage column).
FER2013_USAGES = ("Training", "PublicTest", "PrivateTest")
MAX_CLASSES = 1000


def class_list(text: str) -> list[str]:
    """argparse type of --classes: comma-separated, distinct, non-empty names."""
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty class name (give NAME,NAME,...)")
    if len(set(names)) < len(names):
        dup = next(c for c in names if names.count(c) > 1)
        raise argparse.ArgumentTypeError(f"{text!r}: class {dup!r} is given twice")
    if len(names) > MAX_CLASSES:
        raise argparse.ArgumentTypeError(f"{len(names)} classes: at most {MAX_CLASSES}")
    return names


class_list.__name__ = "class list"


def add_classes_option(p, what: str = "for folders that are not expression names") -> None:
    p.add_argument("--classes", type=class_list, metavar="NAME,NAME,...",
                   help=f"comma-separated class names, {what}")


def add_device_option(p, note: str = "") -> None:
    from fer_edge import argtypes

    p.add_argument("--device", default="cpu", type=argtypes.device_name,
                   help=f"cpu, cuda, cuda:N or auto (default cpu{note})")


def add_strict_option(p) -> None:
    p.add_argument("--strict", action="store_true",
                   help="an unreadable image or malformed CSV row is an error, not a skip")


def add_progress_option(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def check_output_file(path, force: bool, what: str = "--out") -> Path:
    """An output file: refused if it exists without --force, or cannot be written (checked before any work;
    names the file system refuses are one line from fer_edge.fileio already)."""
    if not str(path).strip():   # Path("") is the current folder: never what an empty argument meant
        raise UserError(f"{what}: give a file name")
    path = check_writable_parent(path, what)
    refuse_special(path, what)
    refuse_existing(path, force, what)
    return path


def check_plots_folder(path, force: bool, what: str = "--plots") -> Path:
    """A folder of plots: its place must be writable; plots already there need --force."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{what} {path} is a file, not a folder")
        check_writable_parent(path / "confusion.png", what)
        if path.is_dir() and any(path.glob("*.png")) and not force:
            raise UserError(f"{path} already holds plots; pass --force to overwrite them")
    except OSError as exc:  # a name the file system refuses (too long, ...), an unreadable folder
        raise UserError(os_error_line(exc, path)) from None
    return path


def _resolved(path) -> Path | None:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a loop of links, a name the OS refuses
        return None


def _paths(value) -> list:
    """A flag's value as a list of paths (options like --teacher repeat)."""
    return [value] if isinstance(value, (str, Path)) else [v for v in (value or []) if v]


def check_outputs_spare_inputs(outputs: dict, inputs: dict, replaced: tuple[str, ...] = ()) -> None:
    """No output may destroy what the command reads or another output: overwrite
    an input (``--out`` equal to ``--weights``, ``--json`` equal to a data CSV),
    land inside an input folder (``--json BUNDLE/manifest.json``, a run folder
    inside the class folders of ``--data``), or, for an output folder of
    ``replaced`` (a run --force starts over), hold an input (``--init
    RUN/best.safetensors``); two outputs may not be one path or one inside the
    other.  Flag -> path, list of paths or None."""
    ins = [(flag, path, _resolved(path)) for flag, value in inputs.items() for path in _paths(value)]
    outs = [(flag, out, _resolved(out)) for flag, out in outputs.items() if out]
    for out_flag, out, target in outs:
        if target is None:
            continue
        for in_flag, path, src in ins:
            if src is None:
                continue
            if out_flag in replaced and (src == target or target in src.parents):
                raise UserError(f"{in_flag} {path} lies inside {out_flag} {out}, which --force replaces; "
                                "copy it elsewhere first")
            inside = src in target.parents
            if target == src or inside:
                raise UserError(f"{out_flag} {out} {'lies inside' if inside else 'is'} {in_flag} {path}, which "
                                "this command reads; write it somewhere else")
    for i, (flag_a, a, ra) in enumerate(outs):
        for flag_b, b, rb in outs[i + 1:]:
            if ra is not None and rb is not None and (ra == rb or ra in rb.parents or rb in ra.parents):
                raise UserError(f"{flag_a} {a} and {flag_b} {b} {'are one path' if ra == rb else 'overlap'}: "
                                "give each output its own place")


def report_skipped(name, dataset, log) -> None:
    """One warning for the items the data reader skipped (unreadable images, malformed rows)."""
    if getattr(dataset, "skipped", None):
        src, why = dataset.skipped[0]
        log(f"warning: {shown(name)}: {dataset.skip_summary()}; first: {shown(src)}: {shown(why)}; --strict makes "
            "this an error")
