"""Each step's outputs read back into figures. Every parser takes (the suite's folder, the step's run
folder, its log) and raises ParseError when the step left nothing readable; paths in the figures are
relative to the suite's folder, which travels."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.schema import saved_rows

RUN_FIELDS = ("model", "image_size", "batch_size", "precision", "loader", "channels_last", "compile",
              "ceiling_tflops", "ceiling_dtype", "tf32", "loader_images_per_s", "wall_s", "device_hours")
ROW_FIELDS = ("unfreeze", "status", "error", "images_per_s", "tail_images_per_s", "step_ms_median",
              "data_wait_pct", "peak_mem_bytes", "device_peak_mem_bytes", "warmup_peak_mem_bytes",
              "warmup_device_peak_mem_bytes", "mfu", "compile_s", "compile_graphs", "compile_cache_hits",
              "compile_cache_misses", "wall_s", "gpu_hours", "top1", "breakdown")
TIMM_FIELDS = ("model", "train_samples_per_sec", "train_step_time", "train_batch_size", "train_img_size",
               "param_count")


class ParseError(Exception):
    """A step ran but left no figures that can be read."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParseError(f"{path.name}: {e}") from None


def relative(out: Path, path: Path) -> str:
    return str(path.resolve().relative_to(out.resolve()))


def parse_environment(out: Path, run_dir: Path, log: Path) -> dict:
    return read_json(run_dir / "environment.json")


def parse_run(out: Path, run_dir: Path, log: Path) -> dict:
    """A bench.run results.json; fields an older bench.run did not write read as None."""
    doc = read_json(run_dir / "results.json")
    figures = {"results": relative(out, run_dir / "results.json"),
               "run": {k: doc["run"].get(k) for k in RUN_FIELDS}, "rows": {}}
    for row in saved_rows(doc):
        figures["rows"][row["variant"]] = {k: row.get(k) for k in ROW_FIELDS}
        if isinstance(row.get("trace"), dict):
            figures["rows"][row["variant"]]["trace"] = trace_summary(out, row["trace"])
    return figures


def trace_summary(out: Path, trace: dict) -> dict:
    file = trace.get("file")
    try:
        file = relative(out, Path(file)) if file else None
    except ValueError:  # written outside the folder (--trace-dir): kept as bench.run wrote it
        pass
    top = [{"name": t.get("name"), "pct": t.get("pct")} for t in (trace.get("top") or [])[:5]]
    return {"idle_pct": trace.get("idle_pct"), "layout_copies": trace.get("layout_copies"), "file": file, "top": top}


def parse_timm(out: Path, run_dir: Path, log: Path) -> dict:
    """timm writes its results to --results-file and also prints them after a `--result` line."""
    try:
        result = read_json(run_dir / "timm.json")
    except ParseError:
        text = log.read_text(errors="replace")
        if "--result\n" not in text:
            raise
        result = json.loads(text.rsplit("--result\n", 1)[1])
    if "error" in result or "train_samples_per_sec" not in result:
        raise ParseError(f"timm reports no train result: {result.get('error', result)}")
    return {k: result.get(k) for k in TIMM_FIELDS}


def parse_loaders(out: Path, run_dir: Path, log: Path) -> dict:
    """bench.loaders' --json rows. A loader it could not build here (DALI missing) or timed no batch of
    keeps its reason, so the summary says why it has no figure."""
    path = run_dir / "loaders.json"
    loaders = {}
    for row in read_json(path).get("rows") or []:
        figures = {"images_per_s": row.get("loader_images_per_s"), "batch_ms_median": row.get("loader_batch_ms_median"),
                   "batches": row.get("loader_batches")}
        if figures["images_per_s"] is None:
            figures["error"] = f"not measured: {row.get('error') or 'no batch was timed'}"
        loaders[row["loader"]] = figures
    if not loaders:
        raise ParseError("bench.loaders wrote no rows")
    return {"loaders": loaders, "json": relative(out, path)}


def parse_microbench(out: Path, run_dir: Path, log: Path) -> dict:
    path = run_dir / "benchmarks.json"
    cases = {b["name"]: {"median_ms": round(b["stats"]["median"] * 1e3, 4),
                         "images_per_s": b.get("extra_info", {}).get("images_per_s")}
             for b in read_json(path).get("benchmarks", [])}
    if not cases:
        raise ParseError("pytest-benchmark timed no case")
    return {"cases": cases, "json": relative(out, path)}


def parse_pytest(out: Path, run_dir: Path, log: Path) -> dict:
    try:
        root = ET.parse(run_dir / "junit.xml").getroot()
    except (OSError, ET.ParseError) as e:
        raise ParseError(f"no junit.xml from pytest ({e})") from None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}
