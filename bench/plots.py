"""Figures of a run's results: PNGs under `<out>/plots/`, drawn from the `run` and rows results.json holds.

Figures are `matplotlib.figure.Figure` objects rendered by Agg, never pyplot: no global figure
registry to leak into, and no display backend needed on a headless machine. Files are written
atomically, so a reader never sees half a PNG. A figure with nothing to draw is skipped; failed rows
and missing values never raise.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from bench.files import atomic_write
from bench.report import display_rows, what_ran
from bench.schema import TRAINED
from bench.stats import repeated

FIGSIZE, DPI = (12.0, 4.0), 100
MARKERS = "osD^vP*Xph"


def write_plots(out: Path, run: dict, rows: list[dict], aggregates: list[dict] | None = None) -> list[Path]:
    """Draw every figure there is data for into `<out>/plots/`; the paths written, in a fixed order.
    With repeats, the per-variant figures draw each variant's mean with its standard deviation as an
    error bar, and the curves draw every seed."""
    points = display_rows(rows, aggregates)  # one per variant: its row, or its aggregate over seeds
    styles = _styles(points)
    written = []
    per_seed = [{**r, "_repeated": True} for r in rows] if repeated(rows) else rows
    for name, draw, data in (("curves.png", _curves, per_seed), ("depth.png", _depth, points),
                             ("accuracy_vs_gpu_time.png", _accuracy_vs_time, per_seed),
                             ("frontier.png", _frontier, points), ("breakdown.png", _breakdown, rows)):
        fig = draw(run, data, styles)
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
    if not any(_value(r, key) and _trained(r) for r in rows for key, *_ in panels):
        return None
    xs, ticks, numeric = x_positions(rows)
    fig = _figure(run, ("by unfreeze depth" if numeric else "by variant") +
                  (" (mean ± std over seeds)" if any(isinstance(r.get("n"), int) for r in rows) else ""))
    for ax, (key, ylabel, scale, title) in zip(fig.subplots(1, 3), panels):
        good = [(x, _value(r, key)[0] * scale, (_value(r, key)[1] or 0.0) * scale, r) for x, r in zip(xs, rows)
                if _trained(r) and _value(r, key)]
        if numeric and good:
            # A neutral line shows the trend; the markers carry each variant's colour.
            ax.plot([g[0] for g in good], [g[1] for g in good], color="0.6", zorder=1)
            for x, y, err, r in good:
                ax.errorbar([x], [y], yerr=[err] if err else None, **styles[r.get("variant")], markersize=7,
                            linestyle="none", capsize=3, zorder=2)
        elif good:
            ax.bar([g[0] for g in good], [g[1] for g in good], width=0.6, yerr=[g[2] for g in good], capsize=3,
                   color=[styles[g[3].get("variant")]["color"] for g in good])
        if key != "top1" or not numeric:
            ax.set_ylim(bottom=0)  # bars, throughput and memory read as ratios: from zero
        ax.margins(x=0.08)
        # A row without a value here is marked, not dropped: a red x on the floor and why.
        for x, r in zip(xs, rows):
            if _trained(r) and _value(r, key):
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


def _frontier(run: dict, rows: list[dict], styles: dict) -> Figure | None:
    pick = run.get("recommendation")
    pts = [(r, _value(r, "gpu_hours"), _value(r, "top1")) for r in rows if r.get("kind") != "final"]
    pts = [(r, cost, acc) for r, cost, acc in pts if cost and acc]
    if not pick or not pts:
        return None
    who = "GPU" if str(run.get("device_used", "")).startswith("cuda") else "device"
    fig = _figure(run, f"{_split(run)} top-1 against {who}-hours per variant")
    ax = fig.subplots()
    for r, (cost, cost_sd), (acc, acc_sd) in pts:
        ax.errorbar([cost], [acc], xerr=[cost_sd] if cost_sd else None, yerr=[acc_sd] if acc_sd else None,
                    **styles[r.get("variant")], markersize=8, linestyle="none", capsize=3, label=_label(r))
    on = {r.get("variant"): (cost[0], acc[0]) for r, cost, acc in pts}
    line = [on[v] for v in pick["frontier"] if v in on]
    ax.plot(*zip(*line), color="0.5", linestyle="--", zorder=0, label="frontier")
    if pick["pick"] in on:
        ax.plot(*on[pick["pick"]], marker="*", markersize=22, markerfacecolor="none", markeredgecolor="black",
                linestyle="none", label=f"pick: {pick['pick']}")
    ax.set(xlabel=f"{who}-hours per variant (mean over seeds where repeated)", ylabel=f"{_split(run)} top-1 (%)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8)
    return fig


PHASES = (("input_ms", "input wait"), ("frozen_forward_ms", "frozen forward"),
          ("trainable_forward_ms", "trainable forward"), ("backward_ms", "backward"), ("optimizer_ms", "optimizer"))


def _breakdown(run: dict, rows: list[dict], styles: dict) -> Figure | None:
    done = [r for r in rows if isinstance(r.get("breakdown"), dict)]
    names = list(dict.fromkeys(r["variant"] for r in done))
    if not names:
        return None
    # with repeats, each variant's phases averaged over its seeds; None (no frozen prefix) counts as 0
    mean = {n: {k: statistics.fmean(r["breakdown"][k] or 0.0 for r in done if r["variant"] == n) for k, _ in PHASES}
            for n in names}
    fig = _figure(run, "where a training step's time goes (synchronised at every phase edge)")
    ax = fig.subplots()
    bottom = [0.0] * len(names)
    cmap = colormaps["Set2"]
    for i, (key, label) in enumerate(PHASES):
        heights = [mean[n][key] for n in names]
        ax.bar(range(len(names)), heights, bottom=bottom, width=0.6, color=cmap(i), label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 0,
                  ha="right" if len(names) > 6 else "center")
    ax.set(ylabel="ms per step (median of each phase)", xlabel="variant")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8, title="phase")
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
    name = str(row.get("variant")) + (f" seed {row['seed']}" if row.get("_repeated") else "")
    return name if status == "ok" else f"{name} ({status})"


def _value(row: dict, key: str) -> tuple[float, float | None] | None:
    """(value, spread) of a row's figure: a plain number, or an aggregate's mean and standard deviation."""
    v = row.get(key)
    if isinstance(v, dict) and _num(v.get("mean")):
        return v["mean"], v.get("std")
    return (v, None) if _num(v) else None


def _trained(row: dict) -> bool:
    """A row that trained to the end, or an aggregate with at least one such seed."""
    return row.get("status") in TRAINED or (isinstance(row.get("n"), int) and row["n"] > 0)


def _split(run: dict) -> str:
    return "test" if run.get("eval_on") == "test" else "validation"


