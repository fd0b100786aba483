"""Tests for bench.flops: FLOP counts against the published ResNet-50 figure, how a training step's
count follows the freezing depth, that counting leaves the model untouched, the matmul ceiling, MFU."""
from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
import torchvision
from torch import nn

from bench.flops import (
    eval_flops_per_image,
    matmul_ceiling_tflops,
    mfu,
    train_flops_per_image,
)
from models import apply_unfreeze, build_model, set_train_mode

# torchvision's ResNet50_Weights card: 4.09 GFLOPS, counted as multiply-adds (GMACs) at 224 px.
RESNET50_FORWARD_FLOPS = 2 * 4.09e9


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    with torch.device("meta"):  # shapes only: built in milliseconds, no weights initialised
        return torchvision.models.resnet50()


def test_resnet50_forward_matches_the_published_figure(resnet50):
    flops = eval_flops_per_image(resnet50, 224)
    assert flops == pytest.approx(RESNET50_FORWARD_FLOPS, rel=0.01)
    assert eval_flops_per_image(resnet50, 224, channels_last=False) == flops
    assert eval_flops_per_image(resnet50, 448) == pytest.approx(4 * flops, rel=0.001)  # convs scale with area


def test_train_flops_follow_the_depth(resnet50):
    forward = eval_flops_per_image(resnet50, 224)
    counts = {}
    for depth in (1, 3, 6, 12, 15, 25, "all"):
        apply_unfreeze(resnet50, depth, "module", "resnet50")
        counts[depth] = train_flops_per_image(resnet50, 224)
    # Head only: the forward plus fc's weight gradient (2048 x 1000 multiply-adds).
    assert forward < counts[1] <= 1.01 * forward
    assert counts[1] - forward == 2 * 2048 * 1000
    # Everything: backward = 2 x forward (input and weight gradients), less conv1's input gradient.
    assert 2.9 * forward <= counts["all"] <= 3.1 * forward
    values = list(counts.values())
    assert all(a < b for a, b in itertools.pairwise(values)), counts


def test_counting_leaves_the_model_untouched():
    model = build_model("resnet18", 10)
    plan = apply_unfreeze(model, 2, "block", "resnet18")
    set_train_mode(model, plan)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    for device in ("meta", "cpu"):
        assert train_flops_per_image(model, 32, device=device) > eval_flops_per_image(model, 32, device=device)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights and BatchNorm statistics
    # The real device and the meta device agree.
    assert train_flops_per_image(model, 32, device="cpu") == train_flops_per_image(model, 32)


def test_nothing_trainable_costs_the_forward():
    model = build_model("resnet18", 10).requires_grad_(False)
    assert train_flops_per_image(model, 32) == eval_flops_per_image(model, 32)


def test_matmul_ceiling_on_cpu_warms_up_for_the_time_asked_and_restores_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    started = time.perf_counter()
    tflops = matmul_ceiling_tflops("cpu", dtype=torch.float32, n=256, repeats=3, warmup_s=0.3, tf32=not saved)
    assert time.perf_counter() - started >= 0.3  # clocks settle over about a second on a GPU: it is not skipped
    assert math.isfinite(tflops) and tflops > 0
    assert torch.backends.cuda.matmul.allow_tf32 == saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only")
def test_fp32_ceiling_follows_the_tf32_setting_the_convolutions_train_with():
    strict = matmul_ceiling_tflops("cuda", dtype=torch.float32, n=4096, tf32=False)
    tf32 = matmul_ceiling_tflops("cuda", dtype=torch.float32, n=4096, tf32=True)
    assert tf32 > 2 * strict  # TF32 tensor cores: about 7x on an H100, against which fp32 MFU was 7x too high


def test_mfu():
    assert mfu(1000.0, 8e9, 100.0) == pytest.approx(0.08)
    for bad in ((None, 8e9, 100.0), (1000.0, 0, 100.0), (1000.0, 8e9, math.nan), (1000.0, 8e9, -1.0)):
        assert mfu(*bad) is None
