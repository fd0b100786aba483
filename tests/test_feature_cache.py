"""Tests for bench.feature_cache: training the tail from cached trunk features follows the same loss
trajectory as training the whole model on the same batches; epochs, shuffling, layout, size limits."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench.feature_cache import CacheTooLarge, build_cache
from models import apply_unfreeze, build_model, set_train_mode
from models.split import split_frozen
from pipelines import NORMALIZE
from pipelines.contract import LoaderSpec
from pipelines.synthetic import make_synthetic
from pipelines.torch_loader import TorchLoader

N, CLASSES, SIZE = 48, 10, 64  # 64 px: layer4 is 2 x 2, so channels_last features are not trivially contiguous


@pytest.fixture(scope="module")
def data():
    images, labels = make_synthetic(N, CLASSES, seed=3)
    mean, std = NORMALIZE["imagenet"]
    loader = TorchLoader(images, labels, LoaderSpec(batch_size=20, train=False, image_size=SIZE, mean=mean, std=std,
                                                    device=torch.device("cpu")))
    batches = list(loader)  # evaluation order: 20, 20, 8 images
    return loader, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18", CLASSES)


def _losses(data, resnet18, unit, depth, dtype, epochs=2):
    """(losses of the whole model, losses of the tail trained from the cache), same batches, fp32."""
    loader, images, labels = data
    whole = copy.deepcopy(resnet18)
    plan = apply_unfreeze(whole, depth, unit, "resnet18")
    model = copy.deepcopy(whole)
    split = split_frozen(model)
    cache = build_cache(split, loader, device="cpu", dtype=dtype)
    assert len(cache) == N and cache.features.dtype == dtype
    batches = cache.batches(16, shuffle=True, seed=7, epoch=0, drop_last=True)
    assert len(batches) == 3

    def sgd(m):
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    ref_opt, opt = sgd(whole), sgd(split.tail)
    ref_losses, losses = [], []
    for epoch in range(epochs):
        set_train_mode(whole, plan)  # frozen BatchNorm in eval mode
        order = batches.order(epoch)
        for i in range(len(batches)):
            idx = order[i * 16:(i + 1) * 16]
            loss = nn.functional.cross_entropy(whole(images[idx]), labels[idx])
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
            ref_losses.append(loss.item())
        split.train()
        for i, (x, y) in enumerate(batches):  # each for loop is the next epoch
            assert x.dtype == torch.float32 and torch.equal(y, labels[order[i * 16:(i + 1) * 16]])
            loss = nn.functional.cross_entropy(split.tail(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return torch.tensor(ref_losses), torch.tensor(losses), split, cache


@pytest.mark.parametrize("unit, depth, cut", [("module", 1, "fc"), ("block", 2, "layer4.1")])
def test_tail_from_cache_follows_the_whole_model(data, resnet18, unit, depth, cut):
    ref, got, split, _ = _losses(data, resnet18, unit, depth, torch.float32)
    assert split.cut == cut
    # The trunk ran at another batch size than in training: equal up to float rounding.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ref[0], ref[-1])  # it trained


def test_bf16_cache_stays_close(data, resnet18):
    ref, got, _, cache = _losses(data, resnet18, "block", 2, torch.bfloat16)
    assert cache.feature_dtype == torch.float32  # handed out as the fp32 trunk produced them
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_batches_cover_every_image_once_per_epoch(data, resnet18):
    loader, images, labels = data
    model = copy.deepcopy(resnet18)
    apply_unfreeze(model, 2, "block", "resnet18")
    split = split_frozen(model)
    cache = build_cache(split, loader, device="cpu", dtype=torch.float32)
    # Stored in loader order, with the trunk's layout: channels_last features come back channels_last.
    expected = split.trunk_features(images)
    assert expected.is_contiguous(memory_format=torch.channels_last) and not expected.is_contiguous()
    plain = list(cache.batches(20, shuffle=False, drop_last=False))
    assert [x.shape[0] for x, _ in plain] == [20, 20, 8]
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in plain)
    torch.testing.assert_close(torch.cat([x for x, _ in plain]), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in plain]), labels)

    shuffled = cache.batches(20, shuffle=True, seed=1, epoch=0, drop_last=False)
    assert len(shuffled) == 3 and len(cache.batches(20, shuffle=True, drop_last=True)) == 2
    epochs = [list(shuffled) for _ in range(2)]
    for epoch, batches in enumerate(epochs):
        order = shuffled.order(epoch)
        assert sorted(order.tolist()) == list(range(N))
        torch.testing.assert_close(torch.cat([x for x, _ in batches]), expected[order], rtol=1e-4, atol=1e-5)
        assert torch.equal(torch.cat([y for _, y in batches]), labels[order])
    assert not torch.equal(shuffled.order(0), shuffled.order(1))
    # The order depends on (seed, epoch) only.
    assert torch.equal(cache.batches(20, shuffle=True, seed=1, epoch=1, drop_last=False).order(1), shuffled.order(1))


def test_too_large_a_cache_is_refused(data, resnet18):
    loader = data[0]
    model = copy.deepcopy(resnet18)
    apply_unfreeze(model, 1, "module", "resnet18")
    with pytest.raises(CacheTooLarge, match=r"GiB"):
        build_cache(split_frozen(model), loader, device="cpu", max_bytes=1000)
