"""Micro-benchmarks (pytest-benchmark): one loader batch, one training step per freezing depth, one
evaluation step, and the freeze plan. `pytest --benchmark-only` times them; plain `pytest` runs each
once as a test (see conftest.py).

Every target synchronises the device before returning, so the work finishes inside the timed region;
`benchmark.pedantic` runs explicit warm-up rounds first, so compilation and cuDNN autotuning stay out
of the statistics. Small sizes on the CPU, full size (ResNet-50, 224 px, bf16) on CUDA.
"""
import itertools

import pytest
import torch

from bench.config import parse_config
from bench.inputs import make_loader
from bench.train import Trainer, make_optimizer, make_scheduler
from models import apply_unfreeze, build_model, set_train_mode
from pipelines import LOADERS, Split
from pipelines.synthetic import make_synthetic

NO_CUDA = "CUDA is not available here; the CUDA cases run on a machine with a GPU"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
]
SIZE = {  # (model, image size, batch, precision, timed rounds, warm-up rounds)
    "cpu": ("resnet18", 32, 32, "fp32", 10, 3),
    "cuda": ("resnet50", 224, 256, "bf16", 30, 10),
}
NUM_CLASSES = 100


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_rate(benchmark, images: int) -> None:
    """images/s from the median round, into extra_info (and so into --benchmark-json)."""
    if benchmark.stats is not None:  # None when benchmarks run once as tests
        benchmark.extra_info["images_per_s"] = round(images / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("device_name", DEVICES)
def test_loader_batch(benchmark, device_name, loader):
    if loader == "dali":  # the GPU machine has DALI only once staged: its cases skip, the others still time
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    device = torch.device(device_name)
    _, size, batch, precision, rounds, warmup = SIZE[device_name]
    images, labels = make_synthetic(batch * 8, NUM_CLASSES, seed=0)
    s = parse_config(["--loader", loader, "--normalize", "cifar", "--batch-size", str(batch), "--image-size", str(size),
                      "--augment", "flip-crop", "--precision", precision, "--seed", "0", "--workers", "2"]).settings
    batches = itertools.chain.from_iterable(itertools.repeat(make_loader(s, Split(images, labels), device,
                                                                         train=True)))

    def one_batch():
        x, y = next(batches)
        synchronize(device)
        return x, y

    x, y = benchmark.pedantic(one_batch, rounds=rounds * 2, warmup_rounds=warmup, iterations=1)
    assert x.shape == (batch, 3, size, size) and x.is_contiguous(memory_format=torch.channels_last)
    assert x.device.type == device.type and y.shape == (batch,) and y.dtype == torch.int64
    assert torch.isfinite(x).all() and 0 <= int(y.min()) and int(y.max()) < NUM_CLASSES
    record_rate(benchmark, batch)


def _trainer(device: torch.device, depth, compiled: bool):
    model_name, size, batch, precision, _, _ = SIZE[device.type]
    model = build_model(model_name, NUM_CLASSES)
    plan = apply_unfreeze(model, depth, "module", model_name)
    model = model.to(device, memory_format=torch.channels_last)
    set_train_mode(model, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adam", params, lr=1e-3, weight_decay=1e-4, momentum=0.9, device=device)
    scheduler = make_scheduler("none", optimizer, total_steps=1, steps_per_epoch=1, step_size=1, gamma=1.0)
    trainer = Trainer(model, device=device, precision=precision, compile=compiled, compile_mode=None,
                      optimizer=optimizer, scheduler=scheduler)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    return trainer, plan, x, y


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("depth", [1, 6, 25, "all"], ids=lambda d: f"unfreeze-{d}")
@pytest.mark.parametrize("device_name", DEVICES)
def test_train_step(benchmark, device_name, depth, compiled):
    device = torch.device(device_name)
    _, _, batch, _, rounds, warmup = SIZE[device_name]
    trainer, plan, x, y = _trainer(device, depth, compiled)
    model = trainer.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def step():
        loss = trainer.step(x, y)
        synchronize(device)
        return loss

    loss = benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup + (3 if compiled else 0), iterations=1)
    assert loss.shape == () and torch.isfinite(loss)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items()), "a frozen parameter changed"
    assert all(params[n].grad is None for n in frozen), "a frozen parameter got a gradient"
    assert any(not torch.equal(params[n], v) for n, v in trainable.items()), "no trainable parameter moved"
    assert len(trainable) == plan.trainable_tensors
    record_rate(benchmark, batch)
    torch._dynamo.reset()


@pytest.mark.parametrize("device_name", DEVICES)
def test_eval_step(benchmark, device_name):
    device = torch.device(device_name)
    _, _, batch, _, rounds, warmup = SIZE[device_name]
    trainer, _, x, y = _trainer(device, 1, compiled=False)
    # Trainer.evaluate over a one-batch "loader": the harness's own evaluation, synchronised at its end.
    stats = benchmark.pedantic(trainer.evaluate, args=([(x, y)], NUM_CLASSES), rounds=rounds, warmup_rounds=warmup,
                               iterations=1)
    assert stats.images == batch and 0 <= stats.top1 <= stats.top5 <= 100
    record_rate(benchmark, batch)


def test_freeze_plan_resnet50(benchmark):
    model = build_model("resnet50", NUM_CLASSES)
    plan = benchmark(apply_unfreeze, model, 25, "module", "resnet50")
    assert plan.trainable_tensors == 40 and plan.num_layers == 103
    assert plan.trainable_layers[-1] == "layer3.5.bn1"
