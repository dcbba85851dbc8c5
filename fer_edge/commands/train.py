"""``fer-edge train``: check every input, read the data, train, report.

Everything a user can get wrong is refused in one line before the data loads
(numbers and fixed sets by argparse, then the device, the run folder, the
model, the teachers), and nothing is written to the run folder before every
input is valid; a run that fails before its first checkpoint leaves nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fer_edge import UserError, argtypes
from fer_edge.commands.common import (FER2013_USAGES, add_classes_option, add_device_option, add_progress_option,
                                      add_strict_option, check_outputs_spare_inputs, report_skipped)

# The registered models (fer_edge.models.list_models(); named here so that
# building the parser imports no torch).
MODELS = ("hsnet", "hsnet-lite", "macnn", "vgg16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SEED = argtypes.int_in(0, 2**31 - 1)


def _log(ctx):
    return (lambda msg: print(msg, flush=True)) if ctx.main else (lambda msg: None)


def resolve_choices(args) -> dict:
    """Recipe, model, teachers and checks that need no data: one line for any conflict."""
    from fer_edge.training.finetune import check_model_options, model_facts
    from fer_edge.training.recipes import get_recipe
    from fer_edge.training.setup import DEFAULT_AUX_WEIGHT, ABLATIONS, model_config, resolve_model, resolve_teacher

    if args.folds is None and not args.val:
        raise UserError("--val is required (the data that picks the best epoch), or use --folds K")
    if args.folds is not None and args.val:
        raise UserError("--folds tests on held-out folds of --data; drop --val")
    if args.time_budget is not None and args.folds is not None:
        # Each fold would time itself and could train a different number of epochs.
        raise UserError("--time-budget times one run; with --folds give --epochs (every fold trains the same)")
    recipe = get_recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                        mixup=args.mixup, cutmix=args.cutmix, ema=args.ema)
    if recipe["schedule"] == "plateau" and args.folds is not None:
        raise UserError(f"--recipe {args.recipe} lowers the learning rate on the validation loss: "
                        "use --val (a held-out fold must not steer its own training)")
    config = model_config(args.model, [f for f in ABLATIONS if getattr(args, f)], args.width, args.input_size,
                          args.dropout, args.init)
    model_name, config, init = resolve_model(args.model, config, args.init)
    if config.get("ktl", True) and model_name == "hsnet" and not args.stem_weights and not init:
        raise UserError("hsnet transfers its stem from face recognition (KTL): give --stem-weights FILE "
                        "(an Inception-ResNet-v1 face-recognition state dict), or --no-ktl to train the stem "
                        "from scratch (the paper's ablation)")
    if args.stem_weights and not Path(args.stem_weights).is_file():
        raise UserError(f"--stem-weights {args.stem_weights}: no such file")
    aux_weight = args.aux_weight if args.aux_weight is not None else DEFAULT_AUX_WEIGHT.get(model_name, 0.0)
    facts = model_facts(model_name, config, args.stem_weights)
    check_model_options(model_name, facts, aux_weight, args.stem_weights)
    return {"recipe": recipe, "model": model_name, "model_config": config, "init": init,
            "aux_weight": aux_weight, "input_size": facts["input_size"],
            "distill": resolve_teacher(args.teacher, args.teacher_logits, args.kd_weight, args.kd_temperature)}


def check_training_classes(data, counts: dict[str, int]) -> None:
    """A classifier needs two classes or more, each with faces to learn from: a
    class without any would be in the model and never predicted."""
    if len(counts) < 2:
        raise UserError(f"--data {data}: {len(counts)} class ({', '.join(counts) or 'none'}); a classifier needs "
                        "at least two")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise UserError(f"--data {data}: no usable training faces of {', '.join(map(repr, empty[:5]))}; add some, "
                        "or leave the class out (--classes)")


def load_data(args, size: int, ctx, log):
    """(train, val or None): read, subset (--limit), validation classes aligned to training's."""
    from fer_edge.data import load_dataset
    from fer_edge.training.setup import align_val_classes, limit_set

    progress = ctx.main and not args.no_progress
    train = load_dataset(args.data, size=size, classes=args.classes, strict=args.strict, usage="Training",
                         progress=progress)
    report_skipped(args.data, train, log)
    check_training_classes(args.data, train.class_counts())
    train = limit_set(train, args.limit, args.seed)
    if args.limit is not None:
        counts = train.class_counts()
        if sum(n > 0 for n in counts.values()) < 2:
            raise UserError(f"--limit {args.limit} leaves faces of {sum(n > 0 for n in counts.values())} class; a "
                            "classifier needs at least two: give a larger --limit")
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            log(f"warning: --limit {args.limit} leaves no faces of {', '.join(empty)}: the model cannot learn "
                f"{'it' if len(empty) == 1 else 'them'}")
    val = None
    if args.val:
        val = load_dataset(args.val, size=size, classes=args.classes, strict=args.strict, usage=args.val_usage,
                           progress=progress)
        report_skipped(args.val, val, log)
        val = align_val_classes(train, limit_set(val, args.val_limit, args.seed), log)
    log(f"train: {len(train)} faces from {args.data} {train.class_counts()}")
    if val is not None:
        log(f"val:   {len(val)} faces from {args.val}")
    return train, val


def make_settings(args, choices: dict, train, device):
    from fer_edge.training.settings import TrainSettings

    return TrainSettings(
        model=choices["model"], model_config=choices["model_config"], recipe=choices["recipe"],
        classes=list(train.classes), seed=args.seed, device=device.type, amp=args.amp,
        class_weights=args.class_weights, compile=args.compile is not None, compile_mode=args.compile or "default",
        stem_weights=args.stem_weights, init=choices["init"], time_budget=args.time_budget,
        aux_weight=choices["aux_weight"], **choices["distill"],
        data={"train": str(args.data), "val": str(args.val) if args.val else None, "limit": args.limit,
              "val_limit": args.val_limit, "train_images": len(train)})


def cmd_train(args: argparse.Namespace, hooks=None) -> int:
    """``hooks``: a fer_edge.training.settings.RunHooks passed to every run (tests)."""
    from fer_edge.devices import torch_device
    from fer_edge.training import distributed as dist
    from fer_edge.training.rundir import (check_run_dir, discard_failed_start, finish_run_dir, has_files,
                                         prepare_run_dir)
    from fer_edge.training.setup import check_batches, check_teachers_fit

    ctx = dist.context_from_env()
    log = _log(ctx)
    device = torch_device(args.device, ctx.local_rank if ctx.enabled else None)
    if not str(args.out).strip():   # Path("") is the current folder: never what an empty argument meant
        raise UserError("--out: give a folder name")
    run_dir = Path(args.out)
    check_run_dir(run_dir, args.resume, args.force, args.folds is not None)  # refusals only: nothing goes yet
    check_outputs_spare_inputs({"--out": run_dir}, {"--data": args.data, "--val": args.val, "--init": args.init,
                                                    "--stem-weights": args.stem_weights, "--teacher": args.teacher,
                                                    "--teacher-logits": args.teacher_logits},
                               replaced=("--out",) if args.force else ())
    from fer_edge.training.rundir import RESUME_FILE, read_resume_state

    if args.resume and (run_dir / RESUME_FILE).is_file():
        read_resume_state(run_dir / RESUME_FILE)  # a damaged file fails now, not after the data loads
    choices = resolve_choices(args)
    dist.join_process_group(ctx, device)
    had_files, existed = has_files(run_dir), run_dir.is_dir()
    try:
        train, val = load_data(args, choices["input_size"], ctx, log)
        settings = make_settings(args, choices, train, device)
        check_teachers_fit(settings, train, args.data)
        check_batches(len(train), choices["recipe"]["batch_size"], ctx.world, args.folds)
        # Every input is valid: only now may --force clear the old run.
        prepare_run_dir(run_dir, args.resume, args.force, ctx.main)
        dist.barrier(ctx)  # rank 0 has prepared the folder
        try:
            if args.folds is not None:
                rc = run_folds(settings, train, args.folds, run_dir, args, ctx, log, device, hooks)
            else:
                rc = run_single(settings, train, val, run_dir, args, ctx, log, device, hooks)
        except BaseException:
            if ctx.main and not args.resume:
                discard_failed_start(run_dir, had_files, existed)
            raise
        if ctx.main:
            finish_run_dir(run_dir)
        return rc
    finally:
        dist.leave_process_group(ctx)


def run_single(settings, train, val, run_dir: Path, args, ctx, log, device, hooks) -> int:
    from fer_edge.training.trainer import train_run

    summary = train_run(settings, train, val, run_dir, resume=args.resume, ctx=ctx,
                        progress=not args.no_progress, log=log, device=device, hooks=hooks)
    if ctx.main:
        report = final_report(run_dir, val, str(device))
        log(f"best epoch {summary['best_epoch']}: val accuracy {100 * summary['best_val_acc']:.2f}%, "
            f"mean-class {100 * report['mean_class_accuracy']:.2f}% -> {run_dir / 'best.safetensors'}")
        cal = report["calibration"]
        log(f"softmax temperature T={cal['temperature']:.3f} fitted on val (stored in best.safetensors): "
            f"ECE {100 * cal['ece']:.2f}% -> {100 * cal['ece_scaled']:.2f}% on val "
            f"({100 * cal['cross_fitted']['ece']:.2f}% fitting on one half, scoring the other)")
        log(f"mean training throughput {summary.get('img_per_s_mean', 0):.0f} img/s; "
            f"plots in {run_dir / 'plots'}")
    return 0


def final_report(run_dir: Path, val, device: str) -> dict:
    """Fit best.safetensors' softmax temperature on the validation set (stored in
    its metadata, so bundles carry it); evaluate it there (ECE before and after
    scaling); write val_eval.json and the PNGs."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.evaluate import evaluate, fit_checkpoint_temperature, write_report

    fit_checkpoint_temperature(run_dir / "best.safetensors", val, device=device)
    model, meta = load_checkpoint(run_dir / "best.safetensors", device=device)
    report = evaluate(model, meta, val, device=device, latency=False)
    write_report(report, run_dir / "val_eval.json", run_dir / "plots", run_dir / "metrics.jsonl")
    return report


def run_folds(settings, data, k: int, run_dir: Path, args, ctx, log, device, hooks) -> int:
    """K-fold cross-validation; each fold's score is its last epoch on its test
    fold (no fold picks its own best epoch, which would inflate the mean)."""
    from fer_edge.data.folds import make_folds
    from fer_edge.training.rundir import RESUME_FILE
    from fer_edge.training.trainer import train_run

    folds, kind = make_folds(data, k, seed=settings.seed)
    log(f"{k}-fold cross-validation, {kind} folds: {[len(f) for f in folds]} faces per test fold")
    results = []
    for i, test_idx in enumerate(folds, start=1):
        fold_dir = run_dir / f"fold{i:02d}"
        summary = fold_summary(fold_dir, args.resume, settings, len(data) - len(test_idx))
        if summary is not None:
            log(f"fold {i}/{k}: done earlier, val acc {100 * summary['val_acc']:.2f}%")
        else:
            test_mask = np.zeros(len(data), dtype=bool)
            test_mask[test_idx] = True
            fold_dir.mkdir(parents=True, exist_ok=True)
            log(f"fold {i}/{k}: train {int((~test_mask).sum())}, test {len(test_idx)}")
            summary = train_run(settings, data.subset(np.flatnonzero(~test_mask)), data.subset(test_idx),
                                fold_dir, resume=args.resume and (fold_dir / RESUME_FILE).is_file(), ctx=ctx,
                                progress=not args.no_progress, select_best=False, log=log, device=device,
                                hooks=hooks)
        results.append({"fold": i, "test_images": len(test_idx), "accuracy": summary.get("val_acc"),
                        "mean_class_accuracy": summary.get("val_mean_class_acc")})
    if ctx.main:
        report_folds(results, k, kind, run_dir, log)
    return 0


def fold_summary(fold_dir: Path, resume: bool, settings=None, train_images: int | None = None) -> dict | None:
    """The summary of a fold finished by an earlier process (--resume), or None.
    A finished fold is reused only when it was trained as this fold would be:
    the same settings (its config.json) and as many training faces (the same
    number of folds); otherwise one line, never an old result passed off as new."""
    import json

    from fer_edge.training.rundir import CONFIG_FILE, SUMMARY_FILE
    from fer_edge.training.settings import comparable_fingerprint, fingerprint_difference

    path = fold_dir / SUMMARY_FILE
    if not (resume and path.is_file()):
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None  # unreadable: the fold is trained again (from its resume file where there is one)
    if not (isinstance(summary, dict) and isinstance(summary.get("val_acc"), float)):
        return None
    if train_images is not None and summary.get("train_images") != train_images:
        raise UserError(f"{fold_dir}: finished with {summary.get('train_images')!r} training faces, this fold has "
                        f"{train_images} (another number of folds or other data); start over with --force")
    if settings is not None:
        try:
            config = json.loads((fold_dir / CONFIG_FILE).read_text())
        except (OSError, ValueError, RecursionError):
            config = None
        if not isinstance(config, dict):
            raise UserError(f"{fold_dir}: finished, but its {CONFIG_FILE} is missing or damaged; start over with "
                            "--force")
        fp = json.loads(json.dumps(settings.fingerprint()))
        diff = fingerprint_difference(comparable_fingerprint({k: config.get(k) for k in fp}, True),
                                      comparable_fingerprint(fp, True))
        if diff is not None:
            raise UserError(f"{fold_dir}: finished with another '{diff}' than this command's; resume with the "
                            "same command, or start over with --force")
    return summary


def report_folds(results: list[dict], k: int, kind: str, run_dir: Path, log) -> None:
    from fer_edge.fileio import write_json_atomic
    from fer_edge.training.rundir import FOLDS_FILE

    acc = np.array([r["accuracy"] for r in results])
    mca = np.array([r["mean_class_accuracy"] for r in results])
    report = {"folds": k, "kind": kind, "score": "last epoch on the held-out fold", "per_fold": results,
              "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)),
              "mean_class_accuracy_mean": float(mca.mean()), "mean_class_accuracy_std": float(mca.std(ddof=1))}
    write_json_atomic(run_dir / FOLDS_FILE, report, force=True)
    for r in results:
        log(f"fold {r['fold']:2d}: accuracy {100 * r['accuracy']:.2f}%, "
            f"mean-class {100 * r['mean_class_accuracy']:.2f}% ({r['test_images']} faces)")
    log(f"{k}-fold {kind}: accuracy {100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f}%, "
        f"mean-class {100 * mca.mean():.2f} ± {100 * mca.std(ddof=1):.2f}%  -> {run_dir / FOLDS_FILE}")


def add_train_parser(sub) -> None:
    from fer_edge.training.recipes import RECIPES

    p = sub.add_parser("train", help="train a model on expression data (FER2013 CSV/folders, CK+, RAF-DB)",
                       description="Train MACNN, VGG16, HSNet or hsnet-lite. Writes best/last checkpoints, "
                                   "metrics.jsonl, config.json, resume.safetensors and plots into --out. Launch with "
                                   "torchrun for several processes (DistributedDataParallel).")
    p.add_argument("--model", choices=MODELS, help="macnn, vgg16, hsnet (the HSNet paper's network) or hsnet-lite "
                   "(a smaller variant) (default macnn, or the --init checkpoint's)")
    p.add_argument("--data", required=True, help="training data: a FER2013 .csv, class folders, CK+ or RAF-DB")
    p.add_argument("--val", help="validation data (chooses the best epoch; never trained on)")
    p.add_argument("--val-usage", default="PublicTest", choices=FER2013_USAGES,
                   help="Usage rows of a FER2013 CSV given as --val (default PublicTest)")
    p.add_argument("--recipe", default="best", choices=sorted(RECIPES), help="training recipe (default best)")
    _add_recipe_overrides(p)
    _add_model_options(p)
    _add_teacher_options(p)
    add_device_option(p, "; under torchrun, cuda is each process's GPU")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision on CUDA (auto: bf16 on compute capability 8.0 and newer, fp16 with "
                   "loss scaling on older GPUs such as the P100; CPU always trains in fp32)")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE", choices=COMPILE_MODES,
                   help="torch.compile the model's training step; MODE (default 'default'): reduce-overhead "
                        "replays it as CUDA graphs, max-autotune also tunes its kernels")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--force", action="store_true", help="start over in an existing --out")
    p.add_argument("--folds", type=argtypes.int_in(2, 1000),
                   help="K-fold cross-validation on --data (subject-grouped for CK+)")
    p.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    add_classes_option(p)
    add_strict_option(p)
    p.add_argument("--limit", type=argtypes.positive_int,
                   help="train on a seeded random subset of N faces (smoke runs)")
    p.add_argument("--val-limit", type=argtypes.positive_int, help="validate on a seeded random subset of N faces")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the initialization, data order, augmentation and --limit subsets (default 0)")
    add_progress_option(p)
    p.set_defaults(func=cmd_train)


def _add_recipe_overrides(p) -> None:
    """The recipe's numbers a run may override (ranges: fer_edge.training.recipes.RANGES)."""
    p.add_argument("--epochs", type=argtypes.int_in(1, 100_000), help="override the recipe's epochs")
    p.add_argument("--time-budget", type=argtypes.float_in(0, 1e6, low_open=True), metavar="MINUTES",
                   help="train as many epochs as fit in MINUTES (timed on the second epoch, which then sets "
                   "the learning-rate schedule's length), at most --epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=argtypes.batch_size, help="per-process batch size (default: the recipe's)")
    p.add_argument("--lr", type=argtypes.float_in(0, 10, low_open=True),
                   help="override the recipe's learning rate (> 0, at most 10)")
    p.add_argument("--weight-decay", type=argtypes.float_in(0, 1), help="override the recipe's weight decay "
                   "(convolution and linear weights; never BatchNorm or biases), 0..1")
    p.add_argument("--label-smoothing", type=argtypes.float_in(0, 1, high_open=True),
                   help="override the recipe's label smoothing, 0 <= S < 1")
    p.add_argument("--mixup", type=argtypes.float_in(0, 100), metavar="ALPHA",
                   help="mixup with Beta(ALPHA, ALPHA) (0 = off)")
    p.add_argument("--cutmix", type=argtypes.float_in(0, 100), metavar="ALPHA",
                   help="CutMix with Beta(ALPHA, ALPHA) (0 = off; with --mixup, one of the two per batch)")
    p.add_argument("--ema", type=argtypes.float_in(0, 1, high_open=True), metavar="DECAY",
                   help="validate and save an exponential moving average of the weights, DECAY per step, "
                   "e.g. 0.999 (0 = off)")


def _add_model_options(p) -> None:
    p.add_argument("--width", type=argtypes.float_in(0, 16, low_open=True),
                   help="channel width multiplier (compact models: 0.25, 0.5)")
    p.add_argument("--dropout", type=argtypes.float_in(0, 1, high_open=True),
                   help="dropout before the classifier, 0 <= P < 1 (default: the model's, 0.5 for MACNN/VGG16, "
                   "0 for hsnet, 0.3 for hsnet-lite)")
    p.add_argument("--input-size", type=argtypes.int_in(8, 1024),
                   help="model input size (hsnet: default 224, at least 75; hsnet-lite: default 112)")
    p.add_argument("--aux-weight", type=argtypes.float_in(0, 100), metavar="W",
                   help="HSNet: add W x the mean cross-entropy of the ungated FGAL heads to the loss (not the "
                   "paper's loss; default 0 for hsnet, 0.3 for hsnet-lite)")
    p.add_argument("--no-dib", action="store_true", help="hsnet ablation: Inception-ResNet-v1 modules in place of "
                   "the dilated inception blocks")
    p.add_argument("--no-fgal", action="store_true", help="hsnet ablation: one classifier on the last map, no "
                   "feature guided auxiliary learning")
    p.add_argument("--no-ktl", action="store_true", help="hsnet ablation: no knowledge transfer, the stem is "
                   "He-initialised and trained")
    p.add_argument("--init", help="fine-tune: start from this train-form checkpoint (e.g. a FER2013 run's "
                   "best.safetensors); head rows are matched by class name, new classes start fresh")
    p.add_argument("--stem-weights", help="hsnet, hsnet-lite: Inception-ResNet-v1 face-recognition state dict "
                   "(facenet-pytorch names) for the stem, transferred and frozen (hsnet needs it unless --no-ktl)")


def _add_teacher_options(p) -> None:
    p.add_argument("--teacher", action="append", metavar="CKPT",
                   help="distil from this trained checkpoint (any architecture and form, same classes or more): "
                   "the loss mixes its softened predictions with the labels; repeat it to distil an ensemble "
                   "(the mean of the teachers' softened predictions)")
    p.add_argument("--teacher-logits", metavar="FILE", action="append",
                   help="distil offline from a teacher's stored logits on --data (`fer-edge teacher-logits`): "
                   "no teacher forward pass, for a teacher that cannot be carried to this machine; repeat it "
                   "to distil the ensemble of several teachers")
    p.add_argument("--kd-weight", type=argtypes.float_in(0, 1, low_open=True),
                   help="share of the distillation term, 0 < W <= 1 (default 0.5)")
    p.add_argument("--kd-temperature", type=argtypes.float_in(0, 1000, low_open=True),
                   help="distillation softmax temperature, > 0 (default 4)")
