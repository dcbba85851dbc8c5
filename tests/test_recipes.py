"""The regularizers a recipe can turn on (weight averaging, mixup, CutMix,
weight decay, label smoothing), each against its definition, and a real
CPU run that uses them all and resumes bit-exactly after a SIGKILL."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fer_edge import UserError
from fer_edge.training import augment as A
from fer_edge.training.ema import WeightEMA
from fer_edge.training.recipes import RECIPE_KEYS, RECIPES, ema_decay, get_recipe
from fer_edge.training.rundir import read_resume_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import TINY, assert_same_weights, load_state, needs_data, run, tiny  # noqa: E402,F401


def batch(n=8, seed=0):
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def onehot(n=8, k=7):
    return torch.nn.functional.one_hot(torch.arange(n) % k, k).float()


# ------------------------------------------------------------------ recipes
def test_every_recipe_has_every_key_and_the_defaults_mix_nothing():
    for name, r in RECIPES.items():
        assert tuple(r) == RECIPE_KEYS, name
    assert RECIPES["best"]["ema"] == RECIPES["best"]["mixup"] == RECIPES["best"]["cutmix"] == 0.0
    long = get_recipe("long")
    assert long["epochs"] >= 250 and long["schedule"] == "cosine" and 0.99 <= long["ema"] < 1.0


@pytest.mark.parametrize("key,value", [("ema", 1.0), ("ema", -0.1), ("ema", math.nan), ("mixup", -1.0),
                                       ("cutmix", math.inf), ("label_smoothing", 1.0),
                                       ("weight_decay", -1e-4), ("lr", 0.0), ("lr", math.nan),
                                       ("epochs", 0), ("batch_size", -3)])
def test_out_of_range_overrides_are_refused(key, value):
    with pytest.raises(UserError, match="--" + key.replace("_", "-")):
        get_recipe("best", **{key: value})


def test_overrides_apply():
    r = get_recipe("best", ema=0.99, cutmix=1.0, mixup=0.2, weight_decay=1e-3, label_smoothing=0.2)
    assert (r["ema"], r["cutmix"], r["mixup"], r["weight_decay"], r["label_smoothing"]) == (0.99, 1.0, 0.2, 1e-3,
                                                                                          0.2)


# ------------------------------------------------------------------ weight averaging
def test_ema_decay_warms_up_then_holds():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6) == 0.999


def test_weight_ema_follows_its_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    ema = WeightEMA(model, decay=0.9)
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():  # a "training step": new weights and BN statistics
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn_like(v))
            model[1].num_batches_tracked += 1
        ema.update()
        d = min(0.9, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            expect[k] = d * expect[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-6)
    assert int(got["1.num_batches_tracked"]) == 5
    assert not any(p.requires_grad for p in ema.module.parameters())
    # a state dict round trip restores the average and the step count
    other = WeightEMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 5 and other.decay == 0.9
    assert_same_weights(other.module.state_dict(), ema.module.state_dict())


# ------------------------------------------------------------------ mixing
def test_cutmix_box_area_and_clipping():
    assert A.cutmix_box(0.75, 48, 48, 0.5, 0.5) == (12, 36, 12, 36)   # a quarter of the image, centred
    t, b, l, r = A.cutmix_box(0.75, 48, 48, 0.0, 0.99)                 # a corner: clipped to the image
    assert (t, l) == (0, 35) and (b, r) == (12, 48)
    assert A.cutmix_box(1.0, 48, 48, 0.3, 0.3)[0:2] == (14, 14)         # lam 1: an empty box


def test_cutmix_pastes_the_partner_and_mixes_targets_by_area():
    x, y = batch(), onehot()
    g = torch.Generator().manual_seed(3)
    out, target = A.cutmix(x, y, g, alpha=1.0)
    inside = out != x
    assert inside.any()
    torch.testing.assert_close(out[inside], x.flip(0)[inside])          # every changed pixel is the partner's
    # the pasted box is one rectangle: its area sets the target weights
    rows = inside[0, 0].any(1).nonzero().flatten()
    cols = inside[0, 0].any(0).nonzero().flatten()
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) / (12 * 12)
    torch.testing.assert_close(target, (1 - area) * y + area * y.flip(0))
    torch.testing.assert_close(target.sum(1), torch.ones(len(y)))


def test_mixup_is_a_convex_combination_with_the_reversed_batch():
    x, y = batch(), onehot()
    out, target = A.mixup(x, y, torch.Generator().manual_seed(4), alpha=0.4)
    lam = float(target[1, 1])  # sample 1 is class 1, its partner (sample 6) class 6
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))


def test_mixing_off_draws_nothing_and_changes_nothing():
    x, y = batch(), onehot()
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    out, target = A.mix_batch(x, y, g, 0.0, 0.0)
    assert out is x and target is y and torch.equal(g.get_state(), before)


def test_mix_batch_picks_both_kinds_when_both_are_on():
    x, y = batch(), onehot()
    g = torch.Generator().manual_seed(6)
    kinds = set()
    for _ in range(40):
        out, _ = A.mix_batch(x, y, g, 0.4, 1.0)
        changed = (out != x)
        # CutMix leaves pixels untouched outside its box; mixup changes every pixel
        kinds.add("cutmix" if not changed.all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


# ------------------------------------------------------------------ a real run
@needs_data
def test_regularized_run_saves_the_average_and_resumes_exactly(tiny, tmp_path):
    train, val = tiny
    common = [*TINY, "--data", train, "--val", val, "--epochs", "2", "--ema", "0.9", "--mixup", "0.2",
              "--cutmix", "1.0", "--weight-decay", "1e-3", "--label-smoothing", "0.2", "--dropout", "0.3"]
    full = run("train", *common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "without the average" in full.stdout
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["val_acc_raw"] <= 1.0 for r in rows)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert (config["recipe"]["ema"], config["recipe"]["cutmix"], config["model_config"]["dropout"]) == (0.9, 1.0,
                                                                                                       0.3)
    # the saved weights are the average's, not the trained ones
    state = read_resume_state(tmp_path / "full" / "resume.safetensors")
    last = load_state(tmp_path / "full" / "last.safetensors")
    assert_same_weights(last, {k: v for k, v in state["ema"]["module"].items() if k in last})
    assert any(not torch.equal(last[k], state["model"][k]) for k in last)
    from fer_edge.checkpoint import read_meta

    assert read_meta(tmp_path / "full" / "last.safetensors")["extra"]["ema"] == 0.9
    # killed after epoch 1 and resumed: the same average, bit for bit
    killed = run("train", *common, "--out", tmp_path / "cut", hooks={"kill_after_epoch": 1})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run("train", *common, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(last, load_state(tmp_path / "cut" / "last.safetensors"))


@needs_data
def test_bad_regularizer_flags_are_one_line_errors(tiny, tmp_path):
    train, val = tiny
    for flag, value in (("--ema", "1"), ("--mixup", "nan"), ("--cutmix", "-1"), ("--dropout", "1.5"),
                        ("--label-smoothing", "2")):
        proc = run("train", *TINY, "--data", train, "--val", val, flag, value, "--out", tmp_path / "x")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and flag in lines[0], proc.stderr
        assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@needs_data
def test_force_with_a_bad_input_keeps_the_old_run(tiny, tmp_path):
    """--force clears a run only once every input is valid: a mistyped --data
    leaves the old run's checkpoints, resume state and metrics in place."""
    train, val = tiny
    out = tmp_path / "run"
    first = run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", out)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"best.safetensors", "resume.safetensors", "metrics.jsonl"} <= before.keys()
    bad = run("train", *TINY, "--data", tmp_path / "no-such-folder", "--val", val, "--epochs", "1", "--out", out,
              "--force")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "no-such-folder" in lines[0], bad.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@needs_data
def test_force_replaces_a_run_only_when_the_new_one_completes(tiny, tmp_path):
    """--force sets the old run aside and drops it only when the new run completes:
    an input read from inside the old run is refused, a new run that fails
    before its first checkpoint puts the old one back, and a killed start
    (config.json only) is cleared by the next run instead of blocking it."""
    train, val = tiny
    out = tmp_path / "run"
    assert run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # an input inside the run --force would replace
    bad = run("train", *TINY, "--data", train, "--val", val, "--init", out / "best.safetensors", "--out", out,
              "--force")
    assert bad.returncode == 2 and "lies inside --out" in bad.stderr, bad.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a new run that fails in its first epoch (a hook raises): the old run comes back, whole
    script = ("import sys\nfrom fer_edge.cli import build_parser\nfrom fer_edge.commands.train import cmd_train\n"
              "from fer_edge.training.settings import RunHooks\n"
              "def boom(*a):\n    raise RuntimeError('power cut')\n"
              "args = build_parser().parse_args(sys.argv[1:])\n"
              "cmd_train(args, hooks=RunHooks(epoch_trained=boom))\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script, "train", *TINY, "--data", str(train), "--val", str(val),
                           "--epochs", "1", "--out", str(out), "--force"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # not the repository: the installed package
    assert proc.returncode != 0 and "power cut" in proc.stderr, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / ".replaced").exists()
    # a completed forced run replaces the old one, and the set-aside copy is gone
    again = run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--seed", "1", "--out", out,
                "--force")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (out / ".replaced").exists()
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    # a start killed before its first checkpoint leaves its config.json only: the next run clears it
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_text(json.dumps({"fer_edge_version": "0.1.0", "seed": 0}))
    resumed = run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", killed, "--resume")
    assert resumed.returncode == 2 and "before its first checkpoint" in resumed.stderr
    fresh = run("train", *TINY, "--data", train, "--val", val, "--epochs", "1", "--out", killed)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
