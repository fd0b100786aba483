"""Figures of a run's results: PNGs under `<out>/plots/`, drawn from the `run` and rows results.json holds.

Figures are `matplotlib.figure.Figure` objects rendered by Agg, never pyplot: no global figure
registry to leak into, and no display backend needed on a headless machine. Files are written
atomically, so a reader never sees half a PNG. A figure with nothing to draw is skipped; failed rows
and missing values never raise.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from bench.files import atomic_write
from bench.report import what_ran
from bench.schema import TRAINED

FIGSIZE, DPI = (12.0, 4.0), 100
MARKERS = "osD^vP*Xph"


def write_plots(out: Path, run: dict, rows: list[dict]) -> list[Path]:
    """Draw every figure there is data for into `<out>/plots/`; the paths written, in a fixed order."""
    styles = _styles(rows)
    written = []
    for name, draw in (("curves.png", _curves), ("depth.png", _depth),
                       ("accuracy_vs_gpu_time.png", _accuracy_vs_time)):
        fig = draw(run, rows, styles)
        if fig is None:
            continue
        path = Path(out) / "plots" / name
        atomic_write(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=DPI))
        fig.clear()  # drop the artists now rather than whenever the collector runs
        written.append(path)
    return written


def x_positions(rows: list[dict]) -> tuple[list[float], list[str], bool]:
    """Where each row goes on the depth figure's x axis: (positions, tick labels, numeric?).

    A pure depth sweep gets a numeric axis (spacing shows how far apart the depths are), with `all`
    one step past the deepest depth; anything else (approaches, budgets, a final row, repeated
    depths) gets one evenly spaced category per variant, labelled with its name."""
    depths = [r.get("unfreeze") for r in rows]
    numeric = (bool(rows) and all(r.get("kind") == "depth" for r in rows)
               and all(d == "all" or (isinstance(d, int) and not isinstance(d, bool)) for d in depths)
               and len(set(map(str, depths))) == len(depths))
    if not numeric:
        return [float(i) for i in range(len(rows))], [str(r.get("variant")) for r in rows], False
    ints = [d for d in depths if d != "all"]
    top = max(ints, default=0)
    step = max(1.0, 0.12 * (top - min(ints))) if ints else 1.0
    return [float(top + step) if d == "all" else float(d) for d in depths], [str(d) for d in depths], True


# --- the figures -------------------------------------------------------------------------------

def _curves(run: dict, rows: list[dict], styles: dict) -> Figure | None:
    series = [(r, _series(r, "epoch", "train_loss"), _series(r, "epoch", "top1")) for r in rows]
    series = [s for s in series if s[1] or s[2]]
    if not series:
        return None
    fig = _figure(run, "training curves")
    loss_ax, top1_ax = fig.subplots(1, 2)
    for row, loss, top1 in series:
        style = dict(**styles[row.get("variant")], markersize=5, label=_label(row))
        if loss:
            loss_ax.plot(*zip(*loss), **style)
        if top1:
            top1_ax.plot(*zip(*top1), **style)
    loss_ax.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="training loss")
    top1_ax.set(xlabel="epoch", ylabel=f"{_split(run)} top-1 (%)", title=f"{_split(run)} top-1")
    epochs = sorted({e for _, loss, top1 in series for e, _ in loss + top1})
    for ax in (loss_ax, top1_ax):
        # Whole epochs only; a one-epoch run would otherwise get ticks at 0.96, 0.98, ...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        ax.grid(alpha=0.3)
    _legend(rows, loss_ax, top1_ax)
    return fig


def _depth(run: dict, rows: list[dict], styles: dict) -> Figure | None:
    panels = [("images_per_s", "training images/s", 1.0, "training throughput"),
              ("peak_mem_bytes", "peak memory (GiB)", 2.0 ** -30, "peak memory"),
              ("top1", f"{_split(run)} top-1 (%)", 1.0, f"{_split(run)} top-1")]
    if not any(_num(r.get(key)) and r.get("status") in TRAINED for r in rows for key, *_ in panels):
        return None
    xs, ticks, numeric = x_positions(rows)
    fig = _figure(run, "by unfreeze depth" if numeric else "by variant")
    for ax, (key, ylabel, scale, title) in zip(fig.subplots(1, 3), panels):
        good = [(x, r[key] * scale, r) for x, r in zip(xs, rows) if r.get("status") in TRAINED and _num(r.get(key))]
        if numeric and good:
            # A neutral line shows the trend; the markers carry each variant's colour.
            ax.plot([g[0] for g in good], [g[1] for g in good], color="0.6", zorder=1)
            for x, y, r in good:
                ax.plot([x], [y], **styles[r.get("variant")], markersize=7, linestyle="none", zorder=2)
        elif good:
            ax.bar([g[0] for g in good], [g[1] for g in good], width=0.6,
                   color=[styles[g[2].get("variant")]["color"] for g in good])
        if key != "top1" or not numeric:
            ax.set_ylim(bottom=0)  # bars, throughput and memory read as ratios: from zero
        ax.margins(x=0.08)
        # A row without a value here is marked, not dropped: a red x on the floor and why.
        for x, r in zip(xs, rows):
            if r.get("status") in TRAINED and _num(r.get(key)):
                continue
            why = "withheld (overlap)" if r.get("status") == "overlap" else str(r.get("status"))
            ax.plot([x], [0], marker="x", color="red", markersize=9, mew=2, clip_on=False, zorder=3,
                    transform=ax.get_xaxis_transform())  # y in axes units: the floor, whatever the scale
            ax.text(x, 0.04, why, transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom",
                    color="red", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})  # legible over a line
        ax.set_xticks(xs, ticks)
        if not numeric and max(map(len, ticks)) * 7 > 330 / len(ticks):  # ~7 px a character, ~330 px a panel
            ax.tick_params(axis="x", labelrotation=30)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
        ax.set(title=title, ylabel=ylabel,
               xlabel=f"unfreeze depth (last N {run.get('unit') or 'layer'}s trained)" if numeric else "variant")
        ax.grid(alpha=0.3, axis="y")
    return fig


def _accuracy_vs_time(run: dict, rows: list[dict], styles: dict) -> Figure | None:
    devices = run.get("devices_used") or 1
    series = [(r, _series(r, "elapsed_s", "top1")) for r in rows]
    series = [(r, [(t * devices, acc) for t, acc in s]) for r, s in series if s]
    if not series:
        return None
    longest = max(t for _, s in series for t, _ in s)
    unit, per = ("hours", 3600.0) if longest >= 3600 else ("minutes", 60.0) if longest >= 60 else ("seconds", 1.0)
    who = "GPU" if str(run.get("device_used", "")).startswith("cuda") else "device"
    fig = _figure(run, f"{_split(run)} top-1 against {who} time")
    ax = fig.subplots()
    for row, s in series:
        ax.plot([t / per for t, _ in s], [acc for _, acc in s], **styles[row.get("variant")], markersize=5,
                label=_label(row))
    ax.set(xlabel=f"cumulative {who} time ({who}-{unit}, {devices} {who}{'s' if devices > 1 else ''})",
           ylabel=f"{_split(run)} top-1 (%)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    _legend(rows, ax)
    return fig


# --- helpers -----------------------------------------------------------------------------------

def _figure(run: dict, what: str) -> Figure:
    """A figure of the house size whose title says what was measured, and where."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    device = (run.get("env") or {}).get("device") or run.get("device_used") or "?"
    fig.suptitle(f"{what}: {what_ran(run)}, {device}")
    return fig


def _legend(rows: list[dict], *axes) -> None:
    """One legend for the figure, in row order, beside the last panel so it never covers a line
    (anchored to the panel, not the figure, so it also stays clear of the title). Variants with
    nothing drawn are listed with a red x, so a missing line reads as a failure, not an oversight."""
    drawn = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            drawn.setdefault(label, handle)
    handles, labels = [], []
    for row in rows:
        label = _label(row)
        if label in drawn:
            handles.append(drawn[label])
        else:
            handles.append(Line2D([], [], color="red", marker="x", linestyle="none"))
            label += ": no curve"
        labels.append(label)
    axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                    title="variant", fontsize=8, ncols=1 if len(handles) <= 14 else 2)


def _styles(rows: list[dict]) -> dict:
    """One colour and marker shape per variant, the same in every figure; the shapes keep variants
    with equal values (drawn on top of each other) and colour-blind readers apart."""
    cmap = colormaps["tab10" if len(rows) <= 10 else "tab20"]
    return {r.get("variant"): {"color": cmap(i % cmap.N), "marker": MARKERS[i % len(MARKERS)]}
            for i, r in enumerate(rows)}


def _series(row: dict, x: str, y: str) -> list[tuple[float, float]]:
    """(x, y) pairs from a row's history, skipping epochs where either is missing or not finite."""
    history = row.get("history") or []
    return [(h[x], h[y]) for h in history if isinstance(h, dict) and _num(h.get(x)) and _num(h.get(y))]


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(row: dict) -> str:
    status = row.get("status")
    return str(row.get("variant")) if status == "ok" else f"{row.get('variant')} ({status})"


def _split(run: dict) -> str:
    return "test" if run.get("eval_on") == "test" else "validation"


