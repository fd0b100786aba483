"""The shape of `results.json`, versioned, and a validator the tests run over every file they make.

Bump SCHEMA_VERSION when a field changes meaning or type, so later readers can tell versions apart.
"""
from __future__ import annotations

from enum import StrEnum

# 2: throughput rows (mode "throughput") have no accuracy; FLOPs and MFU in every row.
# 3: feature-cache rows' images_per_s is end to end (the tail's own rate is tail_images_per_s); data_wait_pct
#    is the device's idle share of the timed steps; device_peak_mem_bytes beside torch's peak_mem_bytes;
#    the whole run's wall_s and device_hours, and the TF32 settings, in run.
# 4: the rows are under `rows` (they were under `depths`, which also held approach, budget and final rows).
# 5: repeats: every row has its `seed`; `aggregates` (mean, std, min, max, ci95 per figure and variant);
#    run.recommendation (the pick and the frontier) and run.comparisons (neighbours, paired by seed).
#    Within 5: peak_mem_bytes and device_peak_mem_bytes are the steady state's, the warm-up's peaks apart
#    (warmup_peak_mem_bytes, warmup_device_peak_mem_bytes; rows without them counted the warm-up in);
#    compile_cache_hits / compile_cache_misses in compiled rows.
SCHEMA_VERSION = 5


class Status(StrEnum):
    """What happened to a variant; a row's `status`."""
    OK = "ok"
    OOM = "oom"                  # out of device memory
    NAN = "nan"                  # the training loss became non-finite
    ERROR = "error"
    OVERLAP = "overlap"          # trained and measured; accuracy withheld by the leakage guard
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM


STATUSES = tuple(Status)
FINISHED = (Status.OK, Status.OOM, Status.NAN, Status.OVERLAP)  # kept by --resume; the others run again
TRAINED = (Status.OK, Status.OVERLAP)                           # trained to the end: measurements exist

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
# Every row, whatever its status.
ROW_ALWAYS = {"variant": str, "kind": str, "unfreeze": (int, str), "unit": str, "trainable_params": int,
              "trainable_tensors": int, "trainable_layers": list, "seed": int, "status": str,
              "error": (str, type(None))}
AGGREGATE = {"variant": str, "n": int, "runs": int, "seeds": list, "failed": dict}
SPREAD = {"mean": _NUM, "std": _OPT_NUM, "min": _NUM, "max": _NUM, "n": int}
# Rows that trained to the end (ok, overlap).
ROW_TRAINED = {"images_per_s": _NUM, "eval_images_per_s": _OPT_NUM, "step_ms_median": _NUM, "data_wait_pct": _NUM,
               "peak_mem_bytes": int, "compile_s": _NUM, "epochs": int, "steps": int, "top1": _OPT_NUM,
               "top5": _OPT_NUM, "train_s": _NUM, "wall_s": _NUM, "gpu_hours": _NUM, "acc_per_gpu_hour": _OPT_NUM,
               "batch_size": int, "history": list, "mode": str, "train_gflops_per_image": _NUM,
               "achieved_tflops": _NUM, "mfu": _OPT_NUM, "tail_images_per_s": _OPT_NUM,
               "device_peak_mem_bytes": (int, type(None)), "compile_graphs": (int, type(None)),
               "warmup_peak_mem_bytes": (int, type(None)), "warmup_device_peak_mem_bytes": (int, type(None)),
               "compile_cache_hits": (int, type(None)), "compile_cache_misses": (int, type(None))}
HISTORY = {"epoch": int, "train_loss": _NUM, "elapsed_s": _NUM}
RUN = {"model": str, "dataset": str, "batch_size": int, "seed": int, "env": dict, "variants": list,
       "world_size": int, "ceiling_tflops": _NUM, "tf32": dict, "wall_s": _NUM, "device_hours": _NUM}
ENV = ("python", "torch", "torchvision", "dali", "cuda", "device", "device_count")


def _check(obj: dict, fields: dict, where: str) -> list[str]:
    errors = []
    for key, types in fields.items():
        if key not in obj:
            errors.append(f"{where}: missing {key!r}")
        elif not isinstance(obj[key], types):
            errors.append(f"{where}: {key!r} is {type(obj[key]).__name__}")
    return errors


def validate_results(doc: dict) -> list[str]:
    """Every way `doc` departs from the schema; an empty list means valid."""
    if not isinstance(doc, dict):
        return ["results.json: not an object"]
    errors = [] if doc.get("schema_version") == SCHEMA_VERSION else [f"schema_version is {doc.get('schema_version')!r}"]
    run, rows = doc.get("run"), doc.get("rows")
    if not isinstance(run, dict) or not isinstance(rows, list):
        return errors + ["'run' must be an object and 'rows' a list"]
    errors += _check(run, RUN, "run")
    errors += [f"run.env: missing {k!r}" for k in ENV if k not in run.get("env", {})]
    aggregates = doc.get("aggregates")
    if not isinstance(aggregates, list):
        return errors + ["'aggregates' must be a list"]
    for i, agg in enumerate(aggregates):
        errors += _check(agg, AGGREGATE, f"aggregates[{i}]")
        errors += [e for f in ("top1", "images_per_s") if isinstance(agg.get(f), dict)
                   for e in _check(agg[f], SPREAD, f"aggregates[{i}].{f}")]
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        errors += _check(row, ROW_ALWAYS, where)
        if row.get("status") not in STATUSES:
            errors.append(f"{where}: status {row.get('status')!r} not in {STATUSES}")
        if row.get("status") in TRAINED:
            errors += _check(row, ROW_TRAINED, where)
            for j, h in enumerate(row.get("history", [])):
                errors += _check(h, HISTORY, f"{where}.history[{j}]")
        if row.get("status") == Status.OK and row.get("mode") != "throughput" and not isinstance(row.get("top1"), _NUM):
            errors.append(f"{where}: an ok row needs top1 (only throughput rows have none)")
    return errors


def saved_rows(doc: dict) -> list:
    """A results.json's rows, in any version --resume reads."""
    return doc["rows"] if "rows" in doc else doc["depths"]
