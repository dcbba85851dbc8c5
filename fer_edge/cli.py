"""The ``fer-edge`` command line.

Every sub-command is a function ``cmd_<name>(args) -> int`` registered in
``COMMANDS``; errors the user can fix are raised as ``fer_edge.UserError`` and
printed as one line on stderr with a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from fer_edge import NOTES, UserError, __version__


def cmd_info(args: argparse.Namespace) -> int:
    from fer_edge import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_text(data))
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show versions, compiled kernels, runtimes and GPU",
                      description="Versions of fer-edge, Python, torch and the runtimes; whether the CPU and "
                      "CUDA kernels were compiled in; the GPU torch sees; the embedded default model; the "
                      "kernel dispatch table.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)


# name -> function adding the sub-parser; one place lists every command.
# name -> "module:function adding the sub-parser"; one place lists every
# command, and a command's module (torch, onnx, ...) is imported only to build it.
COMMANDS = {
    "info": "fer_edge.cli:_add_info",
    "train": "fer_edge.commands.train:add_train_parser",
    "eval": "fer_edge.commands.evaluate:add_eval_parser",
    "calibrate": "fer_edge.commands.calibrate:add_calibrate_parser",
    "teacher-logits": "fer_edge.commands.evaluate:add_teacher_logits_parser",
    "merge": "fer_edge.commands.merge:add_merge_parser",
    "convert": "fer_edge.commands.convert:add_convert_parser",
    "parity": "fer_edge.commands.convert:add_parity_parser",
    "benchmark": "fer_edge.commands.benchmark:add_benchmark_parser",
    "keygen": "fer_edge.commands.keygen:add_keygen_parser",
    "predict": "fer_edge.commands.predict:add_predict_parser",
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the usage block is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fer-edge",
        description="Facial-expression recognition: train, merge, convert for Jetson/Android, run on device.",
    )
    parser.add_argument("--version", action="version", version=f"fer-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for target in COMMANDS.values():
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


# A missing optional dependency -> the extra that installs it.  The training and
# conversion stack (torch, onnx, ...) comes with the extra of the command that
# needs it; a device runtime with its own extra.
EXTRA_FOR_COMMAND = {"train": "train", "eval": "train", "calibrate": "train", "teacher-logits": "train",
                     "merge": "train", "predict": "train", "convert": "convert", "parity": "convert",
                     "benchmark": "convert", "keygen": "convert"}
STACK_MODULES = ("torch", "torchvision", "safetensors", "tqdm", "matplotlib", "onnx", "litert_torch")
EXTRA_FOR_MODULE = {"onnxruntime": "runtime-onnx", "ai_edge_litert": "runtime-tflite", "cv2": "runtime-onnx",
                    "cryptography": "runtime-onnx"}


def missing_dependency_line(exc: ModuleNotFoundError, command: str = "") -> str | None:
    """One line naming the extra to install, for a dependency fer-edge knows; None otherwise (a bug)."""
    top = (exc.name or "").split(".")[0]
    if top in STACK_MODULES:
        extra = EXTRA_FOR_COMMAND.get(command, "train")
    else:
        extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    return f"this needs the Python package {top!r}, which is not installed: pip install \"fer-edge[{extra}]\""


def refuse(command: str, why) -> int:
    """A failure the user can fix: one line on stderr, exit code 2 (a file name
    with a newline in it does not make it two)."""
    from fer_edge.fileio import shown

    print(f"fer-edge {command}: error: {shown(why)}", file=sys.stderr)
    return 2


def report_bug(command: str) -> int:
    """An error fer-edge did not foresee: the traceback, and a line saying it is a bug."""
    import traceback

    traceback.print_exc()
    print(f"fer-edge {command}: internal error: this is a bug in fer-edge {__version__}; please report it "
          "with the lines above and the command you ran", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    NOTES.clear()
    try:
        rc = int(args.func(args) or 0)
        for line in dict.fromkeys(NOTES):
            print(line, file=sys.stderr)
        return rc
    except UserError as exc:
        return refuse(args.command, exc)
    except ModuleNotFoundError as exc:
        line = missing_dependency_line(exc, args.command)
        return report_bug(args.command) if line is None else refuse(args.command, line)
    except KeyboardInterrupt:
        print(f"fer-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        return refuse(args.command, "out of memory (try a smaller --batch-size or --limit)")
    except OSError as exc:
        # Full disks, read-only folders, missing permissions: the user's to fix, in one line.
        from fer_edge.fileio import os_error_line

        return refuse(args.command, os_error_line(exc, action=None))
    except Exception:  # noqa: BLE001 - everything else is ours to fix
        return report_bug(args.command)


if __name__ == "__main__":
    sys.exit(main())
