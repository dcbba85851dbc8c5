"""``fer-edge benchmark``: every target x precision runnable here converted,
checked for parity and timed, in one table (and JSON).  The chain is
fer_edge.converters.pipeline.benchmark; the measurements converters/benchmark.py."""
from __future__ import annotations

import argparse

from fer_edge.argtypes import int_in, positive_int
from fer_edge.commands.common import check_outputs_spare_inputs
from fer_edge.commands.convert import CALIB_SIZE, check_json_out, checkpoint_path, existing

RUNS = int_in(1, 100_000)


def format_list(text: str) -> tuple[str, ...]:
    """--formats: a comma list of target/precision rows of the formats table."""
    from fer_edge.converters.formats import keys

    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in keys()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown format {unknown[0] if unknown else text!r} "
                                         f"(choose from {', '.join(keys())})")
    return names


format_list.__name__ = "format list"


def cmd_benchmark(args: argparse.Namespace) -> int:
    from fer_edge.converters import pipeline
    from fer_edge.converters.benchmark import format_table
    from fer_edge.fileio import write_json_atomic

    check_json_out(args.json, args.force)
    check_outputs_spare_inputs({"--json": args.json}, {"--weights": args.weights, "--data": args.data,
                                                       "--calib": args.calib})
    existing(args.data, "--data")
    if args.calib:
        existing(args.calib, "--calib")
    rep = pipeline.benchmark(checkpoint_path(args.weights), args.data, calib=args.calib, limit=args.limit,
                             calib_size=args.calib_size, runs=args.runs, formats=args.formats,
                             progress=not args.no_progress)
    print(format_table(rep))
    print(f"{rep['images']} faces from {args.data} ({rep['excluded_calibration_faces']} calibration faces left "
          "out); latency = median of batch-1 calls")
    if args.json:
        write_json_atomic(args.json, rep, force=True)
    return 0


def add_benchmark_parser(sub) -> None:
    from fer_edge.converters.formats import keys

    p = sub.add_parser("benchmark", help="convert to every target x precision, check parity, time each",
                       description="Convert a checkpoint to every target and precision in one run, measure "
                       "each artifact's accuracy and agreement with PyTorch on labelled faces, its size and its "
                       "batch-1 latency on one thread and on all cores, and print one table.")
    p.add_argument("--weights", help="checkpoint (default: the embedded default model)")
    p.add_argument("--data", required=True, help="labelled faces for accuracy and parity")
    p.add_argument("--calib", help="calibration faces for int8 (default: --data)")
    p.add_argument("--calib-size", type=CALIB_SIZE, default=256, help="faces used from --calib for int8 (default 256)")
    p.add_argument("--limit", type=positive_int, help="use a seeded class-stratified subset of N faces of --data")
    p.add_argument("--formats", type=format_list, metavar="T/P[,T/P...]",
                   help=f"comma list of formats to run, from {', '.join(keys())} (default: all)")
    p.add_argument("--runs", type=RUNS, default=200, help="timed batch-1 calls per measurement (default 200)")
    p.add_argument("--json", help="write the table as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_benchmark)
