"""Tests for the DALI-free loaders, pipelines.torch_loader.TorchLoader and
pipelines.torchvision_loader.TorchvisionLoader, on the CPU: the batch contract they share with
pipelines.dali.DaliLoader (layout, normalisation, epoch order, partial batches, shuffling), the
augmentations of pipelines.augment one by one, and agreement of all three loaders' outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loader_helpers import MEAN, PAD, STD, decode, epoch, indexed, levels, match_flip_shift, spec
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipelines import torch_loader as T
from pipelines.augment import AUGMENT_SPECS, AUGMENTS, NORMALIZE, Augment
from pipelines.contract import batch_count, epoch_order, epoch_seed, shard, shard_size
from pipelines.synthetic import make_synthetic
from pipelines.torch_loader import TorchLoader
from pipelines.torchvision_loader import TorchvisionLoader, build_transform

NEW = {"torch": TorchLoader, "torchvision": TorchvisionLoader}
KINDS = ("dali", *NEW)


def dali_class():
    return pytest.importorskip("pipelines.dali").DaliLoader


def make(kind: str, images, labels, **kw):
    """A loader with the test defaults; torchvision transforms in the main process (2 CPU cores)."""
    opts = {"num_threads": 0} if kind == "torchvision" else {}
    cls = dali_class() if kind == "dali" else NEW[kind]
    return cls(images, labels, spec(**{**opts, **kw}))


def first(dl) -> torch.Tensor:
    return next(iter(dl))[0]


def normalised(images: np.ndarray) -> torch.Tensor:
    """The reference: (x/255 - mean)/std, NCHW."""
    ref = (torch.from_numpy(images).float() / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    return ref.permute(0, 3, 1, 2)


def textured(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n copies of one random image with values in 20..200 (no clamping under +-20 % brightness)."""
    img = np.random.default_rng(seed).integers(20, 201, size=(1, 32, 32, 3), dtype=np.uint8)
    return np.repeat(img, n, axis=0), np.zeros(n, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# layout, dtype, len
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("train", [False, True])
def test_output_shape_dtype_and_channels_last(kind, synth, size, train):
    images, labels = synth
    x, y = next(iter(make(kind, images, labels, image_size=size, train=train,
                          augment="heavy" if train else "none")))
    assert x.shape == (32, 3, size, size)
    assert x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()  # really NHWC in memory, not NCHW
    assert y.dtype == torch.int64 and y.shape == (32,)
    assert x.device.type == "cpu" and y.device.type == "cpu"


@pytest.mark.parametrize("kind", NEW)
def test_fp16_is_ignored_on_cpu(kind, synth):
    images, labels = synth
    assert first(make(kind, images, labels, fp16=True)).dtype == torch.float32


@pytest.mark.parametrize("kind", NEW)
def test_len_train_drops_last_partial_batch_eval_keeps_it(kind, synth):
    images, labels = synth  # 100 images, batches of 32
    train, ev = make(kind, images, labels, train=True, augment="flip-crop"), make(kind, images, labels)
    assert len(train) == 3 and len(ev) == 4
    for _ in range(2):  # every epoch, not just the first
        assert [y.shape[0] for _, y in train] == [32, 32, 32]
        assert [(x.shape[0], y.shape[0]) for x, y in ev] == [(32, 32)] * 3 + [(4, 4)]
    exact = make(kind, images[:64], labels[:64])
    assert len(exact) == 2 and [y.shape[0] for _, y in exact] == [32, 32]


# ----------------------------------------------------------------------------------------------------
# epoch order
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", NEW)
def test_eval_covers_every_image_once_in_order(kind, synth):
    images, labels = synth
    dl = make(kind, images, labels)
    one, two = epoch(dl), epoch(dl)
    np.testing.assert_array_equal(torch.cat([y for _, y in one]).numpy(), labels)
    torch.testing.assert_close(torch.cat([x for x, _ in one]), normalised(images), atol=1e-3, rtol=0)
    for (x1, y1), (x2, y2) in zip(one, two, strict=True):  # evaluation is the same every epoch
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("kind", NEW)
def test_train_epochs_are_different_permutations_and_keep_pairs(kind):
    images, labels = indexed(96)
    dl = make(kind, images, labels, train=True, seed=7)
    orders = []
    for _ in range(3):
        out = epoch(dl)
        order = torch.cat([y for _, y in out]).numpy()
        np.testing.assert_array_equal(np.sort(order), np.arange(96))  # each image once
        np.testing.assert_array_equal(np.concatenate([decode(x) for x, _ in out]), order)  # image with its label
        orders.append(order)
    assert not np.array_equal(orders[0], np.arange(96))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


@pytest.mark.parametrize("kind", NEW)
def test_train_order_is_reproducible_from_seed_epoch_by_epoch(kind):
    images, labels = indexed(96)

    def orders(seed):
        dl = make(kind, images, labels, train=True, seed=seed)
        return [torch.cat([y for _, y in dl]) for _ in range(3)]

    a, b, c = orders(1), orders(1), orders(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not any(torch.equal(p, q) for p, q in zip(a, c))


def test_batch_count():
    assert [batch_count(n, 32, drop_last=True) for n in (0, 31, 32, 100)] == [0, 0, 1, 3]
    assert [batch_count(n, 32, drop_last=False) for n in (0, 31, 32, 100)] == [0, 1, 1, 4]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 3), (1, 3), (2, 3)])
def test_len_is_batch_count_of_the_shard(kind, train, rank, world_size):
    # 100 images in batches of 11 over 3 ranks: evaluation shards of 34, 33, 33 images give 4, 3, 3
    # batches, training shards of 33 give 3; a single process gets 10 (evaluation) or 9 (training).
    images, labels = indexed(100)
    dl = make(kind, images, labels, batch_size=11, train=train, rank=rank, world_size=world_size)
    expected = batch_count(shard_size(100, rank, world_size, even=train), 11, drop_last=train)
    assert len(dl) == expected
    assert len(epoch(dl)) == expected


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 3)])
def test_dali_and_torchvision_read_the_same_epoch_order(rank, world_size):
    images, labels = indexed(96)  # 96 = 3 ranks x 32: training drops nothing

    def orders(kind):
        dl = make(kind, images, labels, train=True, seed=7, rank=rank, world_size=world_size)
        return [torch.cat([y for _, y in dl]).numpy() for _ in range(2)]

    dali, torchvision = orders("dali"), orders("torchvision")
    for e in range(2):
        expected = shard(epoch_order(96, 7, e), rank, world_size, even=True)
        np.testing.assert_array_equal(dali[e], expected)
        np.testing.assert_array_equal(torchvision[e], expected)
    assert not np.array_equal(dali[0], dali[1])


def test_torch_order_is_a_device_generator_seeded_with_epoch_seed():
    images, labels = indexed(96)
    dl = make("torch", images, labels, train=True, seed=7)
    for e in range(2):
        expected = torch.randperm(96, generator=torch.Generator().manual_seed(epoch_seed(7, e)))
        assert torch.equal(torch.cat([y for _, y in dl]), expected)


# ----------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize("train,size", [(False, 32), (True, 32), (False, 64)])
def test_normalisation_of_constant_colour(kind, train, size):
    colour = np.array([255, 0, 128], dtype=np.uint8)
    images = np.broadcast_to(colour, (8, 32, 32, 3)).copy()
    x = first(make(kind, images, np.zeros(8, dtype=np.int64), batch_size=8, train=train, image_size=size))
    expected = torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(colour.tolist(), MEAN, STD)],
                            dtype=torch.float32).view(1, 3, 1, 1).expand_as(x)
    torch.testing.assert_close(x, expected, atol=1e-3, rtol=0)  # flat everywhere, borders included


# ----------------------------------------------------------------------------------------------------
# augmentation: the whole presets
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", NEW)
def test_flip_crop_varies_and_is_flip_plus_padded_shift(kind):
    same, labels = textured(64)
    ref = normalised(same[:1])[0]
    x = first(make(kind, same, labels, batch_size=64, train=True, augment="flip-crop", seed=3))
    matches = [match_flip_shift(x[i], ref) for i in range(64)]
    assert None not in matches, "an output is not a mirrored and/or padded-shifted copy of the input"
    assert {m[0] for m in matches} == {0, 1}  # some mirrored, some not
    shifts = {m[1:] for m in matches}
    assert len(shifts) > 10
    assert {int(np.sign(dy)) for dy, _ in shifts} >= {-1, 1} and {int(np.sign(dx)) for _, dx in shifts} >= {-1, 1}
    full = set(range(-PAD, PAD + 1))  # every offset of the padded crop occurs, no more
    assert {dy for dy, _ in shifts} == full and {dx for _, dx in shifts} == full


@pytest.mark.parametrize("kind", ["dali", *NEW])
def test_heavy_varies_colour_where_flip_crop_does_not(kind):
    # A constant colour: flip and crop only move black (zero) padding around, so the centre pixel (never
    # reached by 4 px of padding, and the fixed point of a rotation) keeps its colour exactly; heavy's
    # colour jitter and grayscale change it from sample to sample.
    colour = np.array([200, 40, 90], dtype=np.uint8)
    images, labels = np.broadcast_to(colour, (64, 32, 32, 3)).copy(), np.zeros(64, dtype=np.int64)

    def centres(augment):
        try:
            x = first(make(kind, images, labels, batch_size=64, train=True, augment=augment, seed=2))
        except ValueError:
            pytest.skip(f"{kind} does not support augment {augment!r} yet")
        return levels(x)[:, :, 15:17, 15:17].mean(dim=(2, 3))  # 64 x 3 grey levels

    plain = centres("flip-crop")
    torch.testing.assert_close(plain, torch.tensor(colour).float().expand_as(plain), atol=0.05, rtol=0)
    heavy = centres("heavy")
    spread = heavy.std(dim=0)
    assert (spread > 5.0).all(), f"heavy leaves the colour almost constant: per-channel std {spread}"
    assert len({tuple(c) for c in heavy.round().tolist()}) > 32  # most samples get their own colour


@pytest.mark.parametrize("kind", NEW)
def test_augment_none_in_training_leaves_identical_inputs_identical(kind):
    same, labels = textured(64)
    x = first(make(kind, same, labels, batch_size=64, train=True, augment="none", seed=3))
    assert all(torch.equal(x[0], x[i]) for i in range(64))
    torch.testing.assert_close(x[0], normalised(same[:1])[0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", NEW)
def test_eval_never_augments_even_if_asked(kind):
    same, labels = textured(32)
    x = first(make(kind, same, labels, train=False, augment="heavy"))
    assert all(torch.equal(x[0], x[i]) for i in range(32))
    torch.testing.assert_close(x[0], normalised(same[:1])[0], atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", NEW)
def test_augmentation_is_reproducible_from_seed_and_changes_between_epochs(kind):
    same, labels = textured(32)

    def two_epochs(seed):
        dl = make(kind, same, labels, train=True, augment="heavy", seed=seed)
        return first(dl), first(dl)

    a, b, c = two_epochs(4), two_epochs(4), two_epochs(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])  # a new epoch, new draws
    assert not torch.equal(a[0], c[0])


def test_torchvision_augmentation_does_not_depend_on_worker_count(synth):
    images, labels = synth
    runs = []
    for workers in (0, 2):
        dl = make("torchvision", images, labels, train=True, augment="heavy", seed=9, num_threads=workers)
        runs.append([epoch(dl) for _ in range(2)])
    for ep0, ep1 in zip(*runs):
        for (x0, y0), (x1, y1) in zip(ep0, ep1, strict=True):
            assert torch.equal(y0, y1) and torch.equal(x0, x1)


@pytest.mark.parametrize("kind", NEW)
def test_loaders_leave_the_global_rng_alone(kind, synth):
    images, labels = synth
    state = torch.get_rng_state()
    for _ in make(kind, images, labels, train=True, augment="heavy"):
        pass
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind", ["dali", *NEW])
@pytest.mark.parametrize("train", [False, True])
def test_unknown_augment_raises(kind, synth, train):
    images, labels = synth
    with pytest.raises(ValueError) as err:
        make(kind, images, labels, train=train, augment="mixup")
    assert "mixup" in str(err.value)
    assert all(name in str(err.value) for name in AUGMENTS)


# ----------------------------------------------------------------------------------------------------
# augmentation: every Augment field on its own (new loaders; a custom preset via AUGMENT_SPECS)
# ----------------------------------------------------------------------------------------------------

def _luma(L: torch.Tensor) -> torch.Tensor:
    return L[:, 0] * 0.299 + L[:, 1] * 0.587 + L[:, 2] * 0.114


# field -> (preset, check(out_levels, in_levels)); in_levels is the un-augmented 1 x 3 x 32 x 32 image.
# Up to 1.5 grey levels of slack: torchvision works on uint8 and truncates after each op.
def _check_brightness(out, ref):
    f = out.mean(dim=(1, 2, 3)) / ref.mean()
    assert ((f > 0.8 - 1e-2) & (f < 1.2 + 1e-2)).all()
    assert (out - ref * f.view(-1, 1, 1, 1)).abs().max() < 1.5  # a pure per-image gain


def _check_contrast(out, ref):
    assert (_luma(out).mean(dim=(1, 2)) - _luma(ref).mean()).abs().max() < 1.5  # around the mean grey
    f = out.std(dim=(1, 2, 3)) / ref.std()
    assert ((f > 0.8 - 1e-2) & (f < 1.2 + 1e-2)).all() and f.std() > 0.05


def _check_saturation(out, ref):
    # a blend with grey keeps every pixel's luma, except where a channel was clipped to 0 or 255
    unclipped = ((out > 0.5) & (out < 254.5)).all(dim=1)
    assert unclipped.float().mean() > 0.5
    assert (_luma(out) - _luma(ref))[unclipped].abs().max() < 1.5
    f = (out - _luma(out)[:, None]).abs().mean(dim=(1, 2, 3)) / (ref - _luma(ref)[:, None]).abs().mean()
    assert f.min() < 0.7 and f.max() > 1.2  # factors down to 0.5 and up to 1.5 (clipping lowers the top)


def _check_hue(out, ref):
    # an HSV hue shift keeps every pixel's max (V) and min (V(1-S)) channel
    assert (out.amax(dim=1) - ref.amax(dim=1)).abs().max() < 1.5
    assert (out.amin(dim=1) - ref.amin(dim=1)).abs().max() < 1.5


def _check_rotate(out, ref):
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # zero fill comes in at the corners
    assert (corners.mean(dim=(1, 2)) < ref[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean() - 5).float().mean() > 0.8
    centre = out[:, :, 12:20, 12:20].mean(dim=(1, 2, 3))
    assert (centre - ref[:, :, 12:20, 12:20].mean()).abs().max() < 20  # the middle stays (smoothly) the same


def _check_grayscale(out, ref):
    grey = (out.amax(dim=1) - out.amin(dim=1)).amax(dim=(1, 2)) < 1.5
    assert 0 < int(grey.sum()) < len(grey) // 3  # p = 0.1 of 128 samples
    assert (_luma(out[grey]) - _luma(ref)).abs().max() < 1.5
    assert (out[~grey] - ref).abs().max() < 1e-3


SINGLE = {
    "flip": (Augment(flip=True), None),
    "pad": (Augment(pad=4), None),
    "brightness": (Augment(brightness=0.2), _check_brightness),
    "contrast": (Augment(contrast=0.2), _check_contrast),
    "saturation": (Augment(saturation=0.5), _check_saturation),
    "hue": (Augment(hue=0.05), _check_hue),
    "rotate": (Augment(rotate=15.0), _check_rotate),
    "grayscale": (Augment(grayscale=0.1), _check_grayscale),
}


@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize("field", SINGLE)
def test_each_augmentation_on_its_own_changes_images_as_specified(kind, field, monkeypatch):
    preset, check = SINGLE[field]
    monkeypatch.setitem(AUGMENT_SPECS, "only-" + field, preset)
    same, labels = textured(128)
    x = first(make(kind, same, labels, batch_size=128, train=True, augment="only-" + field, seed=11))
    ref = levels(normalised(same[:1]))
    out = levels(x)
    distinct = len({tuple(out[i].flatten()[::37].round().tolist()) for i in range(128)})
    assert distinct > (1 if field in ("flip", "grayscale") else 20), f"{field}: outputs hardly vary"
    if field == "flip":
        mirrored = (out - ref.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-3
        kept = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-3
        assert (mirrored ^ kept).all() and 30 < int(mirrored.sum()) < 98
    elif field == "pad":  # padded shifts, never mirrored
        matches = [match_flip_shift(xi, normalised(same[:1])[0]) for xi in x[:16]]
        assert None not in matches and {m[0] for m in matches} == {0}
    else:
        check(out, ref)


# ----------------------------------------------------------------------------------------------------
# TorchLoader's batched ops are torchvision's per-image functional ops
# ----------------------------------------------------------------------------------------------------

def test_torch_batched_ops_match_torchvision_functional():
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, :, :4] = 0.5  # flat grey (hue undefined), black and white rows
    x[:, :, 4:6] = 0.0
    x[:, :, 6:8] = 1.0
    f = torch.tensor([0.8, 0.9, 1.0, 1.1, 1.2, 0.85])
    h = torch.tensor([-0.5, -0.05, 0.0, 0.03, 0.05, 0.4])
    a = torch.tensor([-15.0, -7.0, 0.0, 3.0, 10.0, 15.0])
    g = torch.tensor([True, False, True, False, False, True])

    def each(fn, params):
        return torch.stack([fn(x[i], p.item()) for i, p in enumerate(params)])

    cases = [
        (T.adjust_brightness(x, f), each(TF.adjust_brightness, f)),
        (T.adjust_contrast(x, f), each(TF.adjust_contrast, f)),
        (T.adjust_saturation(x, f), each(TF.adjust_saturation, f)),
        (T.adjust_hue(x, h), each(TF.adjust_hue, h)),
        (T.rotate(x, a), each(lambda im, d: TF.rotate(im, d, interpolation=InterpolationMode.BILINEAR), a)),
        (T.to_grayscale(x, g), torch.stack([TF.rgb_to_grayscale(x[i], 3) if g[i] else x[i] for i in range(6)])),
    ]
    for mine, ref in cases:
        torch.testing.assert_close(mine, ref, atol=2e-4, rtol=0)  # 2e-4: luma weight 0.299 vs 0.2989


def test_torchvision_transform_has_exactly_the_enabled_parts():
    names = lambda aug, size=32: [type(t).__name__ for t in  # noqa: E731
                                  build_transform(aug, size=32, image_size=size, mean=MEAN, std=STD).transforms]
    assert names(Augment()) == ["ToDtype", "Normalize"]
    assert names(Augment(), 64) == ["Resize", "ToDtype", "Normalize"]
    assert names(AUGMENT_SPECS["flip-crop"]) == ["RandomCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    assert names(AUGMENT_SPECS["heavy"], 224) == ["RandomCrop", "RandomHorizontalFlip", "ColorJitter", "RandomRotation",
                                                  "RandomGrayscale", "Resize", "ToDtype", "Normalize"]


# ----------------------------------------------------------------------------------------------------
# the three loaders agree
# ----------------------------------------------------------------------------------------------------

# Tolerances in grey levels (0..255) for per-channel statistics of 512 augmented synthetic images:
# (mean, std over all pixels, std over images of the per-image mean: the spread colour jitter adds).
# Measured on 6 image/loader seeds (max |difference| of any pair of loaders):
#   none: 0 at 32 px; at 64 px torchvision's uint8 resize is 0.24 levels brighter on average (below)
#   flip-crop: 1.04, 0.61, 0.74       heavy, DALI vs torch: 1.47, 1.42, 0.85
#   heavy, torchvision vs either: 4.67, 1.48, 2.0. torchvision runs ColorJitter and RandomRotation on uint8 and
#   truncates after each op: its heavy images are on average 2.7 levels darker (signed mean over seeds).
# The tolerances are about 1.5-2x those maxima; they stay below the gaps between presets, so a loader that
# skipped padding (18 levels of mean) or colour jitter (spread +4.5 levels) would fail
# (test_agreement_tolerances_tell_the_presets_apart).
# a mirror changes no statistic, so `flip` shares `none`'s tolerance
TOL = {"none": (0.3, 0.05, 0.05), "flip": (0.3, 0.05, 0.05), "flip-crop": (2.0, 1.5, 1.5), "heavy": (2.5, 2.5, 3.0)}
TORCHVISION_HEAVY_MEAN_BIAS = 3.5  # extra mean tolerance for torchvision in heavy (uint8 truncation, above)
# Evaluation without augmentation, pixel by pixel: at 32 px all three compute (x/255 - mean)/std of the same
# uint8 values (measured max difference 1e-6 in normalised units). At 64 px the bilinear resize is the same
# (half-pixel centres, edge clamp), but DALI rounds its resized image to uint8 (<= 0.5 level off torch's float
# result; measured 0.50) and torchvision's uint8 resize rounds in fixed point (measured <= 1.0 level, a +0.24
# level mean bias at 2x). Hence 1 grey level (0.02 in CIFAR-normalised units).
EVAL_TOL = {32: 0.01, 64: 1.0 + 1e-3}
CIFAR_MEAN, CIFAR_STD = NORMALIZE["cifar"]


@pytest.fixture(scope="module")
def agreement_images():
    return make_synthetic(512, 10, seed=1)


def _run(kind, images, labels, *, size, augment, train=True):
    x = torch.cat([b for b, _ in make(kind, images, labels, batch_size=64, train=train, image_size=size,
                                     mean=CIFAR_MEAN, std=CIFAR_STD, augment=augment, seed=0)])
    return levels(x, CIFAR_MEAN, CIFAR_STD)


def _stats(L: torch.Tensor) -> torch.Tensor:
    return torch.stack([L.mean(dim=(0, 2, 3)), L.std(dim=(0, 2, 3)), L.mean(dim=(2, 3)).std(dim=0)])


@pytest.mark.parametrize("size", [32, 64])
def test_loaders_agree_pixel_by_pixel_in_evaluation(agreement_images, size):
    images, labels = agreement_images
    outs = {k: _run(k, images, labels, size=size, augment="none", train=False) for k in KINDS}
    for k in KINDS:
        assert outs[k].shape == (512, 3, size, size)
    for a, b in (("dali", "torch"), ("dali", "torchvision"), ("torch", "torchvision")):
        diff = (outs[a] - outs[b]).abs().max().item()
        assert diff <= EVAL_TOL[size], f"{a} vs {b} at {size} px: {diff:.3f} grey levels"


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("augment", AUGMENTS)
def test_loaders_agree_statistically_in_training(agreement_images, size, augment):
    images, labels = agreement_images
    stats = {}
    for k in KINDS:
        L = _run(k, images, labels, size=size, augment=augment)
        assert L.shape == (512, 3, size, size)
        stats[k] = _stats(L)
    for a, b in (("dali", "torch"), ("dali", "torchvision"), ("torch", "torchvision")):
        tol = torch.tensor(TOL[augment]).view(3, 1).expand(3, 3).clone()
        if augment == "heavy" and "torchvision" in (a, b):
            tol[0] += TORCHVISION_HEAVY_MEAN_BIAS
        diff = (stats[a] - stats[b]).abs()
        assert (diff <= tol).all(), f"{a} vs {b}, {augment} at {size} px: |d| (mean, std, spread) x RGB =\n{diff}"


def test_agreement_tolerances_tell_the_presets_apart(agreement_images):
    images, labels = agreement_images
    s = {aug: _stats(_run("torch", images, labels, size=32, augment=aug)) for aug in AUGMENTS}
    assert ((s["none"][0] - s["flip-crop"][0]).abs() > 4 * TOL["flip-crop"][0]).all()  # padding darkens
    assert ((s["heavy"][2] - s["flip-crop"][2]) > TOL["heavy"][2]).all()  # colour jitter spreads image means


def test_loader_rate_is_the_median_of_the_counted_batches_own_fetches(monkeypatch):
    """A fake clock: fetching batch k takes `fetch_ms[k]`; the first (warm-up) batches are slow, and the
    time after the last batch (nothing fetched) is nearly zero. Only counted batches' fetches count."""
    import torch

    import bench.measure
    from bench.loaders import measure_loader

    clock = [0.0]
    monkeypatch.setattr(bench.measure.time, "perf_counter", lambda: clock[0])
    fetch_ms = [40.0, 40.0, 40.0, 2.0, 6.0]  # 3 warm-up batches, then 2 counted ones

    def loader():
        for ms in fetch_ms:
            clock[0] += ms / 1e3
            yield torch.zeros(8, 3, 2, 2), torch.zeros(8, dtype=torch.long)
        clock[0] += 1e-6  # the loop's end: no batch
    result = measure_loader(loader(), torch.device("cpu"), warmup=3)
    assert result["loader_batches"] == 2
    assert result["loader_batch_ms_median"] == pytest.approx(4.0)  # median of 2 and 6 ms
    assert result["loader_images_per_s"] == pytest.approx(8 / 0.004)
