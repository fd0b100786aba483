"""What the rows mean for the decision: the spread over seeds, which differences are noise, the
variants on the cost/accuracy frontier, and the depth to pick.

Intervals are Student-t 95 % intervals of a mean over n seeds (n - 1 degrees of freedom): with three
seeds the half-width is 2.48 standard errors, so a difference needs to be large against the seed-to-
seed spread before it counts. Neighbouring variants are compared paired by seed (the same seed gives
the same data order and head initialisation), which removes the spread they share.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from bench.schema import Status

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; past 30 the normal's 1.96 is
# within 4 % of t.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# What an aggregate summarises: the figures and those the table and plots show.
FIGURES = ("top1", "top5", "images_per_s", "eval_images_per_s", "step_ms_median", "data_wait_pct", "peak_mem_bytes",
           "device_peak_mem_bytes", "warmup_peak_mem_bytes", "warmup_device_peak_mem_bytes", "mfu", "compile_s",
           "gpu_hours", "acc_per_gpu_hour", "wall_s")


def t95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.96


def summary(values: list[float]) -> dict:
    """mean, std (sample), min, max and the 95 % interval of the mean; std and interval are None for one value."""
    n, mean = len(values), statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = t95(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n,
            "ci95": None if half is None else [mean - half, mean + half]}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(rows: list[dict], order: list[str]) -> list[dict]:
    """One aggregate per variant (in `order`) over its finished rows, one per seed. Failed rows are
    counted in `failed` and left out of the figures; accuracy counts `ok` rows only."""
    out = []
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        trained = [r for r in mine if r["status"] in (Status.OK, Status.OVERLAP)]
        agg = {"variant": name, "kind": mine[0].get("kind"), "unfreeze": mine[0].get("unfreeze"),
               "trainable_params": mine[0].get("trainable_params"), "runs": len(mine),
               "seeds": sorted(r.get("seed") for r in trained), "n": len(trained),
               "failed": {str(r.get("seed")): r["status"] for r in mine if r not in trained}}
        for figure in FIGURES:
            source = [r for r in trained if figure not in ("top1", "top5", "acc_per_gpu_hour") or r["status"] == Status.OK]
            values = [r[figure] for r in source if _number(r.get(figure))]
            agg[figure] = summary(values) if values else None
        out.append(agg)
    return out


def paired_difference(rows: list[dict], a: str, b: str, figure: str = "top1") -> dict | None:
    """`b` minus `a`, seed by seed, over the seeds both finished: the mean difference, its 95 % interval
    and whether the interval excludes zero. None with fewer than two shared seeds."""
    by_seed = {name: {r.get("seed"): r[figure] for r in rows
                      if r["variant"] == name and r["status"] == Status.OK and _number(r.get(figure))} for name in (a, b)}
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
    if len(seeds) < 2:
        return None
    s = summary([by_seed[b][seed] - by_seed[a][seed] for seed in seeds])
    lo, hi = s["ci95"]
    return {"from": a, "to": b, "figure": figure, "seeds": seeds, "mean": s["mean"], "std": s["std"], "ci95": [lo, hi],
            "distinguishable": lo > 0 or hi < 0}


@dataclass(frozen=True)
class Point:
    variant: str
    cost: float          # GPU-hours (mean over seeds)
    top1: float          # mean over seeds


def points(aggregates: list[dict]) -> list[Point]:
    """Variants with both an accuracy and a cost."""
    return [Point(a["variant"], a["gpu_hours"]["mean"], a["top1"]["mean"]) for a in aggregates
            if a.get("top1") and a.get("gpu_hours")]


def frontier(candidates: list[Point]) -> list[Point]:
    """The variants no other beats: none is at most as costly and at least as accurate, better in one of
    the two. Equal points are all kept. Ordered by cost."""
    def dominated(p: Point) -> bool:
        return any(q.cost <= p.cost and q.top1 >= p.top1 and (q.cost < p.cost or q.top1 > p.top1) for q in candidates)
    return sorted((p for p in candidates if not dominated(p)), key=lambda p: (p.cost, -p.top1, p.variant))


def recommend(aggregates: list[dict], rows: list[dict], tolerance: float, hours: str = "GPU-hour") -> dict | None:
    """The cheapest variant whose top-1 is within `tolerance` points of the best (with repeats: whose
    paired difference to the best has an interval reaching down to `tolerance`, so it is not shown to
    be worse by more), the frontier, and the best top-1 per GPU-hour. None without accuracy."""
    pts = points(aggregates)
    if not pts:
        return None
    best = max(pts, key=lambda p: (p.top1, -p.cost))
    by_name = {a["variant"]: a for a in aggregates}

    def close_enough(p: Point) -> bool:
        if best.top1 - p.top1 <= tolerance:
            return True
        diff = paired_difference(rows, p.variant, best.variant)  # best minus p
        return diff is not None and diff["ci95"][0] <= tolerance
    pick = min((p for p in pts if close_enough(p)), key=lambda p: (p.cost, -p.top1))
    per_hour = max((a for a in aggregates if a.get("acc_per_gpu_hour")), key=lambda a: a["acc_per_gpu_hour"]["mean"],
                   default=None)
    n = max(by_name[p.variant]["n"] for p in pts)
    gap, share = best.top1 - pick.top1, pick.cost / best.cost if best.cost else None
    if pick.variant == best.variant:
        sentence = (f"{best.variant} is the most accurate ({best.top1:.1f} %), and no cheaper variant comes within "
                    f"{tolerance:g} point{'' if tolerance == 1 else 's'} of it")
    else:
        sentence = (f"{pick.variant} reaches {pick.top1:.1f} %, {gap:.1f} points below the best ({best.variant}, "
                    f"{best.top1:.1f} %), at {100 * share:.0f} % of its {hours.split('-')[0]} time")
        if gap > tolerance:  # chosen by the interval: say how wide it is, the next seeds may narrow it
            lo, hi = paired_difference(rows, pick.variant, best.variant)["ci95"]
            sentence += (f", a gap the seeds cannot tell from {tolerance:g} point{'' if tolerance == 1 else 's'} "
                         f"(95 % interval {lo:+.1f} to {hi:+.1f}; more seeds narrow it)")
    if per_hour is not None:
        sentence += f"; the most top-1 per {hours}: {per_hour['variant']}"
    sentence += f" ({n} seed{'s' if n != 1 else ''} per variant)."
    return {"pick": pick.variant, "pick_top1": round(pick.top1, 3), "best": best.variant, "best_top1": round(best.top1, 3),
            "gap_points": round(gap, 3), "gpu_time_share": None if share is None else round(share, 4),
            "tolerance": tolerance, "seeds": n, "frontier": [p.variant for p in frontier(pts)],
            "best_per_gpu_hour": None if per_hour is None else per_hour["variant"], "sentence": sentence}


def repeated(rows: list[dict]) -> bool:
    """Whether some variant has more than one row (repeats over seeds)."""
    names = [r["variant"] for r in rows]
    return len(set(names)) < len(names)


def comparisons(rows: list[dict], order: list[str]) -> list[dict]:
    """Each variant against the one before it, paired by seed (where both have two seeds or more)."""
    return [d for a, b in zip(order, order[1:]) if (d := paired_difference(rows, a, b)) is not None]
