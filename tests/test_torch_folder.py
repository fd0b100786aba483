"""Tests for pipelines.torch_folder.TorchFolderLoader (`--loader torch` on image folders), on the CPU:
agreement of its evaluation view with torchvision's transform of PIL's pixels, the loader contract of
pipelines.contract (layout, order, sharding, partial batches, determinism), the random-resized crop's
parameters against torchvision's RandomResizedCrop, the routing of files between nvJPEG and the host
(simulated: no GPU here), and nvJPEG's stream ordering (simulated here; the race itself on CUDA)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from tests.folder_helpers import make_tree, reference_eval
from tests.loader_helpers import MEAN, STD, epoch, levels, spec
from PIL import Image
from torchvision.io import read_file
from torchvision.transforms import v2

from pipelines import torch_folder
from pipelines.contract import batch_count, epoch_order, shard_size
from pipelines.folder import RRC_RATIO, RRC_SCALE, load_folder, read_rgb
from pipelines.torch_folder import (DRAWS, TorchFolderLoader, decode_host, decode_on_device, device_decodable,
                                    random_resized_crop)


SIZE = 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """36 files (3 classes x 12) at shorter sides 33-72 px, some 1.5x wide, in every mode of
    folder_helpers.MODES, in ImageFolder's order, with their class labels."""
    root = make_tree(tmp_path_factory.mktemp("tree"), num_classes=3, per_class=12)
    split = load_folder(root, threads=1)[0]["train"]
    return [str(f) for f in split.files], split.labels


def make(files, labels, **kw) -> TorchFolderLoader:
    return TorchFolderLoader(files, labels, spec(**{"batch_size": 8, "image_size": SIZE, **kw}))


def images(dl) -> torch.Tensor:
    return torch.cat([x for x, _ in dl])


def eval_views(files, size=SIZE) -> torch.Tensor:
    return images(make(files, np.zeros(len(files), dtype=np.int64), image_size=size))


# ----------------------------------------------------------------------------------------------------
# agreement with torchvision's evaluation transform of PIL's pixels (what ImageFolder feeds it)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48])
def test_eval_view_agrees_with_torchvision_reference(tree, size):
    files, _ = tree
    ours = levels(eval_views(files, size))
    ref = levels(torch.stack([reference_eval(f, size, MEAN, STD) for f in files]))
    diff = (ours - ref).abs()
    # Measured on the CPU (torch 2.15, torchvision 0.29.2), 36 images in RGB, L, CMYK JPEG, RGBA and P
    # PNG, 32 and 48 px: max 0.0, mean 0.0 grey levels (decode_image gives PIL's pixels for every mode
    # and the resize is torchvision's own uint8 kernel). The bounds leave room for float rounding only.
    assert diff.max().item() <= 0.01, f"max {diff.max().item():.4f} levels"
    assert diff.mean().item() <= 0.001, f"mean {diff.mean().item():.5f} levels"


def test_host_decoder_gives_pils_pixels_in_every_mode(tree, tmp_path):
    files, _ = tree
    for f in files:  # every mode of make_tree, through decode_image
        assert torch.equal(decode_host(read_file(f), f), torch.from_numpy(read_rgb(f)).permute(2, 0, 1)), f
    # a 16-bit grey PNG: decode_image keeps 16 bits, PIL (ImageFolder) clips to 255; the loader follows PIL
    wide = tmp_path / "sixteen.png"
    Image.fromarray(np.arange(0, 40 * 50 * 30, 30, dtype=np.uint16).reshape(40, 50)).save(wide)
    out = decode_host(read_file(str(wide)), str(wide))
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(read_rgb(wide)).permute(2, 0, 1))


# ----------------------------------------------------------------------------------------------------
# contract: layout, len, order, sharding, determinism
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train,augment", [(False, "none"), (True, "flip-crop"), (True, "heavy")])
@pytest.mark.parametrize("size", [32, 48])
def test_layout_dtype_and_len(tree, train, augment, size):
    files, labels = tree  # 36 images in batches of 8: training 4 full batches, evaluation 4 + 4 images
    dl = make(files, labels, train=train, augment=augment, image_size=size, fp16=True)  # fp16: CUDA only
    out = epoch(dl)
    assert len(dl) == len(out) == (4 if train else 5)
    assert [x.shape[0] for x, _ in out] == ([8] * 4 if train else [8] * 4 + [4])
    for x, y in out:
        assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert torch.isfinite(x).all()


def test_eval_keeps_file_order_every_image_once_every_epoch(tree):
    files, labels = tree
    dl = make(files, np.arange(len(files)))  # labels = indices: the batches say which image they hold
    one, two = epoch(dl), epoch(dl)
    np.testing.assert_array_equal(torch.cat([y for _, y in one]).numpy(), np.arange(len(files)))
    for (x1, y1), (x2, y2) in zip(one, two, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the class labels travel with their images
    np.testing.assert_array_equal(torch.cat([y for _, y in make(files, labels)]).numpy(), labels)


def test_train_order_is_epoch_order_drops_partial_batch_and_changes_every_epoch(tree):
    files, _ = tree
    n = len(files) - 3  # 33 images in batches of 8: 4 batches, one image dropped
    dl = make(files[:n], np.arange(n), train=True, augment="flip-crop", seed=5)
    orders = []
    for e in range(3):
        out = epoch(dl)
        assert [y.shape[0] for _, y in out] == [8] * 4
        order = torch.cat([y for _, y in out]).numpy()
        np.testing.assert_array_equal(order, epoch_order(n, 5, e)[:32])  # the torchvision loader's order
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_train_is_deterministic_for_a_seed_whatever_the_threads(tree):
    files, labels = tree

    def run(seed, threads):
        dl = make(files, labels, train=True, augment="heavy", seed=seed, num_threads=threads)
        return [torch.cat([x for x, _ in dl]) for _ in range(2)]

    a, b, c = run(1, 2), run(1, 0), run(2, 2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # loading ahead on threads changes nothing
    assert not torch.equal(a[0], a[1])                    # a new epoch, new order and draws
    assert not torch.equal(a[0], c[0])                    # another seed


@pytest.mark.parametrize("train", [False, True])
def test_len_is_batch_count_of_the_shard(tree, train):
    files, labels = tree  # 36 images in batches of 5 over 3 ranks: shards of 12
    for rank in range(3):
        dl = make(files[:35], labels[:35], batch_size=5, train=train, augment="flip", rank=rank, world_size=3)
        expected = batch_count(shard_size(35, rank, 3, even=train), 5, drop_last=train)
        assert len(dl) == len(epoch(dl)) == expected


def test_two_ranks_split_the_single_process_global_batch(tree):
    files, _ = tree
    n = len(files) - 1  # 35: odd, so training drops one image to give both ranks the same steps
    ids = np.arange(n)
    single = epoch(make(files[:n], ids, batch_size=8, train=True, augment="heavy", seed=3))
    ranks = [epoch(make(files[:n], ids, batch_size=4, train=True, augment="heavy", seed=3, rank=r, world_size=2))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 4
    seen = [set(torch.cat([y for _, y in out]).tolist()) for out in ranks]
    assert not seen[0] & seen[1]
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
        # rank r holds positions r, r + 2, ... of the global batch, images and their augmentation
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
    # evaluation: every image once over the ranks, the shards differing by at most one
    ev = [torch.cat([y for _, y in make(files[:n], ids, rank=r, world_size=2)]) for r in range(2)]
    assert sorted(torch.cat(ev).tolist()) == list(range(n)) and abs(len(ev[0]) - len(ev[1])) <= 1


# ----------------------------------------------------------------------------------------------------
# training augmentation
# ----------------------------------------------------------------------------------------------------

def by_image(dl, n) -> list[torch.Tensor]:
    """One epoch's outputs indexed by image (labels must be the image indices)."""
    out = [None] * n
    for x, y in dl:
        for xi, i in zip(x, y.tolist()):
            out[i] = xi
    return out


def test_training_none_is_the_eval_view_and_flip_mirrors_it(tree):
    files, _ = tree
    n, ids = len(files) - 4, np.arange(len(files) - 4)  # 32: no image dropped
    ref = eval_views(files[:n])
    none = by_image(make(files[:n], ids, train=True, augment="none", seed=4), n)
    assert all(torch.equal(none[i], ref[i]) for i in range(n))
    flip = by_image(make(files[:n], ids, train=True, augment="flip", seed=4), n)
    mirrored = [torch.equal(flip[i], ref[i].flip(-1)) for i in range(n)]
    assert all(m or torch.equal(flip[i], ref[i]) for i, m in enumerate(mirrored))
    assert 0 < sum(mirrored) < n


def test_flip_crop_differs_from_eval_view_and_across_epochs(tree):
    files, _ = tree
    n, ids = len(files) - 4, np.arange(len(files) - 4)
    ref = eval_views(files[:n])
    dl = make(files[:n], ids, train=True, augment="flip-crop", seed=6)
    one, two = by_image(dl, n), by_image(dl, n)
    assert sum(not torch.allclose(one[i], ref[i], atol=1e-3) for i in range(n)) >= n - 2
    assert sum(not torch.allclose(one[i], two[i], atol=1e-3) for i in range(n)) >= n - 2


def test_random_resized_crop_stays_within_torchvisions_bounds():
    tv = v2.RandomResizedCrop(SIZE)
    assert (tuple(tv.scale), tuple(tv.ratio)) == (RRC_SCALE, RRC_RATIO)  # torchvision's defaults
    rng = np.random.default_rng(0)
    heights = rng.integers(20, 400, 4000)
    widths = np.rint(heights * np.exp(rng.uniform(np.log(0.5), np.log(2.0), 4000))).astype(np.int64)
    top, left, h, w = random_resized_crop(rng.random((4000, DRAWS)), heights, widths).T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    # h and w are sqrt(area * scale / aspect) and sqrt(area * scale * aspect), rounded to whole pixels
    area = heights * widths
    assert ((w + 0.5) * (h + 0.5) >= tv.scale[0] * area).all() and ((w - 0.5) * (h - 0.5) <= tv.scale[1] * area).all()
    assert ((w + 0.5) / (h - 0.5) >= tv.ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= tv.ratio[1]).all()
    # the spread of the draws is torchvision's: it reaches both ends of both ranges
    share, aspect = h * w / area, w / h
    assert share.min() < 0.1 and share.max() > 0.95 and aspect.min() < 0.78 and aspect.max() > 1.28


def test_random_resized_crop_draws_like_torchvision():
    # same image, many draws: torchvision's make_params and ours agree in distribution
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    tv = v2.RandomResizedCrop(SIZE)
    torch.manual_seed(0)
    theirs = np.array([[p["top"], p["left"], p["height"], p["width"]]
                       for p in (tv.make_params([image]) for _ in range(3000))])
    ours = random_resized_crop(np.random.default_rng(0).random((3000, DRAWS)), [40] * 3000, [60] * 3000)
    for stat in (lambda p: p[:, 2] * p[:, 3] / 2400,        # share of the area
                 lambda p: np.log(p[:, 3] / p[:, 2]),         # log aspect
                 lambda p: (p[:, 0] + p[:, 2] / 2) / 40,      # centre, as a share of the height
                 lambda p: (p[:, 1] + p[:, 3] / 2) / 60):     # ... and of the width
        assert abs(stat(ours).mean() - stat(theirs).mean()) < 0.02
        assert abs(stat(ours).std() - stat(theirs).std()) < 0.02


def test_random_resized_crop_takes_the_first_fit_else_the_centre_crop():
    u = np.full((3, DRAWS), 0.5)
    u[:, 0], u[:, 10] = 0.999, 0.0  # attempt 1: 99.9 % of the area at aspect 3/4: too tall for a square
    u[0, 1], u[0, 11] = (0.5 - 0.08) / 0.92, 0.5  # attempt 2 on row 0: half the area, square: fits
    u[1, 1:10] = u[1, 0]
    u[1, 11:20] = 0.0  # row 1: every attempt too tall -> the whole (square) image
    boxes = random_resized_crop(u, [40, 40, 10], [40, 40, 1000])
    assert boxes[0, 2:].tolist() == [28, 28]      # round(sqrt(800))
    assert boxes[1].tolist() == [0, 0, 40, 40]
    # a 10 x 1000 strip: no draw fits, so the centre crop at the widest aspect, 4/3
    assert boxes[2].tolist() == [0, (1000 - 13) // 2, 10, 13]


# ----------------------------------------------------------------------------------------------------
# which decoder gets which file
# ----------------------------------------------------------------------------------------------------

def encoded(mode: str, fmt: str, **kw) -> torch.Tensor:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_device_decodable_takes_8_bit_huffman_jpegs_of_1_or_3_components():
    assert device_decodable(encoded("RGB", "JPEG"))
    assert device_decodable(encoded("L", "JPEG"))
    assert device_decodable(encoded("RGB", "JPEG", progressive=True))
    assert not device_decodable(encoded("CMYK", "JPEG"))
    assert not device_decodable(encoded("RGB", "PNG"))
    assert not device_decodable(torch.tensor([0xFF, 0xD8, 0xFF, 0xD9] + [0] * 12, dtype=torch.uint8))


@pytest.mark.parametrize("fails", [False, True])
def test_device_jpegs_go_to_decode_jpeg_in_one_batched_call(tree, monkeypatch, fails):
    """The CUDA path, simulated: decode_jpeg (on the CPU) stands in for nvJPEG."""
    files, labels = tree
    calls = []
    real = torch_folder.decode_jpeg

    def fake(data, *, device, mode):
        assert isinstance(data, list) and device == torch.device("cpu") and mode == torch_folder.ImageReadMode.RGB
        calls.append(len(data))
        if fails:
            raise RuntimeError("Error while decoding JPEG images")
        return real(data, mode=mode)

    monkeypatch.setattr(torch_folder, "decode_jpeg", fake)
    dl = make(files, labels, num_threads=2)
    dl.jpeg_on_device = True
    x = images(dl)
    assert torch.equal(x, eval_views(files))  # same pixels, whichever decoder
    on_device = [Image.open(f).format == "JPEG" and Image.open(f).mode != "CMYK" for f in files]
    expected = [sum(on_device[i:i + 8]) for i in range(0, len(files), 8)]
    assert calls == [c for c in expected if c] and 0 < sum(calls) < len(files)  # no CMYK, no PNG


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_output_agrees_with_the_cpu_loader(tree):
    """nvJPEG, the consumer's stream and the float resize on the device: not measured here (no GPU in
    the sessions that wrote this); the bound is torchvision's own for nvJPEG against libjpeg-turbo."""
    files, labels = tree
    cuda = make(files, labels, device=torch.device("cuda"), fp16=True)
    out = epoch(cuda)
    assert all(x.device.type == "cuda" and x.dtype == torch.float16 for x, _ in out)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in out)
    np.testing.assert_array_equal(torch.cat([y for _, y in out]).cpu().numpy(), labels)
    diff = (levels(torch.cat([x for x, _ in out]).float().cpu()) - levels(eval_views(files))).abs()
    assert diff.mean().item() < 2.0, f"mean {diff.mean().item():.3f} levels, max {diff.max().item():.1f}"


# ----------------------------------------------------------------------------------------------------
# nvJPEG's stream: torchvision allocates decode_jpeg's images on the caller's stream and writes them on
# its own, so memory the consumer's queued kernels still read could be overwritten (issue 23)
# ----------------------------------------------------------------------------------------------------

def test_the_cpu_path_touches_no_cuda_stream(tree, monkeypatch):
    files, labels = tree
    expected = eval_views(files)

    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA stream on the CPU path")

    for name in ("Stream", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    dl = make(files, labels, num_threads=2)
    dl.jpeg_on_device = True  # decode_jpeg on the CPU stands in for nvJPEG, as above
    assert torch.equal(images(dl), expected)


def test_device_decode_runs_on_a_private_stream_the_consumer_waits_for_and_records(monkeypatch):
    """The protocol that keeps nvJPEG's writes off memory in use (simulated streams; the race: below)."""
    log: list[str] = []

    class Stream:
        def __init__(self, name: str):
            self.name = name

        def wait_stream(self, other: "Stream") -> None:
            log.append(f"{self.name} waits for {other.name}")

    class Image:
        def record_stream(self, stream: Stream) -> None:
            log.append(f"recorded on {stream.name}")

    consumer, private = Stream("consumer"), Stream("private")
    current = [consumer]

    @contextlib.contextmanager
    def stream(s: Stream):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    def decode_jpeg(data, *, device, mode):
        log.append(f"decoded on {current[-1].name}")  # where torchvision allocates the images
        return [Image() for _ in data]

    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch_folder, "decode_jpeg", decode_jpeg)
    out = decode_on_device([torch.zeros(4, dtype=torch.uint8)] * 2, torch.device("cuda"), private)
    assert len(out) == 2 and current == [consumer]
    assert log == ["decoded on private", "consumer waits for private", "recorded on consumer", "recorded on consumer"]


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory) -> list[str]:
    """Two 768 px baseline JPEGs (nvJPEG's), each the other's negative: a batch that reads the other's
    memory is off by about 100 grey levels. Large enough for the allocator's large pool, where freed
    decodes and resize buffers are handed out again whole."""
    ramp = np.linspace(0, 255, 768, dtype=np.float32)
    a = np.stack([np.tile(ramp, (768, 1)), np.tile(ramp[:, None], (1, 768)), np.full((768, 768), 40.0)], axis=-1)
    paths = []
    for name, pixels in (("a", a), ("b", 255.0 - a)):
        path = tmp_path_factory.mktemp("photos") / f"{name}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
        paths.append(str(path))
    return paths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nvJPEG, streams and the caching allocator")
@pytest.mark.parametrize("threads", [0, 2])
def test_nvjpeg_never_overwrites_images_the_consumer_still_reads(two_photos, threads):
    """Batches alternate between the two photos while the consumer's stream runs far behind the host (a
    sleep kernel per batch, as behind long training steps), so batch k's resize kernels are still queued
    when batch k + 1 is decoded. Decoded on the consumer's stream, batch k + 1 got the memory batch k had
    just freed and nvJPEG wrote it before those kernels read it. Every batch must still be its photo."""
    per_batch, batches = 4, 12
    files = [two_photos[k % 2] for k in range(batches) for _ in range(per_batch)]
    cpu = {i: levels(eval_views([f] * per_batch)) for i, f in enumerate(two_photos)}
    cuda = make(files, np.zeros(len(files), dtype=np.int64), batch_size=per_batch, device=torch.device("cuda"),
                num_threads=threads)
    out = []
    for x, _ in cuda:
        torch.cuda._sleep(50_000_000)  # tens of ms on the consumer's stream, queued ahead of the next batch's work
        out.append(x)
    torch.cuda.synchronize()
    assert len(out) == batches
    for k, x in enumerate(out):
        diff = (levels(x.float().cpu()) - cpu[k % 2]).abs().mean(dim=(1, 2, 3))
        assert diff.max().item() < 2.0, f"batch {k}: mean differences {diff.tolist()} levels from the CPU decode"
        if k >= 2:  # nvJPEG and the resize are deterministic: the same photo, the same batch
            assert torch.equal(x, out[k - 2]), f"batch {k} differs from batch {k - 2}"
