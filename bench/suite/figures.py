"""The targets (ResNet-50, 224 px, bf16, one H200) and the figures checked against them, computed
from the steps' records; None where a step gave nothing."""
from __future__ import annotations

import operator
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: str                       # a figure of `compute_figures`
    label: str
    op: str                        # how the measured value must compare with `goal`
    goal: float
    unit: str


TARGETS = (
    Target("all_images_per_s", "full fine-tune (unfreeze all), training img/s", ">=", 8000, "img/s"),
    Target("unfreeze1_images_per_s", "unfreeze 1, training img/s", ">=", 30000, "img/s"),
    Target("loader_speedup", "loader alone / fastest training variant (torch loader)", ">=", 5, "x"),
    Target("data_wait_pct", "data wait, worst variant (torch loader)", "<", 2, "%"),
    Target("dali_loader_speedup", "loader alone / fastest training variant (DALI)", ">=", 5, "x"),
    Target("dali_data_wait_pct", "data wait, worst variant (DALI)", "<", 2, "%"),
    Target("study_gpu_minutes", "seed000-layerwise study, whole run", "<=", 2, "GPU-min"),
    Target("compile_overhead_pct", "compile overhead, share of the default study's time (estimate)", "<=", 10, "%"),
    Target("timm_ratio", "ours / timm `benchmark.py --bench train` (unfreeze all)", ">=", 1.0, "x"),
)
OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}

# The `default` profile's study: per depth, 15 epochs of 40,000 training images and an evaluation of
# 10,000 after each.
STUDY = {"depths": ("1", "3", "6", "12", "15", "25"), "epochs": 15, "train_images": 40_000, "eval_images": 10_000}
COMPILE_ESTIMATE = (
    "Compile overhead is an estimate: the default study (depths 1, 3, 6, 12, 15, 25; 15 epochs of 40,000 "
    "training images and 10,000 evaluation images each) would take, eagerly, the sum over depths of "
    "15 x (40,000 / that depth's measured img/s + 10,000 / unfreeze 1's img/s, a forward-only pass's proxy); "
    "it compiles once per depth, so it pays 6 x the mean `compile_s` of the compiled rows (unfreeze 1 and "
    "all: the training graph; the evaluation graph's compilation is not measured in throughput mode, so "
    "this is a lower bound).")


def step_figures(records: dict, step: str) -> dict:
    return (records.get(step) or {}).get("figures") or {}


def ok_rows(records: dict, step: str) -> dict:
    """unfreeze ("1", "all", ...) -> row, for a bench.run step's rows that trained to the end."""
    rows = step_figures(records, step).get("rows", {})
    return {str(r["unfreeze"]): r for r in rows.values() if r.get("status") == "ok" and r.get("images_per_s")}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def loader_figures(records: dict, step: str, prefix: str) -> dict:
    """The loader alone against the fastest variant trained with it, and the worst data wait."""
    rows = ok_rows(records, step)
    loader = step_figures(records, step).get("run", {}).get("loader_images_per_s")
    fastest = max((r["images_per_s"] for r in rows.values()), default=None)
    waits = [r["data_wait_pct"] for r in rows.values() if r.get("data_wait_pct") is not None]
    return {f"{prefix}loader_speedup": ratio(loader, fastest), f"{prefix}data_wait_pct": max(waits, default=None)}


def study_minutes(record: dict | None) -> float | None:
    """A finished seed000-layerwise study in GPU-minutes: bench.run's whole process (`run.wall_s`:
    start-up, every variant, the final retrain, plots), else the step's own wall time."""
    if not record or record.get("status") != "ok":
        return None
    wall_s = (record.get("figures") or {}).get("run", {}).get("wall_s")
    return round((wall_s or record["seconds"]) / 60, 3)


def compile_overhead_pct(eager: dict, compiled: dict) -> float | None:
    """See COMPILE_ESTIMATE: 6 compilations against the default study's eager time, estimated from the
    throughput step's img/s per depth."""
    compile_s = [r["compile_s"] for r in compiled.values() if r.get("compile_s") is not None]
    if not compile_s or any(d not in eager for d in STUDY["depths"]):
        return None
    eval_s = STUDY["eval_images"] / eager["1"]["images_per_s"]
    study_s = sum(STUDY["epochs"] * (STUDY["train_images"] / eager[d]["images_per_s"] + eval_s)
                  for d in STUDY["depths"])
    return round(100 * len(STUDY["depths"]) * statistics.mean(compile_s) / study_s, 3)


def compute_figures(records: dict) -> dict:
    eager = ok_rows(records, "throughput")
    figures = {"all_images_per_s": eager.get("all", {}).get("images_per_s"),
               "unfreeze1_images_per_s": eager.get("1", {}).get("images_per_s"),
               **loader_figures(records, "throughput", ""), **loader_figures(records, "dali", "dali_"),
               "study_gpu_minutes": study_minutes(records.get("seed000")),
               "compile_overhead_pct": compile_overhead_pct(eager, ok_rows(records, "compile")),
               "timm_images_per_s": step_figures(records, "timm").get("train_samples_per_sec")}
    figures["timm_ratio"] = ratio(figures["all_images_per_s"], figures["timm_images_per_s"])
    return figures


def check_targets(figures: dict, targets=TARGETS) -> list[dict]:
    """Each target with its measured value and `pass`, `fail`, or `no data` (its step did not run or
    gave nothing: neither a pass nor a fail)."""
    checked = []
    for t in targets:
        value = figures.get(t.key)
        result = "no data" if value is None else "pass" if OPS[t.op](value, t.goal) else "fail"
        checked.append({"key": t.key, "label": t.label, "op": t.op, "goal": t.goal, "unit": t.unit,
                        "value": value, "result": result})
    return checked
