"""``fer-edge train`` and ``fer-edge eval``: read data, check it, run, report."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from fer_edge import UserError


def _log(ctx):
    return (lambda msg: print(msg, flush=True)) if ctx.main else (lambda msg: None)


def _report_skipped(name: str, dataset, log) -> None:
    if dataset.skipped:
        src, why = dataset.skipped[0]
        log(f"warning: {name}: skipped {len(dataset.skipped)} unreadable item(s) "
            f"(first: {src}: {why}); --strict makes this an error")


def model_input_size(model: str, model_config: dict) -> int:
    from fer_edge import models

    try:
        return int(models.create(model, **model_config).config.get("input_size", 48))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def limit_set(dataset, n: int | None, seed: int):
    """A seeded random subset of n faces (all when n is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise UserError("--limit must be >= 1")
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return dataset.subset(idx)


def align_val_classes(train, val, log):
    """Validation labels as indices into the training classes.  A class the
    model never saw is an error; a training class missing from validation is
    only a note (its recall cannot be measured)."""
    from fer_edge.evaluate import remap_labels

    extra = [c for c in val.classes if c not in train.classes]
    if extra:
        raise UserError(f"validation classes differ from training classes: {', '.join(extra)} not in "
                        f"training ({', '.join(train.classes)})")
    missing = [c for c in train.classes if c not in val.classes]
    if missing:
        log(f"note: validation data has no {', '.join(missing)} images")
    val.labels = remap_labels(val, train.classes)
    val.classes = list(train.classes)
    return val


# HSNet's ablation switches (the paper's Table 6): flag -> model config key.
ABLATIONS = {"no_dib": "dib", "no_fgal": "fgal", "no_ktl": "ktl"}
# --aux-weight when not given: hsnet trains on the paper's loss alone; hsnet-lite
# keeps the weight its runs were trained with.
DEFAULT_AUX_WEIGHT = {"hsnet-lite": 0.3}


def resolve_model(args) -> tuple[str, dict, dict | None]:
    """(architecture, its config, init) from --model/--width/--input-size, or
    from the --init checkpoint, whose architecture and configuration a
    fine-tuned model keeps (a conflicting flag is an error, not a silent pick)."""
    config = {}
    off = [flag for flag in ABLATIONS if getattr(args, flag, False)]
    if off and (args.model or "macnn") != "hsnet" and not args.init:
        raise UserError(f"--{off[0].replace('_', '-')}: the DIB/FGAL/KTL switches are HSNet's (--model hsnet)")
    for flag in off:
        config[ABLATIONS[flag]] = False
    if args.width is not None:
        config["width"] = args.width
    if args.input_size is not None:
        config["input_size"] = args.input_size
    if args.dropout is not None:
        if not 0.0 <= args.dropout < 1.0:
            raise UserError(f"--dropout {args.dropout}: must be >= 0 and < 1")
        config["dropout"] = args.dropout
    if not args.init:
        return args.model or "macnn", config, None
    from fer_edge.checkpoint import read_meta
    from fer_edge.targets.bundle import sha256_file

    meta = read_meta(args.init)
    if args.model and args.model != meta["arch"]:
        raise UserError(f"--init {args.init} is a {meta['arch']} checkpoint, not --model {args.model}")
    init_config = {k: v for k, v in meta["config"].items() if k not in ("num_classes", "in_chans", "freeze_stem")}
    for key, value in config.items():
        if init_config.get(key) != value:
            raise UserError(f"--init {args.init} has {key} {init_config.get(key)}, not {value}: "
                            "a fine-tuned model keeps the architecture it starts from")
    return meta["arch"], init_config, {"path": str(args.init), "sha256": sha256_file(args.init)}


def resolve_teacher(args) -> dict:
    """The distillation settings: each teacher's path and sha256 (a resumed run
    must use the same files), weight and temperature.  The files and the numbers
    are checked before any data loads, their classes once the data is known."""
    if args.teacher and args.teacher_logits:
        raise UserError("--teacher and --teacher-logits: give one (stored logits already are a teacher)")
    if not args.teacher and not args.teacher_logits:
        if args.kd_weight is not None or args.kd_temperature is not None:
            raise UserError("--kd-weight/--kd-temperature need --teacher CKPT or --teacher-logits FILE")
        return {}
    from fer_edge.checkpoint import read_meta
    from fer_edge.targets.bundle import sha256_file

    for path in args.teacher_logits or ():
        from fer_edge.training.distill import read_teacher_logits

        read_teacher_logits(path)  # a missing or foreign file fails here, in one line
    for path in args.teacher or ():
        read_meta(path)  # a missing or foreign file fails here, in one line
    weight = 0.5 if args.kd_weight is None else args.kd_weight
    temperature = 4.0 if args.kd_temperature is None else args.kd_temperature
    if not 0.0 < weight <= 1.0:
        raise UserError(f"--kd-weight {weight}: must be in (0, 1] (0 would run the teacher for nothing)")
    if not temperature > 0.0:
        raise UserError(f"--kd-temperature {temperature}: must be > 0")
    # Sorted by content: the ensemble is the same whatever order the flags came in (so is a resume).
    key = "teacher_logits" if args.teacher_logits else "teacher"
    teachers = sorted(({"path": str(p), "sha256": sha256_file(p)} for p in args.teacher_logits or args.teacher),
                      key=lambda t: t["sha256"])
    same = {t["sha256"] for t in teachers}
    if len(same) < len(teachers):
        raise UserError(f"--{key.replace('_', '-')}: the same file is given twice (an ensemble needs different "
                        "members)")
    return {key: teachers, "kd_weight": weight, "kd_temperature": temperature}


def cmd_train(args: argparse.Namespace) -> int:
    from fer_edge.data import load_dataset
    from fer_edge.training.recipes import get_recipe
    from fer_edge.training.trainer import TrainSettings, prepare_run_dir, setup_distributed

    if args.folds is None and not args.val:
        raise UserError("--val is required (the data that picks the best epoch), or use --folds K")
    if args.folds is not None and args.val:
        raise UserError("--folds tests on held-out folds of --data; drop --val")
    ctx = setup_distributed(args.device)
    log = _log(ctx)
    try:
        if args.time_budget is not None and not (args.time_budget > 0 and math.isfinite(args.time_budget)):
            raise UserError(f"--time-budget {args.time_budget:g}: must be a finite number > 0 of minutes")
        if args.time_budget is not None and args.folds is not None:
            # Each fold would time itself and could train a different number of epochs.
            raise UserError("--time-budget times one run; with --folds give --epochs (every fold trains the same)")
        recipe = get_recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                            mixup=args.mixup, cutmix=args.cutmix, ema=args.ema)
        model_name, model_config, init = resolve_model(args)
        if recipe["schedule"] == "plateau" and args.folds is not None:
            raise UserError(f"--recipe {args.recipe} lowers the learning rate on the validation loss: "
                            "use --val (a held-out fold must not steer its own training)")
        if model_config.get("ktl", True) and model_name == "hsnet" and not args.stem_weights and not init:
            raise UserError("hsnet transfers its stem from face recognition (KTL): give --stem-weights FILE "
                            "(an Inception-ResNet-v1 face-recognition state dict), or --no-ktl to train the stem "
                            "from scratch (the paper's ablation)")
        aux_weight = args.aux_weight if args.aux_weight is not None else DEFAULT_AUX_WEIGHT.get(model_name, 0.0)
        distill = resolve_teacher(args)
        size = model_input_size(model_name, model_config)
        run_dir = Path(args.out)
        prepare_run_dir(run_dir, args.resume, args.force, ctx.main, clean=False)  # refusals only: nothing goes yet
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        train = load_dataset(args.data, size=size, classes=classes, strict=args.strict, usage="Training",
                             progress=ctx.main and not args.no_progress)
        _report_skipped(args.data, train, log)
        train = limit_set(train, args.limit, args.seed)
        val = None
        if args.val:
            val = load_dataset(args.val, size=size, classes=classes, strict=args.strict, usage=args.val_usage,
                               progress=ctx.main and not args.no_progress)
            _report_skipped(args.val, val, log)
            val = align_val_classes(train, limit_set(val, args.val_limit, args.seed), log)
        log(f"train: {len(train)} faces from {args.data} {train.class_counts()}")
        if val is not None:
            log(f"val:   {len(val)} faces from {args.val}")
        settings = TrainSettings(
            model=model_name, model_config=model_config, recipe=recipe, classes=list(train.classes),
            seed=args.seed, device=args.device, amp=args.amp, class_weights=args.class_weights,
            compile=args.compile is not None, compile_mode=args.compile or "default",
            stem_weights=args.stem_weights, init=init, time_budget=args.time_budget, aux_weight=aux_weight,
            **distill,
            data={"train": str(args.data), "val": str(args.val) if args.val else None, "limit": args.limit,
                  "val_limit": args.val_limit, "train_images": len(train)})
        if distill.get("teacher"):  # before the run folder gets its first file
            from fer_edge.checkpoint import default_preprocess, read_meta
            from fer_edge.training.distill import check_teacher

            for path in args.teacher:
                check_teacher(read_meta(path), path, settings.classes, default_preprocess(model_name, model_config))
        if distill.get("teacher_logits"):  # every training face has stored logits, every class a column
            from fer_edge.training.distill import OfflineTeacher, face_keys

            OfflineTeacher([t["path"] for t in settings.teacher_logits], face_keys(train.sources, args.data),
                           settings.classes, "cpu", settings.kd_temperature)
        # Every input is valid: only now may --force clear the old run.
        prepare_run_dir(run_dir, args.resume, args.force, ctx.main)
        if ctx.enabled:
            import torch.distributed as dist

            dist.barrier()  # rank 0 has prepared the folder
        if args.folds is not None:
            return _run_folds(settings, train, args.folds, run_dir, args, ctx, log)
        return _run_single(settings, train, val, run_dir, args, ctx, log)
    finally:
        if ctx.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_single(settings, train, val, run_dir: Path, args, ctx, log) -> int:
    from fer_edge.training.trainer import train_run

    summary = train_run(settings, train, val, run_dir, resume=args.resume, ctx=ctx,
                        progress=not args.no_progress, log=log)
    if ctx.main:
        report = _final_report(run_dir, val, settings.device)
        log(f"best epoch {summary['best_epoch']}: val accuracy {100 * summary['best_val_acc']:.2f}%, "
            f"mean-class {100 * report['mean_class_accuracy']:.2f}% -> {run_dir / 'best.safetensors'}")
        cal = report["calibration"]
        log(f"softmax temperature T={cal['temperature']:.3f} fitted on val (stored in best.safetensors): "
            f"ECE {100 * cal['ece']:.2f}% -> {100 * cal['ece_scaled']:.2f}% on val "
            f"({100 * cal['cross_fitted']['ece']:.2f}% fitting on one half, scoring the other)")
        log(f"mean training throughput {summary.get('img_per_s_mean', 0):.0f} img/s; "
            f"plots in {run_dir / 'plots'}")
    return 0


def _final_report(run_dir: Path, val, device: str) -> dict:
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


def _run_folds(settings, data, k: int, run_dir: Path, args, ctx, log) -> int:
    """K-fold cross-validation; each fold's score is its last epoch on its test
    fold (no fold picks its own best epoch, which would inflate the mean)."""
    from fer_edge.data.folds import make_folds
    from fer_edge.checkpoint import write_json_atomic
    from fer_edge.training.trainer import SUMMARY_FILE, train_run

    folds, kind = make_folds(data, k, seed=settings.seed)
    log(f"{k}-fold cross-validation, {kind} folds: {[len(f) for f in folds]} faces per test fold")
    results = []
    for i, test_idx in enumerate(folds, start=1):
        fold_dir = run_dir / f"fold{i:02d}"
        test_mask = np.zeros(len(data), dtype=bool)
        test_mask[test_idx] = True
        summary_file = fold_dir / SUMMARY_FILE
        if args.resume and summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            log(f"fold {i}/{k}: done earlier, val acc {100 * summary['val_acc']:.2f}%")
        else:
            fold_dir.mkdir(parents=True, exist_ok=True)
            log(f"fold {i}/{k}: train {int((~test_mask).sum())}, test {len(test_idx)}")
            summary = train_run(settings, data.subset(np.flatnonzero(~test_mask)), data.subset(test_idx),
                                fold_dir, resume=args.resume and (fold_dir / "resume.pt").is_file(), ctx=ctx,
                                progress=not args.no_progress, select_best=False, log=log)
        results.append({"fold": i, "test_images": len(test_idx), "accuracy": summary.get("val_acc"),
                        "mean_class_accuracy": summary.get("val_mean_class_acc")})
    if ctx.main:
        acc = np.array([r["accuracy"] for r in results])
        mca = np.array([r["mean_class_accuracy"] for r in results])
        report = {"folds": k, "kind": kind, "score": "last epoch on the held-out fold", "per_fold": results,
                  "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)),
                  "mean_class_accuracy_mean": float(mca.mean()), "mean_class_accuracy_std": float(mca.std(ddof=1))}
        write_json_atomic(run_dir / "folds.json", report, force=True)
        for r in results:
            log(f"fold {r['fold']:2d}: accuracy {100 * r['accuracy']:.2f}%, "
                f"mean-class {100 * r['mean_class_accuracy']:.2f}% ({r['test_images']} faces)")
        log(f"{k}-fold {kind}: accuracy {100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f}%, "
            f"mean-class {100 * mca.mean():.2f} ± {100 * mca.std(ddof=1):.2f}%  -> {run_dir / 'folds.json'}")
    return 0


def add_train_parser(sub) -> None:
    from fer_edge.training.recipes import RECIPES

    p = sub.add_parser("train", help="train a model on expression data (FER2013 CSV/folders, CK+, RAF-DB)",
                       description="Train MACNN, VGG16, HSNet or hsnet-lite. Writes best/last checkpoints, "
                                   "metrics.jsonl, "
                                   "config.json, resume.pt and plots into --out. Launch with torchrun for "
                                   "several processes (DistributedDataParallel).")
    p.add_argument("--model", help="macnn, vgg16, hsnet (the HSNet paper's network) or hsnet-lite (a smaller "
                   "variant) (default macnn, or the --init checkpoint's)")
    p.add_argument("--data", required=True, help="training data: a FER2013 .csv, class folders, CK+ or RAF-DB")
    p.add_argument("--val", help="validation data (chooses the best epoch; never trained on)")
    p.add_argument("--val-usage", default="PublicTest", help="Usage rows of a FER2013 CSV given as --val")
    p.add_argument("--recipe", default="best", choices=sorted(RECIPES), help="training recipe (default best)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="train as many epochs as fit in MINUTES (timed on the second epoch, which then sets "
                   "the learning-rate schedule's length), at most --epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="per-process batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--width", type=float, help="channel width multiplier (compact models: 0.25, 0.5)")
    p.add_argument("--weight-decay", type=float, help="override the recipe's weight decay (convolution and "
                   "linear weights; never BatchNorm or biases)")
    p.add_argument("--label-smoothing", type=float, help="override the recipe's label smoothing, 0..1")
    p.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup with Beta(ALPHA, ALPHA) (0 = off)")
    p.add_argument("--cutmix", type=float, metavar="ALPHA", help="CutMix with Beta(ALPHA, ALPHA) (0 = off; "
                   "with --mixup, one of the two per batch)")
    p.add_argument("--ema", type=float, metavar="DECAY", help="validate and save an exponential moving "
                   "average of the weights, DECAY per step, e.g. 0.999 (0 = off)")
    p.add_argument("--dropout", type=float, help="dropout before the classifier (default: the model's, 0.5 for "
                   "MACNN/VGG16, 0 for hsnet, 0.3 for hsnet-lite)")
    p.add_argument("--input-size", type=int, help="model input size (hsnet: default 224, at least 75; "
                   "hsnet-lite: default 112)")
    p.add_argument("--aux-weight", type=float, metavar="W",
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
    p.add_argument("--teacher", action="append", metavar="CKPT",
                   help="distil from this trained checkpoint (any architecture and form, same classes or more): "
                   "the loss mixes its softened predictions with the labels; repeat it to distil an ensemble "
                   "(the mean of the teachers' softened predictions)")
    p.add_argument("--teacher-logits", metavar="FILE", action="append",
                   help="distil offline from a teacher's stored logits on --data (`fer-edge teacher-logits`): "
                   "no teacher forward pass, for a teacher that cannot be carried to this machine; repeat it "
                   "to distil the ensemble of several teachers")
    p.add_argument("--kd-weight", type=float, help="share of the distillation term, 0..1 (default 0.5)")
    p.add_argument("--kd-temperature", type=float, help="distillation softmax temperature (default 4)")
    p.add_argument("--stem-weights", help="hsnet, hsnet-lite: Inception-ResNet-v1 face-recognition state dict "
                   "(facenet-pytorch names) for the stem, transferred and frozen (hsnet needs it unless --no-ktl)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision on CUDA (auto: bf16 on compute capability 8.0 and newer, fp16 with "
                   "loss scaling on older GPUs such as the P100; CPU always trains in fp32)")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the model's training step; MODE (default 'default'): reduce-overhead "
                        "replays it as CUDA graphs, max-autotune also tunes its kernels")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--force", action="store_true", help="start over in an existing --out")
    p.add_argument("--folds", type=int, help="K-fold cross-validation on --data (subject-grouped for CK+)")
    p.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--classes", help="comma-separated class names, for folders that are not expression names")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error, not a skip")
    p.add_argument("--limit", type=int, help="train on a seeded random subset of N faces (smoke runs)")
    p.add_argument("--val-limit", type=int, help="validate on a seeded random subset of N faces")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialization, data order, augmentation and --limit subsets (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=cmd_train)


def cmd_eval(args: argparse.Namespace) -> int:
    from fer_edge.checkpoint import load_checkpoint, read_meta, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import evaluate, format_report, write_report

    if args.json and Path(args.json).exists() and not args.force:
        raise UserError(f"{args.json} exists; pass --force to overwrite it")
    if args.plots and Path(args.plots).is_dir() and any(Path(args.plots).glob("*.png")) and not args.force:
        raise UserError(f"{args.plots} already holds plots; pass --force to overwrite them")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
    args.weights = weights_or_default(args.weights)
    meta = read_meta(args.weights)
    size = meta["preprocess"]["input_size"][0]
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    data = load_dataset(args.data, size=size, classes=classes, strict=args.strict, usage=args.usage,
                        progress=True)
    _report_skipped(args.data, data, print)
    if args.limit is not None and args.limit < len(data):
        print(f"scoring a seeded random subset of {args.limit} of {len(data)} faces (--limit)")
    data = limit_set(data, args.limit, 0)
    model, meta = load_checkpoint(args.weights, device=args.device)
    report = evaluate(model, meta, data, device=args.device, batch_size=args.batch_size, tta=args.tta,
                      progress=True)
    report["weights"] = str(args.weights)
    report["data"] = str(args.data)
    print(format_report(report))
    metrics = Path(args.weights).parent / "metrics.jsonl"
    for path in write_report(report, args.json, args.plots, metrics if metrics.is_file() else None, force=True):
        print(f"wrote {path}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class metrics, confusion matrix, ROC/AUC, latency, plots",
                       description="Score a checkpoint on labelled faces: accuracy, mean-class accuracy, "
                       "per-class precision/recall/F1/AUC, the confusion matrix, batch-1 latency; optionally "
                       "ten-crop test-time augmentation, a JSON report and plots.")
    p.add_argument("--weights", help="checkpoint (.safetensors, train or merged form; "
                   "default: the embedded default model)")
    p.add_argument("--data", required=True, help="labelled faces: class folders, FER2013 .csv, CK+, RAF-DB")
    p.add_argument("--usage", default="PublicTest", help="Usage rows when --data is a FER2013 CSV")
    p.add_argument("--json", help="write the full report as JSON")
    p.add_argument("--plots", help="folder for confusion.png, roc.png (and training_curves.png from the "
                                   "run's metrics.jsonl)")
    p.add_argument("--tta", action="store_true", help="also report ten-crop test-time augmentation")
    p.add_argument("--limit", type=int, help="score a seeded random subset of N faces (quick checks)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=256, help="faces per batch when scoring (default 256)")
    p.add_argument("--classes", help="comma-separated class names for non-expression folder names")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error, not a skip")
    p.add_argument("--force", action="store_true", help="overwrite --json / plots")
    p.set_defaults(func=cmd_eval)


def cmd_teacher_logits(args: argparse.Namespace) -> int:
    import torch

    from fer_edge.checkpoint import read_meta, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.targets.bundle import sha256_file
    from fer_edge.training.distill import Teacher, compute_teacher_logits, face_keys, save_teacher_logits

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
    args.weights = weights_or_default(args.weights)
    meta = read_meta(args.weights)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    data = load_dataset(args.data, size=meta["preprocess"]["input_size"][0], classes=classes, strict=args.strict,
                        usage=args.usage, progress=True)
    _report_skipped(args.data, data, print)
    teacher = Teacher(args.weights, list(meta["classes"]), meta["preprocess"], torch.device(args.device))
    logits = compute_teacher_logits(teacher, data.images, meta["preprocess"], flip=not args.no_flip)
    acc = float("nan")  # the teacher's top-1 on these faces, as a check that they are the ones it knows
    if all(c in meta["classes"] for c in data.classes):
        columns = [list(meta["classes"]).index(c) for c in data.classes]
        acc = float((logits[:, columns].argmax(1).numpy() == data.labels).mean())
    info = {"classes": list(meta["classes"]), "flip": not args.no_flip, "data": str(args.data),
            "teacher": {"sha256": sha256_file(args.weights), "arch": meta["arch"], "config": meta["config"],
                        "form": meta["form"], "preprocess": meta["preprocess"]},
            "teacher_accuracy_on_data": acc}
    save_teacher_logits(out, logits, face_keys(data.sources, args.data), info, force=args.force)
    print(f"wrote {out}: {len(data)} faces x {logits.shape[1]} classes, teacher top-1 on them {100 * acc:.2f}% "
          f"({'face and mirror averaged' if not args.no_flip else 'faces as they are'})")
    return 0


def add_teacher_logits_parser(sub) -> None:
    p = sub.add_parser("teacher-logits", help="store a teacher's logits on training faces, for "
                       "`fer-edge train --teacher-logits` (offline distillation)",
                       description="Score every training face with a teacher checkpoint (by default the mean "
                       "of the face's and its mirror image's logits) and store the logits keyed by path under "
                       "--data, for `fer-edge train --teacher-logits` where the teacher itself cannot be.")
    p.add_argument("--weights", help="the teacher checkpoint (default: the embedded default model)")
    p.add_argument("--data", required=True, help="the training faces the student will use (same --data)")
    p.add_argument("--out", required=True, help="logits file to write (.safetensors)")
    p.add_argument("--usage", default="Training", help="Usage rows when --data is a FER2013 CSV")
    p.add_argument("--no-flip", action="store_true",
                   help="score the faces only (default: the mean of each face's and its mirror image's logits)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--classes", help="comma-separated class names for non-expression folder names")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error, not a skip")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=cmd_teacher_logits)
