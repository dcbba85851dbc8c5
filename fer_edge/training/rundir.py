"""The run folder: what a run writes (config.json, metrics.jsonl,
resume.safetensors, summary.json, checkpoints) and how it is checked,
cleared, read back.

Every file is written atomically (``fer_edge.fileio``); the resume state is a
safetensors file with its structure as JSON (``fer_edge.statefile``: nothing
is unpickled to read it) and is checked for the structure the loop needs, so
a damaged one is one line, not a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fer_edge import UserError
from fer_edge.fileio import check_writable_folder, check_writable_parent, os_error_line, write_atomic, write_json_atomic

RESUME_FILE = "resume.safetensors"
# Older fer-edge versions pickled the resume state: never read, removed by --force.
LEGACY_RESUME_FILE = "resume.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FOLDS_FILE = "folds.json"
# Files a run creates; --force removes exactly these (never the user's other files).
RUN_FILES = (RESUME_FILE, LEGACY_RESUME_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "best.safetensors",
             "last.safetensors", "val_eval.json", FOLDS_FILE)
RUN_FOLDERS = ("plots", "fold[0-9][0-9]")
# What the resume file must hold, and of which type, for the loop to continue from it.
RESUME_KEYS = {"epoch": int, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": list,
               "best_acc": (int, float), "best_epoch": int, "fingerprint": dict}


# With --force, the old run's files wait here (inside the run folder) until the
# new run completes; a new run that fails before its first checkpoint puts them back.
REPLACED = ".replaced"
# What a run writes before its first checkpoint: a folder holding only these is
# a start that was killed (kill -9), and the next run into it starts afresh.
START_FILES = {CONFIG_FILE, METRICS_FILE}


def has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != REPLACED for p in folder.iterdir())


def resumable(run_dir: Path) -> bool:
    """Whether the folder holds a run that --resume can continue (its own or a fold's resume file)."""
    return (run_dir / RESUME_FILE).is_file() or is_fold_folder(run_dir / "fold01")


def is_fold_folder(folder: Path) -> bool:
    """A fold of a fold run (fer-edge's config, resume file or summary in it), not a user's folder of that name."""
    return folder.is_dir() and ((folder / RESUME_FILE).is_file() or (folder / SUMMARY_FILE).is_file()
                                or own_config(folder))


def own_config(run_dir: Path) -> bool:
    """config.json is one a fer-edge run wrote, not a file of the user's with that name."""
    try:
        data = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "fer_edge_version" in data


def is_run(run_dir: Path) -> bool:
    """The folder holds a fer-edge run (a single run or a fold run, complete or not)."""
    return (own_config(run_dir) or resumable(run_dir) or (run_dir / REPLACED).is_dir()
            or (run_dir / LEGACY_RESUME_FILE).is_file())


def killed_start(run_dir: Path) -> bool:
    """A run killed before its first checkpoint: nothing in the folder but what a
    start writes, and its config.json is fer-edge's (a user's own config.json is not)."""
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    return (CONFIG_FILE in names and names <= START_FILES and not (run_dir / REPLACED).exists()
            and own_config(run_dir))


def check_run_dir(run_dir: Path, resume: bool, force: bool, folds: bool | None = None) -> None:
    """Refuse, before any input is read, a run folder that cannot be used:
    one that cannot be written, a run that would be clobbered unasked
    (--resume continues it, --force starts over), a folder of other files
    (--force replaces a run, never the user's files), or nothing to resume
    (folds: whether the run to resume is a fold run; None: either)."""
    try:
        _check_run_dir(run_dir, resume, force, folds)
    except OSError as exc:  # a name the file system refuses (too long, ...), an unreadable folder
        raise UserError(os_error_line(exc, run_dir)) from None


def _check_run_dir(run_dir: Path, resume: bool, force: bool, folds: bool | None = None) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    if not run_dir.is_dir():
        check_writable_parent(run_dir, "--out")
    else:
        check_writable_folder(run_dir, "--out")
    if resume:
        if killed_start(run_dir):
            raise UserError(f"{run_dir}: that run stopped before its first checkpoint, so there is nothing to "
                            "resume; start it again without --resume")
        if not resumable(run_dir):
            if (run_dir / LEGACY_RESUME_FILE).is_file():
                raise UserError(f"{run_dir}: its {LEGACY_RESUME_FILE} comes from an older fer-edge, which pickled "
                                "it, and fer-edge never unpickles a file; start the run again (--force)")
            raise UserError(f"{run_dir}: nothing to resume (no {RESUME_FILE}); start without --resume")
        fold_run = is_fold_folder(run_dir / "fold01")
        if folds is not None and folds != fold_run:
            raise UserError(f"{run_dir} holds a {'fold' if fold_run else 'single'} run; --resume continues it with "
                            f"the same kind of command ({'with' if fold_run else 'without'} --folds)")
        return
    if (run_dir / REPLACED).exists() and not force:
        raise UserError(f"{run_dir} holds a run set aside by an interrupted --force run ({REPLACED}); pass "
                        "--force to start over (it goes when the new run completes), or move it out first")
    if has_files(run_dir) and not killed_start(run_dir) and not is_run(run_dir):
        raise UserError(f"{run_dir} holds files but no fer-edge run; a run goes into an empty or new folder "
                        "(--force replaces only a run): give another --out")
    if has_files(run_dir) and not force and not killed_start(run_dir):
        raise UserError(f"{run_dir} exists and is not empty; pass --resume to continue that run "
                        "or --force to start over")


def run_entries(run_dir: Path) -> list[Path]:
    """What a run wrote in its folder (the user's other files are never touched)."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    for pattern in RUN_FOLDERS:
        found += [sub for sub in sorted(run_dir.glob(pattern))
                  if sub.is_dir() and (pattern == "plots" or is_fold_folder(sub))]
    return found


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, main: bool) -> None:
    """Once every input is valid: --force sets the old run's files aside (only
    those a run writes; they go when the new run completes, see finish_run_dir),
    a killed start's files go, and the folder is made."""
    if not main or resume:
        return
    check_run_dir(run_dir, resume, force)
    try:
        if killed_start(run_dir):
            remove_run_files(run_dir)
        elif force and has_files(run_dir):
            set_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(os_error_line(exc, run_dir)) from None


def set_aside(run_dir: Path) -> None:
    """Move the old run's files into REPLACED.  When REPLACED is already there (a
    forced run that was killed after a checkpoint), it holds the last complete
    run: it stays, and the killed replacement's files are the ones dropped."""
    aside = run_dir / REPLACED
    if aside.is_dir():
        remove_run_files(run_dir)
        return
    aside.mkdir()
    for entry in run_entries(run_dir):
        os.replace(entry, aside / entry.name)


def remove_run_files(run_dir: Path) -> None:
    for entry in run_entries(run_dir):
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def finish_run_dir(run_dir: Path) -> None:
    """The new run is complete: the run it replaced (if any) goes now."""
    shutil.rmtree(run_dir / REPLACED, ignore_errors=True)


def discard_failed_start(run_dir: Path, had_files: bool, existed: bool = False) -> None:
    """A run that failed before its first checkpoint leaves nothing behind
    (else the corrected command would be refused as clobbering a run): its
    files go, the run it was replacing comes back, and the folder goes too
    when this run made it (existed: the folder was there before)."""
    if resumable(run_dir) or not run_dir.is_dir():
        return
    remove_run_files(run_dir)
    aside = run_dir / REPLACED
    if aside.is_dir():
        for entry in aside.iterdir():
            os.replace(entry, run_dir / entry.name)
        aside.rmdir()
    if not had_files and not existed and not any(run_dir.iterdir()):
        run_dir.rmdir()


# ----------------------------------------------------------------- writing
def write_resume_state(path: Path, state: dict) -> None:
    from fer_edge.statefile import write_state

    write_state(path, state)


def write_config(run_dir: Path, config: dict) -> None:
    write_json_atomic(run_dir / CONFIG_FILE, config, force=True)


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json_atomic(run_dir / SUMMARY_FILE, summary, force=True)


def append_metrics(run_dir: Path, row: dict) -> None:
    path = run_dir / METRICS_FILE
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise UserError(os_error_line(exc, path)) from None


def write_json_lines(path: Path, rows: list[dict]) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)), force=True)


# ----------------------------------------------------------------- reading
def parse_metrics_line(line: str) -> dict | None:
    """One epoch's row, or None for a line that is not one (cut short by a crash, edited by hand)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("epoch"), int) or isinstance(row["epoch"], bool):
        return None
    return row


def read_rows(path: Path, log=None) -> list[dict]:
    """The epochs' rows of metrics.jsonl; lines that are not rows are skipped
    with one warning through ``log`` (they are only a record: the run's state is the resume file)."""
    if not path.is_file():
        return []
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = [parse_metrics_line(line) for line in lines]
    bad = sum(r is None for r in rows)
    if bad and log is not None:
        log(f"warning: {path}: skipped {bad} line(s) that are not epoch records")
    return [r for r in rows if r is not None]


def truncate_metrics(path: Path, epoch: int, log=None) -> None:
    """Drop lines of epochs after the checkpoint (written before a crash, redone now) and unreadable ones."""
    write_json_lines(path, [r for r in read_rows(path, log) if r["epoch"] <= epoch])


def read_resume_state(path: Path) -> dict:
    """The resume file as the loop needs it, or one UserError line: unreadable,
    truncated, not a resume file, or missing what the loop restores."""
    from fer_edge.statefile import StateFileError, read_state

    try:
        state = read_state(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except StateFileError as exc:
        raise UserError(f"{path}: not a readable resume file: {exc}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a fer-edge resume file (holds a {type(state).__name__})")
    for key, kind in RESUME_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise UserError(f"{path}: not a fer-edge resume file ('{key}' is missing or of the wrong type)")
    if state["epoch"] < 1 or not all(isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor)
                                     for r in state["rng"]) or not state["rng"]:
        raise UserError(f"{path}: damaged resume file (epoch {state['epoch']}, {len(state['rng'])} RNG states)")
    problem = optional_resume_problem(state)
    if problem:
        raise UserError(f"{path}: damaged resume file ({problem})")
    return state


MAX_RESUME_EPOCHS = 100_000   # what --epochs allows
MAX_RESUME_SECONDS = 10 * 365 * 86400.0


def optional_resume_problem(state: dict) -> str | None:
    """What is wrong with the resume file's optional entries (None: nothing):
    each is checked like the required ones, so a crafted file cannot make the
    loop crash or train for ever."""
    def number(x, lo, hi, integer=False):
        ok = isinstance(x, int) if integer else isinstance(x, (int, float))
        return ok and not isinstance(x, bool) and lo <= x <= hi

    if "epochs" in state and not number(state["epochs"], 1, MAX_RESUME_EPOCHS, integer=True):
        return f"'epochs' must be a whole number from 1 to {MAX_RESUME_EPOCHS}"
    if "train_seconds" in state and not number(state["train_seconds"], 0, MAX_RESUME_SECONDS):
        return "'train_seconds' must be a number of seconds from 0"
    if "epochs_decided" in state and not isinstance(state["epochs_decided"], bool):
        return "'epochs_decided' must be true or false"
    if "ema" in state and not isinstance(state["ema"], dict):
        return "'ema' must be a weight average's state"
    return None


def restore(path: Path, what: str, load_fn, value) -> None:
    """``load_fn(value)`` (a load_state_dict), a mismatch as one line naming the part of the resume file."""
    try:
        load_fn(value)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: its {what} state does not fit this run: {first[:200]}") from None
