"""Tests for the synthetic dataset, bench.train (Trainer, optimizers, schedulers) and a short real
training run through bench.variant.VariantRun on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import parse_config
from bench.context import RunContext
from bench.train import Trainer, make_optimizer, make_scheduler
from bench.variant import VariantRun
from bench.variants import Variant
from models import apply_unfreeze, build_model, set_train_mode
from pipelines import LoaderSpec, load_dataset
from pipelines.synthetic import make_synthetic
from pipelines.torch_loader import TorchLoader

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_from_seed():
    a_img, a_lab = make_synthetic(200, 10, seed=3)
    b_img, b_lab = make_synthetic(200, 10, seed=3)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = make_synthetic(200, 10, seed=4)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


def test_synthetic_shape_dtype_and_balance():
    images, labels = make_synthetic(200, 10, seed=0)
    assert images.shape == (200, 32, 32, 3)
    assert images.dtype == np.uint8
    assert labels.shape == (200,)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 20))
    assert images.std() > 20  # not blank


def test_synthetic_classes_shared_across_sample_seeds():
    # same class_seed: per-class mean images of two splits agree far better than across classes
    a_img, a_lab = make_synthetic(400, 4, seed=1)
    b_img, b_lab = make_synthetic(400, 4, seed=2)
    mean_a = np.stack([a_img[a_lab == c].astype(np.float64).mean(0) for c in range(4)])
    mean_b = np.stack([b_img[b_lab == c].astype(np.float64).mean(0) for c in range(4)])
    dist = np.abs(mean_a[:, None] - mean_b[None]).mean(axis=(2, 3, 4))  # 4 x 4
    assert (np.argmin(dist, axis=1) == np.arange(4)).all()


def test_synthetic_rejects_size_not_multiple_of_4():
    with pytest.raises(ValueError):
        make_synthetic(10, 2, seed=0, size=30)


# ----------------------------------------------------------------------------------------------------
# optimizers and schedulers
# ----------------------------------------------------------------------------------------------------

def _params():
    return [nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_make_optimizer_known(name, cls):
    opt = make_optimizer(name, _params(), lr=0.5, weight_decay=0.01, momentum=0.8, device=CPU)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.01
    if name == "sgd":
        assert group["momentum"] == 0.8


def test_make_optimizer_unknown_lists_choices():
    with pytest.raises(ValueError) as err:
        make_optimizer("lamb", _params(), lr=0.1, weight_decay=0.0, momentum=0.9, device=CPU)
    msg = str(err.value)
    assert "lamb" in msg
    for name in ("sgd", "adam", "adamw"):
        assert name in msg


def test_make_scheduler_unknown_lists_choices():
    opt = torch.optim.SGD(_params(), lr=0.1)
    with pytest.raises(ValueError) as err:
        make_scheduler("onecycle", opt, total_steps=10, steps_per_epoch=2, step_size=1, gamma=0.1)
    msg = str(err.value)
    assert "onecycle" in msg
    for name in ("cosine", "step", "none"):
        assert name in msg


def _lrs(name: str, steps: int, **kw) -> list[float]:
    opt = torch.optim.SGD(_params(), lr=1.0)
    sched = make_scheduler(name, opt, **kw)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs  # lrs[k]: lr in force for step k (0-based)


def test_step_scheduler_decays_every_step_size_epochs():
    # 5 steps per epoch, decay every 2 epochs = every 10 steps
    lrs = _lrs("step", 25, total_steps=100, steps_per_epoch=5, step_size=2, gamma=0.1)
    assert lrs[:10] == [1.0] * 10
    assert all(math.isclose(lr, 0.1) for lr in lrs[10:20])
    assert all(math.isclose(lr, 0.01) for lr in lrs[20:])


def test_cosine_scheduler_anneals_over_total_steps():
    lrs = _lrs("cosine", 20, total_steps=20, steps_per_epoch=5, step_size=1, gamma=0.1)
    assert lrs[0] == 1.0
    assert math.isclose(lrs[10], 0.5, abs_tol=1e-9)
    assert lrs[20] < 1e-9
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_none_scheduler_keeps_lr():
    lrs = _lrs("none", 30, total_steps=10, steps_per_epoch=2, step_size=1, gamma=0.1)
    assert lrs == [1.0] * 31


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data():
    train = make_synthetic(256, 10, seed=1)
    held_out = make_synthetic(100, 10, seed=2)
    return train, held_out


def _trainer(precision: str, depth="all", lr=2e-3):
    torch.manual_seed(0)
    model = build_model("resnet18", 10).to(memory_format=torch.channels_last)
    plan = apply_unfreeze(model, depth, "module", "resnet18")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer("adam", params, lr=lr, weight_decay=0.0, momentum=0.9, device=CPU)
    sched = make_scheduler("none", opt, total_steps=10, steps_per_epoch=10, step_size=1, gamma=0.1)
    trainer = Trainer(model, device=CPU, precision=precision, compile=False, compile_mode=None,
                      optimizer=opt, scheduler=sched)
    set_train_mode(model, plan)
    return trainer, model, plan


def _eval_loader(split, batch_size=32):
    images, labels = split
    return TorchLoader(images, labels, LoaderSpec(batch_size=batch_size, train=False, image_size=32,
                                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=CPU))


def test_trainer_step_bf16_on_cpu(small_data):
    trainer, model, _ = _trainer("bf16")
    (images, labels), _ = small_data
    x = ((torch.from_numpy(images[:16]).float() / 255.0 - 0.5) / 0.25).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels[:16])
    before = model.fc.weight.detach().clone()
    loss = trainer.step(x, y)
    assert loss.dim() == 0
    assert torch.isfinite(loss).item()
    assert not loss.requires_grad
    assert 0.5 < loss.float().item() < 10.0  # about ln(10) for a fresh 10-class head
    assert trainer.steps_done == 1
    assert not torch.equal(model.fc.weight, before)
    assert model.fc.weight.dtype == torch.float32  # autocast, not a cast of the weights


def test_trainer_evaluate_bf16_counts_every_image(small_data):
    trainer, model, _ = _trainer("bf16")
    _, held_out = small_data
    ev = trainer.evaluate(_eval_loader(held_out), num_classes=10)
    assert ev.images == 100
    assert 0.0 <= ev.top1 <= ev.top5 <= 100.0
    assert math.isfinite(ev.loss) and ev.loss > 0
    assert not model.training  # evaluation switches to eval mode


def test_trainer_evaluate_matches_manual_metrics(small_data):
    trainer, model, _ = _trainer("fp32")
    _, held_out = small_data
    loader = _eval_loader(held_out)
    ev = trainer.evaluate(loader, num_classes=10)
    model.eval()
    with torch.no_grad():
        logits, ys = zip(*[(model(x), y) for x, y in loader])
    logits, ys = torch.cat(logits), torch.cat(ys)
    top5 = logits.topk(5, dim=1).indices
    assert ev.images == len(ys) == 100
    assert math.isclose(ev.top1, 100.0 * (logits.argmax(1) == ys).sum().item() / 100, abs_tol=1e-9)
    assert math.isclose(ev.top5, 100.0 * (top5 == ys[:, None]).any(1).sum().item() / 100, abs_tol=1e-9)
    assert math.isclose(ev.loss, nn.functional.cross_entropy(logits, ys).item(), rel_tol=1e-4)


def test_trainer_evaluate_top5_is_100_with_few_classes():
    images, labels = make_synthetic(24, 3, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, device=CPU, precision="fp32", compile=False, compile_mode=None, optimizer=opt,
                      scheduler=make_scheduler("none", opt, total_steps=1, steps_per_epoch=1, step_size=1, gamma=1))
    ev = trainer.evaluate(_eval_loader((images, labels), batch_size=10), num_classes=3)
    assert ev.images == 24
    assert ev.top5 == 100.0


def test_train_epoch_respects_max_steps_and_next_epoch_is_whole(small_data):
    trainer, _, _ = _trainer("fp32", depth=1)
    (images, labels), _ = small_data
    loader = TorchLoader(images, labels, LoaderSpec(batch_size=32, train=True, image_size=32, mean=(0.5,) * 3,
                                                   std=(0.25,) * 3, device=CPU))
    stats = trainer.train_epoch(loader, max_steps=3)
    assert stats.images == 96 and trainer.steps_done == 3 and len(stats.step_ms) == 3
    assert math.isfinite(stats.loss)
    stats = trainer.train_epoch(loader)
    assert stats.images == 256 and trainer.steps_done == 11 and len(stats.step_ms) == 8


# ----------------------------------------------------------------------------------------------------
# a short real training run
# ----------------------------------------------------------------------------------------------------

def test_short_training_learns_synthetic_classes():
    torch.manual_seed(0)
    data = load_dataset("synthetic", num_classes=10, train_size=1024, val_size=512, seed=0)
    s = parse_config([
        "--model", "resnet18", "--weights", "none", "--dataset", "synthetic", "--num-classes", "10",
        "--train-size", "1024", "--val-size", "512", "--image-size", "32", "--epochs", "3",
        "--batch-size", "64", "--optimizer", "adam", "--lr", "2e-3", "--precision", "fp32",
        "--device", "cpu", "--workers", "2", "--no-compile",
    ]).settings
    variant = Variant("unfreeze-all", "depth", {"unfreeze": "all"})
    row = VariantRun(variant.apply(s), RunContext(CPU), variant, (data.train, data.val), data.num_classes,
                     {("resnet18", "none", None): None}).run()
    assert row["status"] == "ok"
    assert row["epochs"] == 3 and row["steps"] == 3 * (1024 // 64)
    assert row["unfreeze"] == "all"
    assert row["trainable_tensors"] == len(list(build_model("resnet18", 10).parameters()))
    assert len(row["history"]) == 3
    assert row["top1"] > 50.0  # chance is 10 %
    assert row["top5"] >= row["top1"]
    assert row["history"][-1]["train_loss"] < row["history"][0]["train_loss"]
    assert row["history"][-1]["top1"] == row["top1"]
