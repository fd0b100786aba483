"""`--channels-last` / `--no-channels-last` from the loaders to the convolutions: every loader (arrays and
folders, `dali`, `torch`, `torchvision`) hands out batches in the memory format `LoaderSpec.channels_last`
asks for, the flag reaches the loaders through `bench.inputs.make_loader`, and a ResNet moved to the
matching format (as bench/variant.py moves it) runs its convolutions in that format.

torch runs a convolution channels_last when its input or its weight is, so a channels_last batch into a
contiguous model keeps the whole network in NHWC: the NCHW benchmark would measure NHWC again."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from folder_helpers import make_tree
from loader_helpers import spec
from torchvision.models import resnet18

from bench.config import parse_config
from bench.inputs import make_loader
from pipelines import Split, loader_class
from pipelines.synthetic import make_synthetic

KINDS = ("dali", "torch", "torchvision")
SOURCES = ("arrays", "folder")
FORMATS = {True: torch.channels_last, False: torch.contiguous_format}
# (train, augment): the evaluation view, and training through every op of the heaviest preset
MODES = {"eval": (False, "none"), "heavy": (True, "heavy")}
SIZE = 40  # not the arrays' 32 px: the resize runs too


def in_format(x: torch.Tensor, channels_last: bool) -> bool:
    """Dense in exactly that memory format (with 3 or more channels and sides above 1 never in both)."""
    return x.is_contiguous(memory_format=FORMATS[channels_last]) and \
        not x.is_contiguous(memory_format=FORMATS[not channels_last])


def loader_type(kind: str, source: str) -> type:
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
        if source == "folder":
            from pipelines.dali_folder import decoder_problem  # only where DALI imports
            problem = decoder_problem("cpu", None)
            if problem is not None:
                pytest.skip(f"DALI's CPU image decoder does not run here: {problem}")
    return loader_class(kind, files=source == "folder")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, tuple]:
    """(images or files, labels) of 16 images per source: CIFAR-shaped arrays, and a folder of every mode."""
    files = sorted(make_tree(tmp_path_factory.mktemp("tree"), num_classes=2, per_class=8).rglob("*.*"))
    return {"arrays": make_synthetic(16, 4, seed=3),
            "folder": ([str(f) for f in files], np.array([int(f.parent.name[1:]) for f in files], dtype=np.int64))}


def first_batch(data, kind: str, source: str, channels_last: bool, mode: str = "eval",
                device: torch.device = torch.device("cpu"), **kw) -> torch.Tensor:
    train, augment = MODES[mode]
    # torchvision's transforms in the main process (2 CPU cores); DALI needs a thread
    threads = 0 if kind in ("torch", "torchvision") else 1
    loader = loader_type(kind, source)(*data[source], spec(batch_size=8, image_size=SIZE, train=train, augment=augment,
                                                           seed=1, num_threads=threads, device=device,
                                                           channels_last=channels_last, **kw))
    return next(iter(loader))[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", KINDS)
def test_batches_come_in_the_requested_memory_format_with_the_same_values(data, kind, source, mode):
    batches = {cl: first_batch(data, kind, source, cl, mode) for cl in (True, False)}
    for cl, x in batches.items():
        assert x.shape == (8, 3, SIZE, SIZE)
        assert in_format(x, cl), (cl, x.stride())
    # only the layout differs: the same seed draws the same order and augmentation in either format
    torch.testing.assert_close(batches[False], batches[True], atol=1e-5, rtol=0)


def conv_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input and output of the stem's convolution and the output of the last one, in one forward."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.conv1.register_forward_hook(lambda m, i, o: seen.update(stem_in=i[0], stem_out=o)),
             model.layer4[-1].conv2.register_forward_hook(lambda m, i, o: seen.update(last_out=o))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_convolutions_run_in_the_models_memory_format(data, kind, source, channels_last):
    model = resnet18(num_classes=4).eval().to(memory_format=FORMATS[channels_last])  # as bench/variant.py
    seen = conv_outputs(model, first_batch(data, kind, source, channels_last))
    for name, activation in seen.items():
        assert in_format(activation, channels_last), (name, activation.stride())


@pytest.mark.parametrize("flag, channels_last", [("--channels-last", True), ("--no-channels-last", False)])
@pytest.mark.parametrize("loader", ["torch", "torchvision"])
def test_the_flag_reaches_the_loader_through_make_loader(data, flag, channels_last, loader):
    s = parse_config(["--loader", loader, "--device", "cpu", "--batch-size", "8", "--image-size", str(SIZE),
                      "--workers", "0", flag]).settings
    x = next(iter(make_loader(s, Split(*data["arrays"]), torch.device("cpu"), train=True)))[0]
    assert in_format(x, channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: cuDNN's layout on the GPU")
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_half_batches_and_cudnn_convolutions_in_the_requested_format(data, kind, source, channels_last):
    if kind == "dali" and source == "folder":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
        from pipelines.dali_folder import decoder_problem
        problem = decoder_problem("mixed", torch.cuda.current_device())
        if problem is not None:
            pytest.skip(f"DALI's mixed image decoder does not run here: {problem}")
    cuda = torch.device("cuda")
    x = first_batch(data, kind, source, channels_last, "heavy", device=cuda, fp16=True)
    assert x.device.type == "cuda" and x.dtype == torch.float16 and in_format(x, channels_last)
    model = resnet18(num_classes=4).eval().to(cuda, memory_format=FORMATS[channels_last])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        seen = conv_outputs(model, x)
    for name, activation in seen.items():
        assert in_format(activation, channels_last), (name, activation.stride())
