"""Every seed project as a preset: its plan matches the seed's facts, and it runs end to end with --smoke."""
import json
from types import SimpleNamespace

import pytest

from bench.config import parse_config, profile_names
from bench.run import main
from bench.sweep import plan_variants
from bench.train import EvalStats
from bench.variant import EarlyStopping
from bench.variants import make_variants
from pipelines import num_classes

PRESETS = ["seed000-layerwise", "seed001-three-ways", "seed002-cnn-vs-frozen", "seed003-heavy-aug", "seed004-deep-head"]


def plan(name: str, *flags: str):
    """(every setting by name, the variants, their plans)."""
    invocation = parse_config(["--profile", name, *flags])
    s = invocation.settings
    variants = make_variants(s, invocation.given)
    plans = plan_variants(s, variants, num_classes(s.data.dataset, s.data.num_classes))
    return flat(s), variants, plans


def flat(s) -> SimpleNamespace:
    return SimpleNamespace(**s.flat(), settings=s)


def test_every_seed_has_a_preset():
    assert set(PRESETS) <= set(profile_names())


def test_seed000_layerwise_plan():
    cfg, variants, plans = plan("seed000-layerwise")
    assert (cfg.model, cfg.weights, cfg.dataset, cfg.val_size, cfg.unit) == ("resnet50", "imagenet", "cifar100", 10000, "module")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.scheduler, cfg.epochs, cfg.batch_size) == \
        ("adam", 1e-3, 1e-4, "cosine", 15, 1024)
    assert cfg.augment == "none" and cfg.normalize == "cifar" and cfg.final_best
    assert [p["unfreeze"] for p in plans] == [1, 3, 6, 12, 15, 25]
    assert [p["trainable_tensors"] for p in plans] == [2, 5, 10, 19, 25, 40]
    assert cfg.feature_cache  # augment none: the frozen layers run once per image


def test_seed000_original_choice_needs_the_cache_off(capsys):
    assert main(["--profile", "seed000-layerwise", "--frozen-bn", "train", "--dry-run"]) == 2
    assert "add --no-feature-cache" in capsys.readouterr().err
    assert main(["--profile", "seed000-layerwise", "--frozen-bn", "train", "--no-feature-cache", "--dry-run"]) == 0


def test_seed001_three_ways_plan():
    cfg, variants, plans = plan("seed001-three-ways")
    assert cfg.model == "resnet18" and cfg.dataset == "cifar100"
    assert [(v.name, v.kind) for v in variants] == [("shallow", "approach"), ("deep", "approach"), ("scratch", "approach")]
    shallow, deep, scratch = plans
    assert shallow["trainable_layers"] == ["fc"]
    assert deep["trainable_layers"] == ["fc", "layer4"]
    assert scratch["trainable_params"] == scratch["total_params"] and flat(variants[2].apply(cfg.settings)).weights == "none"


def test_seed002_cnn_vs_frozen_plan():
    cfg, variants, plans = plan("seed002-cnn-vs-frozen")
    assert cfg.dataset == "cifar10"
    runs = [(flat(v.apply(cfg.settings)).model, flat(v.apply(cfg.settings)).epochs, p["trainable_layers"])
            for v, p in zip(variants, plans)]
    assert runs[0][:2] == ("simple_cnn", 20) and plans[0]["trainable_params"] == plans[0]["total_params"]
    assert [r[:2] for r in runs[1:]] == [("resnet18", 20), ("resnet18", 50), ("resnet18", 100)]
    assert all(r[2] == ["fc"] for r in runs[1:])  # convolutions frozen, only the classifier trains


def test_seed003_heavy_aug_plan():
    cfg, variants, plans = plan("seed003-heavy-aug")
    assert (cfg.model, cfg.head, cfg.augment, cfg.optimizer, cfg.scheduler) == ("resnet50", "mlp", "heavy", "sgd", "plateau")
    assert cfg.momentum > 0 and cfg.weight_decay > 0 and cfg.early_stop == 7
    assert plans[0]["trainable_params"] == plans[0]["total_params"]


def test_seed004_deep_head_plan():
    cfg, variants, plans = plan("seed004-deep-head")
    assert (cfg.model, cfg.head, cfg.augment, cfg.normalize) == ("resnet50", "deep", "flip", "cifar")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 3e-3, 0.9, 5e-4)
    assert (cfg.scheduler, cfg.step_size, cfg.gamma, cfg.epochs, cfg.batch_size) == ("step", 10, 0.1, 20, 64)
    assert cfg.eval_split == "test"  # the real test split, not the seed's copy of the training set
    assert plans[0]["trainable_layers"] == ["fc"] and plans[0]["trainable_tensors"] == 10  # the 5-Linear head


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_end_to_end_in_miniature(name, tmp_path):
    out = tmp_path / "run"
    assert main(["--profile", name, "--smoke", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert rows and all(r["status"] == "ok" for r in rows)
    assert doc["run"]["dataset"] == "synthetic" and doc["run"]["image_size"] == 32
    names = [r["variant"] for r in rows]
    if name == "seed000-layerwise":
        assert names[:6] == [f"unfreeze-{d}" for d in (1, 3, 6, 12, 15, 25)]
        assert rows[-1]["kind"] == "final" and names[-1] == "final-" + max(rows[:6], key=lambda r: r["top1"])["variant"]
    if name == "seed001-three-ways":
        assert names == ["shallow", "deep", "scratch"] and all(r["kind"] == "approach" for r in rows)
    if name == "seed002-cnn-vs-frozen":
        assert names == ["simple_cnn-20", "resnet18-frozen-20", "resnet18-frozen-50", "resnet18-frozen-100"]
        assert [r["steps"] for r in rows] == [4, 4, 10, 20]  # the epoch budgets' ratio survives the miniature
    # what each seed showed as pictures: curves (001, 004), the best variant's confusion matrix and
    # classification report (003) and prediction grid (004); every run gets them all
    best = rows[-1] if rows[-1]["kind"] == "final" else max(rows, key=lambda r: r["top1"])
    split = "test" if best["kind"] == "final" or doc["run"]["eval_split"] == "test" else "val"
    evaluation = out / "evaluation" / f"{best['variant']}-{split}"
    for path in (out / "plots" / "curves.png", out / "plots" / "depth.png", evaluation / "confusion_matrix.png",
                 evaluation / "predictions.png", evaluation / "classification_report.csv", out / "report.md"):
        assert path.stat().st_size > 0, path
    report = json.loads((evaluation / "evaluation.json").read_text())
    assert report["top1"] == best["top1"] and report["images"] == doc["run"]["eval_images"]


def test_a_flag_the_preset_cannot_honour_is_refused(capsys):
    assert main(["--profile", "seed002-cnn-vs-frozen", "--epochs", "3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--epochs cannot be honoured" in err and len(err.strip().splitlines()) == 1


def test_unknown_preset_lists_the_real_ones(capsys):
    try:
        code = main(["--profile", "seed005-nope"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and all(name in err for name in PRESETS)


def _ev(loss, top1=50.0):
    return EvalStats(loss=loss, top1=top1, top5=90.0, images=1)


def test_early_stopping_counts_epochs_without_improvement():
    stop = EarlyStopping(patience=2, metric="val_loss")
    assert [stop.should_stop(_ev(v)) for v in (1.0, 0.9, 0.95, 0.91, 0.8, 0.85, 0.85)] == \
        [False, False, False, True, False, False, True]
    never = EarlyStopping(patience=0, metric="val_loss")
    assert not any(never.should_stop(_ev(1.0)) for _ in range(10))
    by_top1 = EarlyStopping(patience=1, metric="top1")
    assert [by_top1.should_stop(_ev(1.0, t)) for t in (10, 20, 15)] == [False, False, True]


def test_early_stopping_stops_a_run_whose_validation_stalls(tmp_path):
    out = tmp_path / "run"
    # lr 0: nothing learns, the validation loss never improves after the first epoch
    assert main(["--profile", "smoke", "--device", "cpu", "--train-size", "128", "--val-size", "64", "--batch-size", "32",
                 "--workers", "1", "--unfreeze", "1", "--epochs", "8", "--lr", "0", "--early-stop", "2",
                 "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["epochs"] == 3 and row["stopped_early"]


def test_epoch_budgets_and_train_accuracy(tmp_path):
    out = tmp_path / "run"
    assert main(["--profile", "smoke", "--device", "cpu", "--train-size", "128", "--val-size", "64", "--batch-size", "32", "--workers", "1",
                 "--unfreeze", "3", "--epoch-budgets", "1,2", "--train-acc", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["variant"], r["kind"], r["epochs"]) for r in rows] == [("epochs-1", "epochs", 1), ("epochs-2", "epochs", 2)]
    assert all("train_top1" in h for r in rows for h in r["history"]) and rows[1]["train_acc_s"] > 0


def test_seed000_with_train_acc_scores_the_cached_training_features(tmp_path):
    # The preset trains from the feature cache; --train-acc must score what the tail is trained on.
    out = tmp_path / "run"
    assert main(["--profile", "seed000-layerwise", "--smoke", "--device", "cpu", "--unfreeze", "1,3", "--train-acc",
                 "--no-evaluate-best", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]  # two depths and the final retraining
    assert all(0 <= r["history"][-1]["train_top1"] <= 100 and r["train_acc_s"] > 0 for r in rows)
