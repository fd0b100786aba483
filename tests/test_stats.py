"""Repeats, frontier and the pick, on hand-made rows whose answers are known."""
import pytest

from bench.stats import aggregate, frontier, paired_difference, points, recommend, summary


def row(variant, seed, top1, hours, status="ok", **extra):
    return {"variant": variant, "kind": "depth", "unfreeze": variant, "seed": seed, "status": status, "top1": top1,
            "top5": None if top1 is None else min(100.0, top1 + 10), "gpu_hours": hours,
            "acc_per_gpu_hour": None if top1 is None else top1 / hours,
            "images_per_s": None if hours is None else 1000.0 / hours, **extra}


def test_summary_is_a_student_t_interval():
    s = summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and (s["min"], s["max"], s["n"]) == (1.0, 3.0, 3)
    half = 4.303 * 1.0 / 3 ** 0.5  # t(0.975, 2 df) x standard error
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert summary([5.0])["std"] is None and summary([5.0])["ci95"] is None


def test_paired_difference_removes_the_shared_seed_spread():
    # seeds disagree by 10 points, but b beats a by exactly 1 point on every seed
    rows = [row("a", s, 60.0 + 10 * s, 1.0) for s in range(3)] + [row("b", s, 61.0 + 10 * s + 0.1 * (s - 1), 2.0)
                                                                  for s in range(3)]
    d = paired_difference(rows, "a", "b")
    assert d["mean"] == pytest.approx(1.0) and d["distinguishable"] and d["seeds"] == [0, 1, 2]
    half = 4.303 * 0.1 / 3 ** 0.5
    assert d["ci95"] == pytest.approx([1.0 - half, 1.0 + half])
    # unpaired, the same numbers would be noise: the spread between seeds is 10 points
    a, b = summary([r["top1"] for r in rows[:3]]), summary([r["top1"] for r in rows[3:]])
    assert a["ci95"][1] > b["ci95"][0]
    # a failed seed leaves the pair; one shared seed is not enough to say anything
    rows[4] = row("b", 1, None, 2.0, status="nan")
    assert paired_difference(rows, "a", "b")["seeds"] == [0, 2]
    assert paired_difference(rows[:1] + rows[3:4], "a", "b") is None


def test_aggregate_counts_failed_seeds_apart_and_overlap_rows_have_speed_only():
    rows = [row("a", 0, 50.0, 1.0), row("a", 1, 52.0, 1.2), row("a", 2, None, None, status="oom"),
            row("b", 0, None, 2.0, status="overlap")]
    a, b = aggregate(rows, ["a", "b", "missing"])
    assert a["n"] == 2 and a["seeds"] == [0, 1] and a["failed"] == {"2": "oom"}
    assert a["top1"]["mean"] == 51.0 and a["gpu_hours"]["mean"] == pytest.approx(1.1)
    assert b["top1"] is None and b["images_per_s"]["mean"] == 500.0


def test_frontier_with_ties_and_dominated_points():
    rows = [row("cheap", 0, 60.0, 1.0), row("twin", 0, 60.0, 1.0), row("same-cost-better", 0, 65.0, 2.0),
            row("same-cost-worse", 0, 63.0, 2.0), row("dear-worse", 0, 64.0, 3.0), row("best", 0, 70.0, 4.0)]
    pts = points(aggregate(rows, [r["variant"] for r in rows]))
    assert [p.variant for p in frontier(pts)] == ["cheap", "twin", "same-cost-better", "best"]


def test_the_pick_is_the_cheapest_within_tolerance_and_failed_rows_never_win():
    rows = [row("u1", 0, 40.0, 1.0), row("u6", 0, 69.5, 2.0), row("u12", 0, 70.0, 3.0), row("u25", 0, 70.2, 6.0),
            row("crashed", 0, None, None, status="error")]
    r = recommend(aggregate(rows, ["u1", "u6", "u12", "u25", "crashed"]), rows, tolerance=1.0)
    assert (r["pick"], r["best"]) == ("u6", "u25") and r["gap_points"] == pytest.approx(0.7)
    assert r["gpu_time_share"] == pytest.approx(2 / 6, abs=1e-4) and r["frontier"] == ["u1", "u6", "u12", "u25"]
    assert r["best_per_gpu_hour"] == "u1"
    assert r["sentence"].startswith("u6 reaches 69.5 %, 0.7 points below the best (u25, 70.2 %), at 33 % of its GPU time")
    assert recommend(aggregate(rows, ["u1", "u6", "u12", "u25"]), rows, tolerance=0.25)["pick"] == "u12"
    # a tie on top-1: the cheaper one is the best and the pick
    tie = [row("a", 0, 70.0, 2.0), row("b", 0, 70.0, 1.0)]
    assert recommend(aggregate(tie, ["a", "b"]), tie, 0.0)["pick"] == "b"
    assert recommend(aggregate([rows[-1]], ["crashed"]), [rows[-1]], 1.0) is None


def test_with_repeats_a_variant_not_shown_worse_than_the_tolerance_qualifies():
    # u6 is 1.5 points below u25 on average, but seed by seed the gap is 0.5, 1.5, 2.5: its interval
    # reaches below 1 point, so u6 is not shown to be worse by more than the tolerance
    rows = [row("u6", s, 70.0 - g, 2.0) for s, g in enumerate((0.5, 1.5, 2.5))] + \
           [row("u25", s, 70.0, 6.0) for s in range(3)]
    aggs = aggregate(rows, ["u6", "u25"])
    pick = recommend(aggs, rows, 1.0)
    assert pick["pick"] == "u6" and "a gap the seeds cannot tell from 1 point (95 % interval -1.0 to +4.0" in \
        pick["sentence"]
    tight = [row("u6", s, 68.5 + 0.01 * s, 2.0) for s in range(3)] + [row("u25", s, 70.0, 6.0) for s in range(3)]
    assert recommend(aggregate(tight, ["u6", "u25"]), tight, 1.0)["pick"] == "u25"
