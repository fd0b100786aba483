"""Checkpoints and `python -m bench.evaluate`: the re-scored accuracy equals the harness's own, the
report adds up, the figures are real pictures, every loader keeps the split's order, bad checkpoints
are one line and exit 2."""
import argparse
import csv
import json

import matplotlib.image
import numpy as np
import pytest
import torch

from bench.checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from bench.config import parse_config
from bench.evaluate import evaluate_model, main
from bench.inputs import load_splits, make_loader
from bench.train import Trainer, make_optimizer, make_scheduler
from models import build_model
from pipelines import NORMALIZE, LoaderSpec, loader_class
from pipelines.synthetic import make_synthetic

# The smoke preset in miniature: resnet18, 10 synthetic classes, 32 px, fp32, the torch loader.
FLAGS = ["--profile", "smoke", "--device", "cpu", "--train-size", "256", "--val-size", "128", "--batch-size", "32", "--workers", "1",
         "--loader", "torch", "--unfreeze", "all"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A model trained a few steps as the sweep trains it, the harness's evaluation of it, and its
    checkpoint at the harness's place: <run>/checkpoints/<variant>.pt."""
    cfg = parse_config(FLAGS).settings
    data, train, evaluation = load_splits(cfg)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model.model, data.num_classes, None, cfg.model.head).to(memory_format=torch.channels_last)
    t = cfg.train
    optimizer = make_optimizer(t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                               momentum=t.momentum, device=device)
    scheduler = make_scheduler(t.scheduler, optimizer, total_steps=8, steps_per_epoch=8, step_size=1, gamma=0.1)
    trainer = Trainer(model, device=device, precision=cfg.speed.precision, compile=False, compile_mode=None,
                      optimizer=optimizer, scheduler=scheduler)
    trainer.train_epoch(make_loader(cfg, train, device, train=True), max_steps=8)
    harness = trainer.evaluate(make_loader(cfg, evaluation, device, train=False), data.num_classes)
    root = tmp_path_factory.mktemp("evaluate") / "run"
    ckpt = root / "checkpoints" / "unfreeze-all.pt"
    row = {"variant": "unfreeze-all", "kind": "depth", "unfreeze": "all", "unit": "module", "status": "ok",
           "top1": round(harness.top1, 3), "top5": round(harness.top5, 3), "epochs": 1, "steps": 8,
           "history": [{"epoch": 1}]}
    save_checkpoint(ckpt, model, settings=cfg.study(), row=row, classes=data.classes)
    return argparse.Namespace(cfg=cfg, data=data, evaluation=evaluation, model=model, trainer=trainer,
                              harness=harness, root=root, ckpt=ckpt)


@pytest.fixture(scope="module")
def evaluated(run):
    """`python -m bench.evaluate <checkpoint>` with the default --out, and what it wrote."""
    assert main([str(run.ckpt), "--device", "cpu"]) == 0
    out = run.root / "evaluation" / "unfreeze-all-val"
    return out, json.loads((out / "evaluation.json").read_text())


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_cli_scores_the_checkpoint_exactly_as_the_harness_did(run, evaluated, tmp_path):
    _, result = evaluated
    assert result["split"] == "val" and result["images"] == len(run.evaluation) == 128
    assert result["variant"] == "unfreeze-all" and result["checkpoint"] == str(run.ckpt)
    assert 100.0 * result["top1_correct"] / result["images"] == run.harness.top1
    assert 100.0 * result["top5_correct"] / result["images"] == run.harness.top5
    assert result["top1"] == round(run.harness.top1, 3) == result["run_row"]["top1"]
    assert result["loss"] == pytest.approx(run.harness.loss, abs=1e-5)
    assert 10.0 < run.harness.top1 < 100.0  # a trained model that gets some right and some wrong
    # the function the harness calls, on the model in memory, gives the same
    direct = evaluate_model(run.model, run.cfg, run.evaluation, run.data.classes, tmp_path / "direct",
                            torch.device("cpu"), variant="unfreeze-all")
    assert direct["confusion_matrix"] == result["confusion_matrix"]
    assert direct["per_class"] == result["per_class"]


def test_report_adds_up(run, evaluated):
    out, result = evaluated
    cm = np.array(result["confusion_matrix"])
    labels = run.evaluation.labels
    supports = [r["support"] for r in result["per_class"]]
    assert sum(supports) == cm.sum() == len(labels)
    assert supports == np.bincount(labels, minlength=10).tolist() == cm.sum(axis=1).tolist()
    assert np.trace(cm) == result["top1_correct"]
    for i, r in enumerate(result["per_class"]):
        assert r["class"] == run.data.classes[i]
        assert r["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
        assert r["precision"] == pytest.approx(cm[i, i] / cm[:, i].sum() if cm[:, i].sum() else 0.0)
        p, q = r["precision"], r["recall"]
        assert r["f1"] == pytest.approx(2 * p * q / (p + q) if p + q else 0.0)
    for key in ("precision", "recall", "f1"):
        values = np.array([r[key] for r in result["per_class"]])
        assert result["macro_avg"][key] == pytest.approx(values.mean())
        assert result["weighted_avg"][key] == pytest.approx((values * supports).sum() / sum(supports))
    # weighted recall is accuracy
    assert 100.0 * result["weighted_avg"]["recall"] == pytest.approx(result["top1"], abs=1e-3)
    with open(out / "classification_report.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class", "precision", "recall", "f1", "support"]
    assert [r["class"] for r in rows] == [*run.data.classes, "macro avg", "weighted avg"]
    assert [int(r["support"]) for r in rows[:10]] == supports and int(rows[-1]["support"]) == 128
    assert float(rows[-2]["f1"]) == pytest.approx(result["macro_avg"]["f1"], abs=1e-6)


@pytest.mark.parametrize("name", ["confusion_matrix.png", "predictions.png"])
def test_figures_are_real_pictures(evaluated, name):
    out, _ = evaluated
    path = out / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape == (900, 1000, 4)  # 10 x 9 in at 100 dpi
    assert pixels[..., :3].std() > 0.05


def test_predictions_grid_follows_the_seed(run, evaluated, tmp_path):
    _, result = evaluated
    assert len(result["grid_indices"]) == 12 == len(set(result["grid_indices"]))
    assert main([str(run.ckpt), "--device", "cpu", "--out", str(tmp_path / "seed7"), "--seed", "7", "--split", "test",
                 "--batch-size", "50"]) == 0
    other = json.loads((tmp_path / "seed7" / "evaluation.json").read_text())
    assert other["grid_indices"] != result["grid_indices"]
    # --split test scores the test split as a --final run would, whatever the evaluation batch size
    expected = run.trainer.evaluate(make_loader(run.cfg, run.data.test, torch.device("cpu"), train=False), 10)
    assert other["split"] == "test" and other["images"] == len(run.data.test)
    assert 100.0 * other["top1_correct"] / other["images"] == expected.top1


def test_bf16_channels_last_matches_the_trainer(run, tmp_path):
    cfg = run.cfg.replace(precision="bf16", eval_batch_size=48)
    trainer = Trainer(run.model, device=torch.device("cpu"), precision="bf16", compile=False, compile_mode=None,
                      optimizer=run.trainer.optimizer, scheduler=run.trainer.scheduler)
    expected = trainer.evaluate(make_loader(cfg, run.evaluation, torch.device("cpu"), train=False), 10)
    result = evaluate_model(run.model, cfg, run.evaluation, run.data.classes, tmp_path, torch.device("cpu"))
    assert 100.0 * result["top1_correct"] / result["images"] == expected.top1
    assert 100.0 * result["top5_correct"] / result["images"] == expected.top5


LOADERS = [("torch", 1), ("torchvision", 0), ("torchvision", 2), ("dali", 1)]


@pytest.mark.parametrize("loader, workers", LOADERS, ids=[f"{n}-{w}" for n, w in LOADERS])
def test_every_loader_keeps_the_split_order_for_evaluation(loader, workers):
    """Per-image results (the prediction grid) pair each prediction with split.images[i]: every
    evaluation batch must come in the split's order, the last partial batch included, every epoch."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    images, labels = make_synthetic(100, 10, seed=5)
    mean, std = NORMALIZE["cifar"]
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
                - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    batches = loader_class(loader)(images, labels, LoaderSpec(batch_size=32, train=False, image_size=32, mean=mean,
                                                              std=std, device=torch.device("cpu"), augment="flip-crop",
                                                              seed=3, num_threads=workers))
    for _ in range(2):
        xs, ys = zip(*[(x.float().clone(), y.clone()) for x, y in batches])
        assert [len(y) for y in ys] == [32, 32, 32, 4]
        assert torch.cat(ys).numpy().tolist() == labels.tolist()
        assert torch.allclose(torch.cat(xs), expected, atol=1e-5)


def test_checkpoint_round_trip(run, tmp_path):
    ckpt = load_checkpoint(run.ckpt)
    assert ckpt["format"] == "finetune-bench-checkpoint" and ckpt["version"] == 1
    assert ckpt["settings"]["model"] == "resnet18" and ckpt["settings"]["loader"] == "torch"
    assert ckpt["row"] == {"variant": "unfreeze-all", "kind": "depth", "unfreeze": "all", "unit": "module",
                           "top1": round(run.harness.top1, 3), "top5": round(run.harness.top5, 3),
                           "epochs": 1, "steps": 8}
    assert ckpt["classes"] == run.data.classes and type(ckpt["torch"]) is str
    json.dumps(ckpt["settings"])  # JSON-able throughout
    model = build_from_checkpoint(ckpt)
    assert not model.training
    for key, value in run.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # a torch.compile wrapper is saved as the bare model
    save_checkpoint(tmp_path / "c.pt", torch.compile(run.model), settings={"model": "resnet18", "x": object()},
                    row={}, classes=run.data.classes)
    again = load_checkpoint(tmp_path / "c.pt")
    assert again["state_dict"].keys() == run.model.state_dict().keys()
    assert "x" not in again["settings"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    with pytest.raises(CheckpointError, match="classifies 10 classes; the evaluation data has 100") as e:
        build_from_checkpoint(ckpt, 100)
    assert "\n" not in str(e.value)


def _edited(run, tmp_path, edit) -> str:
    ckpt = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    edit(ckpt)
    path = tmp_path / "checkpoints" / "edited.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return str(path)


def _truncated(run, tmp_path) -> str:
    path = tmp_path / "truncated.pt"
    path.write_bytes(run.ckpt.read_bytes()[:1_000_000])
    return str(path)


def _junk(run, tmp_path) -> str:
    path = tmp_path / "junk.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return str(path)


def _state_dict_only(run, tmp_path) -> str:
    path = tmp_path / "weights.pt"
    torch.save(run.model.state_dict(), path)
    return str(path)


BAD_CHECKPOINTS = {
    "missing": (lambda run, tmp: str(tmp / "nope.pt"), "no such file"),
    "a directory": (lambda run, tmp: str(tmp), "not a file"),
    "random bytes": (_junk, "unreadable"),
    "truncated": (_truncated, "unreadable"),
    "a bare state dict": (_state_dict_only, "not a finetune-bench checkpoint (a bare state dict"),
    "version 2": (lambda run, tmp: _edited(run, tmp, lambda c: c.update(version=2)), "version 2 is not supported"),
    "another model": (lambda run, tmp: _edited(run, tmp, lambda c: c["settings"].update(model="resnet34")),
                      "do not fit resnet34 with a linear head for 10 classes"),
    "unknown model": (lambda run, tmp: _edited(run, tmp, lambda c: c["settings"].update(model="resnet51")),
                      "unknown model 'resnet51'"),
    "other class count": (lambda run, tmp: _edited(run, tmp, lambda c: c["settings"].update(num_classes=20)),
                          "classifies 10 classes; synthetic has 20"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_exit_2(case, run, tmp_path, capsys):
    make, message = BAD_CHECKPOINTS[case]
    path = make(run, tmp_path)
    capsys.readouterr()
    assert main([path, "--out", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert err.startswith("bench.evaluate: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_flag_is_one_line_exit_2(run, capsys):
    assert main([str(run.ckpt), "--split", "train"]) == 2
    assert "invalid choice: 'train'" in one_line_error(capsys)


@pytest.mark.slow
def test_a_run_keeps_its_checkpoints_and_evaluate_reproduces_each_top1(tmp_path, capsys):
    from bench.run import main as run_main
    out = tmp_path / "run"
    assert run_main(["--profile", "smoke", "--device", "cpu", "--train-size", "256", "--val-size", "128", "--batch-size", "32",
                     "--epochs", "1", "--workers", "1", "--loader", "torch", "--unfreeze", "1,3",
                     "--save-checkpoint", "--no-evaluate-best", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    best = max(rows, key=lambda r: r["top1"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "unfreeze-1.pt", "unfreeze-3.pt"]
    for name, row in [("best.pt", best), *((f"{r['variant']}.pt", r) for r in rows)]:
        capsys.readouterr()
        assert main([str(out / "checkpoints" / name), "--device", "cpu", "--out", str(tmp_path / name)]) == 0
        scored = json.loads((tmp_path / name / "evaluation.json").read_text())
        assert scored["variant"] == row["variant"] and scored["top1"] == row["top1"]
