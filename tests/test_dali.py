"""Tests for pipelines.dali.DaliLoader on DALI's CPU operators: layout, normalisation, epoch order,
partial batches, shuffling and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loader_helpers import MEAN, STD, decode, epoch, indexed, match_flip_shift, spec

DaliLoader = pytest.importorskip("pipelines.dali", reason="NVIDIA DALI is not installed").DaliLoader


def loader(images, labels, **kw) -> DaliLoader:
    return DaliLoader(images, labels, spec(**kw))


# ----------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("train", [False, True])
def test_output_shape_dtype_and_channels_last(synth, size, train):
    images, labels = synth
    x, y = next(iter(loader(images, labels, image_size=size, train=train, augment="flip-crop" if train else "none")))
    assert x.shape == (32, 3, size, size)
    assert x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()  # really NHWC in memory, not NCHW
    assert y.dtype == torch.int64
    assert y.shape == (32,)
    assert x.device.type == "cpu"


def test_fp16_is_ignored_on_cpu(synth):
    images, labels = synth
    x, _ = next(iter(loader(images, labels, fp16=True)))
    assert x.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_normalisation_of_constant_colour(train):
    colour = np.array([255, 0, 128], dtype=np.uint8)
    images = np.broadcast_to(colour, (8, 32, 32, 3)).copy()
    labels = np.zeros(8, dtype=np.int64)
    x, _ = next(iter(loader(images, labels, batch_size=8, train=train)))
    expected = torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(colour.tolist(), MEAN, STD)],
                            dtype=torch.float32).view(1, 3, 1, 1).expand_as(x)
    torch.testing.assert_close(x, expected, atol=1e-3, rtol=0)


def test_normalisation_matches_reference_on_real_images(synth):
    images, labels = synth
    x, _ = next(iter(loader(images, labels)))
    ref = (torch.from_numpy(images[:32]).float() / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x, ref.permute(0, 3, 1, 2), atol=1e-3, rtol=0)


def test_resize_keeps_constant_colour():
    images, labels = indexed(16)
    x, y = next(iter(loader(images, labels, batch_size=16, image_size=64)))
    assert x.shape == (16, 3, 64, 64)
    np.testing.assert_array_equal(decode(x), y.numpy())
    colours = torch.from_numpy(images[:, 0, 0, :]).float() / 255.0
    expected = ((colours - torch.tensor(MEAN)) / torch.tensor(STD))[:, :, None, None].expand_as(x)
    torch.testing.assert_close(x, expected, atol=1e-3, rtol=0)  # flat everywhere, borders included


# ----------------------------------------------------------------------------------------------------
# evaluation order
# ----------------------------------------------------------------------------------------------------

def test_eval_covers_every_image_once_in_order_with_partial_batch(synth):
    images, labels = synth
    dl = loader(images, labels)
    assert len(dl) == 4
    first = epoch(dl)
    assert [y.shape[0] for _, y in first] == [32, 32, 32, 4]
    assert [x.shape[0] for x, _ in first] == [32, 32, 32, 4]
    np.testing.assert_array_equal(torch.cat([y for _, y in first]).numpy(), labels)
    # the images are the inputs, in order
    ref = (torch.from_numpy(images).float() / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(torch.cat([x for x, _ in first]), ref.permute(0, 3, 1, 2), atol=1e-3, rtol=0)


def test_eval_is_deterministic_across_epochs(synth):
    images, labels = synth
    dl = loader(images, labels)
    first, second, third = epoch(dl), epoch(dl), epoch(dl)
    for other in (second, third):
        assert len(other) == len(first)
        for (x1, y1), (x2, y2) in zip(first, other):
            assert torch.equal(x1, x2)
            assert torch.equal(y1, y2)


def test_eval_exact_multiple_has_no_extra_batch():
    images, labels = indexed(64)
    dl = loader(images, labels)
    assert len(dl) == 2
    sizes = [[y.shape[0] for _, y in dl] for _ in range(2)]
    assert sizes == [[32, 32], [32, 32]]


# ----------------------------------------------------------------------------------------------------
# training order
# ----------------------------------------------------------------------------------------------------

def test_train_drops_last_partial_batch(synth):
    images, labels = synth
    dl = loader(images, labels, train=True, augment="flip-crop")
    assert len(dl) == 100 // 32
    for _ in range(2):
        sizes = [y.shape[0] for _, y in dl]
        assert sizes == [32, 32, 32]


def test_train_shuffles_differently_every_epoch_and_keeps_pairs():
    images, labels = indexed(96)
    dl = loader(images, labels, train=True, seed=7)
    orders = []
    for _ in range(3):
        out = epoch(dl)
        assert len(out) == 3
        order = torch.cat([y for _, y in out]).numpy()
        # each image exactly once per epoch (a permutation, not sampling with replacement)
        np.testing.assert_array_equal(np.sort(order), np.arange(96))
        # the image that came with each label is that label's image
        np.testing.assert_array_equal(np.concatenate([decode(x) for x, _ in out]), order)
        orders.append(order)
    assert not np.array_equal(orders[0], np.arange(96))  # shuffled at all
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])


def test_train_order_depends_on_seed_and_is_reproducible():
    images, labels = indexed(96)
    a = [torch.cat([y for _, y in loader(images, labels, train=True, seed=s)]) for s in (1, 1, 2)]
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], a[2])


# ----------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------

def test_flip_crop_varies_and_is_flip_plus_padded_shift(synth):
    images, labels = synth
    same = np.repeat(images[3:4], 64, axis=0)
    ref = next(iter(loader(images[3:4], labels[3:4], batch_size=1)))[0][0]
    x, _ = next(iter(loader(same, labels[:64], batch_size=64, train=True, augment="flip-crop", seed=3)))
    assert not all(torch.equal(x[0], x[i]) for i in range(1, 64))
    matches = [match_flip_shift(x[i], ref) for i in range(64)]
    assert None not in matches, "an output is not a mirrored and/or padded-shifted copy of the input"
    flips = {m[0] for m in matches}
    shifts = {m[1:] for m in matches}
    assert flips == {0, 1}  # some outputs are mirrors
    assert len(shifts) > 10  # crops vary
    assert any(dy != 0 or dx != 0 for dy, dx in shifts)
    assert {np.sign(dy) for dy, _ in shifts} >= {-1, 1} and {np.sign(dx) for _, dx in shifts} >= {-1, 1}


def test_flip_crop_changes_between_epochs():
    # a non-constant image so flips and shifts are visible
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)
    same = np.repeat(img, 32, axis=0)
    dl = loader(same, np.zeros(32, dtype=np.int64), train=True, augment="flip-crop", seed=1)
    e1, e2 = epoch(dl)[0][0], epoch(dl)[0][0]
    assert not torch.equal(e1, e2)


def test_augment_none_in_training_leaves_identical_inputs_identical(synth):
    images, labels = synth
    same = np.repeat(images[3:4], 64, axis=0)
    ref = next(iter(loader(images[3:4], labels[3:4], batch_size=1)))[0][0]
    x, _ = next(iter(loader(same, labels[:64], batch_size=64, train=True, augment="none", seed=3)))
    assert all(torch.equal(x[0], x[i]) for i in range(64))
    torch.testing.assert_close(x[0], ref, atol=1e-5, rtol=0)


def test_eval_never_augments_even_if_asked(synth):
    images, labels = synth
    same = np.repeat(images[3:4], 32, axis=0)
    x, _ = next(iter(loader(same, labels[:32], train=False, augment="flip-crop")))
    assert all(torch.equal(x[0], x[i]) for i in range(32))


def test_unknown_augment_raises(synth):
    images, labels = synth
    with pytest.raises(ValueError) as err:
        loader(images, labels, augment="mixup")
    assert "mixup" in str(err.value)
    assert "flip-crop" in str(err.value) and "none" in str(err.value)


def test_augmentation_is_reproducible_from_seed(synth):
    images, labels = synth
    first = [next(iter(loader(images, labels, train=True, augment="flip-crop", seed=s))) for s in (4, 4, 5)]
    assert torch.equal(first[0][1], first[1][1]) and torch.equal(first[0][0], first[1][0])
    assert not torch.equal(first[0][0], first[2][0])


def test_a_preset_with_a_single_colour_jitter_builds_and_varies(synth, monkeypatch):
    # DALI's random.uniform rejects an empty range: a zero spread must become a constant, not a draw.
    from pipelines import augment
    from pipelines.augment import Augment
    monkeypatch.setitem(augment.AUGMENT_SPECS, "brightness-only", Augment(brightness=0.3))
    images, labels = synth
    same = np.repeat(images[:1], 32, axis=0)
    x, _ = next(iter(loader(same, labels[:32], train=True, augment="brightness-only")))
    means = x.float().mean(dim=(1, 2, 3))
    assert means.std() > 0.01  # per-sample brightness factors differ


# ----------------------------------------------------------------------------------------------------
# on a GPU: input is prepared while the model trains
# ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU pipeline needs CUDA")
def test_gpu_batches_are_prepared_while_torchs_stream_is_busy():
    """DALI's source gathers on its own stream: with the training stream busy for about a second, the
    next batches still arrive at once. On torch's current stream they would wait for it (the loop would
    block on its own previous step, and data wait would read near 100 %)."""
    import time

    from pipelines.synthetic import make_synthetic
    images, labels = make_synthetic(1024, 10, seed=5)
    gpu = torch.device("cuda")
    batches = iter(loader(images, labels, device=gpu, train=True, augment="flip-crop", image_size=64))
    next(batches)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of spinning on torch's current stream
    started = time.perf_counter()
    for _ in range(6):  # more than the prefetch queue holds: the source must be called meanwhile
        next(batches)
    waited = time.perf_counter() - started
    torch.cuda.synchronize()
    assert waited < 0.25, f"{waited:.2f} s waiting for input behind the busy stream"
