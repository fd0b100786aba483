"""bench.plots: every figure is a real, non-blank PNG of the house size; failed rows never crash it."""
import math

import numpy as np
import pytest
from matplotlib.image import imread

from bench import plots
from bench.plots import write_plots, x_positions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FILES = ["curves.png", "depth.png", "accuracy_vs_gpu_time.png"]


def make_run(device_used="cuda", devices=1, **extra):
    return {"model": "resnet50", "dataset": "cifar100", "image_size": 224, "device_used": device_used,
            "devices_used": devices, "env": {"device": "NVIDIA H100 80GB HBM3"}, "profile": "test",
            "unit": "module", "eval_on": "val", **extra}


def make_row(unfreeze, status="ok", kind="depth", epochs=3, epoch_s=600.0, variant=None):
    """A row shaped like the harness's: ok rows with a per-epoch history, failed rows without one,
    overlap rows with accuracy withheld (top1 None, no top1 or val_loss in the history)."""
    row = {"variant": variant or f"unfreeze-{unfreeze}", "kind": kind, "unfreeze": unfreeze, "status": status}
    if status not in ("ok", "overlap"):
        return {**row, "error": f"{status}: something went wrong"}
    n = 30 if unfreeze == "all" else unfreeze
    history = [{"epoch": e, "train_loss": 4.0 * math.exp(-0.2 * e), "val_loss": 3.0 * math.exp(-0.1 * e),
                "top1": 80.0 * (1 - math.exp(-0.3 * e * n ** 0.3)), "top5": 95.0, "elapsed_s": e * epoch_s}
               for e in range(1, epochs + 1)]
    if status == "overlap":
        history = [{k: v for k, v in h.items() if k not in ("top1", "top5", "val_loss")} for h in history]
    top1 = history[-1].get("top1")
    return {**row, "images_per_s": 20000.0 / (1 + 0.1 * n), "peak_mem_bytes": int((4 + 0.8 * n) * 2**30),
            "top1": top1, "top5": None if top1 is None else 95.0, "gpu_hours": epochs * epoch_s / 3600,
            "wall_s": epochs * epoch_s, "history": history}


def sweep_rows():
    return [make_row(1), make_row(3, status="overlap"), make_row(6), make_row(12, status="oom"), make_row("all")]


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    pixels = imread(path)
    assert pixels.shape[:2] == (round(plots.FIGSIZE[1] * plots.DPI), round(plots.FIGSIZE[0] * plots.DPI)), path
    assert pixels.std() > 0.05, f"{path} looks blank"
    rgba = (pixels * 255).round().astype(np.uint8)  # one uint32 per pixel: a fast count of colours
    assert len(np.unique(rgba.reshape(-1, 4).view(np.uint32))) > 10, f"{path} has too few colours"


def test_every_figure_is_a_nonblank_png_of_the_house_size(tmp_path):
    written = write_plots(tmp_path, make_run(), sweep_rows())
    assert written == [tmp_path / "plots" / name for name in ALL_FILES]
    for path in written:
        check_png(path)
    # Atomic writes leave no temporary files behind, and a second call replaces the first.
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(ALL_FILES)
    assert write_plots(tmp_path, make_run(), sweep_rows()) == written


def test_approach_rows_with_one_epoch_on_a_cpu(tmp_path):
    rows = [make_row(u, kind="approach", epochs=1, epoch_s=0.3, variant=name)
            for u, name in ((1, "shallow"), (2, "deep"), ("all", "scratch"))]
    for path in write_plots(tmp_path, make_run(device_used="cpu", devices=None), rows):
        check_png(path)


def test_all_failed_rows_draw_nothing_and_do_not_crash(tmp_path):
    rows = [make_row(1, status="oom"), make_row(6, status="nan"), make_row("all", status="error"),
            {"variant": "unfreeze-25", "kind": "depth", "unfreeze": 25, "status": "interrupted", "history": []}]
    assert write_plots(tmp_path, make_run(), rows) == []
    assert not (tmp_path / "plots").exists()
    assert write_plots(tmp_path, make_run(), []) == []


def test_overlap_only_rows_skip_the_accuracy_figure(tmp_path):
    # Speed and loss were measured, accuracy withheld: no top-1 against time to draw.
    rows = [make_row(1, status="overlap"), make_row(6, status="overlap")]
    written = write_plots(tmp_path, make_run(), rows)
    assert [p.name for p in written] == ["curves.png", "depth.png"]
    for path in written:
        check_png(path)


def test_missing_and_non_finite_values_are_skipped(tmp_path):
    odd = make_row(6)
    odd["history"][1].update(train_loss=float("nan"), top1=None)
    odd.update(peak_mem_bytes=None, images_per_s=float("inf"))
    rows = [odd, {**make_row(12), "history": None}, make_row(25, status="error")]
    assert len(write_plots(tmp_path, make_run(), rows)) == 3


def test_a_depth_sweep_gets_a_numeric_axis_with_all_after_the_deepest():
    xs, labels, numeric = x_positions([make_row(d) for d in (1, 3, 6, 12, 15, 25, "all")])
    assert numeric
    assert xs[:6] == [1, 3, 6, 12, 15, 25] and xs[6] > 25
    assert labels == ["1", "3", "6", "12", "15", "25", "all"]


@pytest.mark.parametrize("rows", [
    [make_row(1, kind="approach", variant="shallow"), make_row("all", kind="approach", variant="scratch")],
    [make_row(6), make_row(6, kind="final", variant="final-unfreeze-6")],  # a final row among depths
    [make_row(6, variant="a"), make_row(6, variant="b")],  # repeated depths
], ids=["approaches", "final", "repeated"])
def test_other_rows_get_categorical_variant_names(rows):
    xs, labels, numeric = x_positions(rows)
    assert not numeric
    assert xs == [0.0, 1.0]
    assert labels == [r["variant"] for r in rows]


@pytest.mark.parametrize("device_used, devices, epoch_s, expected", [
    ("cuda", 1, 1800.0, "GPU-hours"),
    ("cuda:0", 2, 900.0, "GPU-hours"),  # 45 min on each of 2 GPUs: 1.5 GPU-hours
    ("cuda", 1, 900.0, "GPU-minutes"),
    ("cpu", 1, 5.0, "device-seconds"),
])
def test_time_axis_unit_and_device_name(device_used, devices, epoch_s, expected):
    rows = [make_row(6, epoch_s=epoch_s)]
    fig = plots._accuracy_vs_time(make_run(device_used, devices), rows, plots._styles(rows))
    label = fig.axes[0].get_xlabel()
    assert expected in label, label
    xs = fig.axes[0].lines[0].get_xdata()
    per = {"hours": 3600, "minutes": 60, "seconds": 1}[expected.split("-")[1]]
    assert xs[-1] == pytest.approx(3 * epoch_s * devices / per)
