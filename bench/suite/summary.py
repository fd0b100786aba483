"""SUMMARY.md: one table (the targets first, then every other figure), then the steps."""
from __future__ import annotations

from bench.suite.figures import COMPILE_ESTIMATE, check_targets, compute_figures, ok_rows, step_figures

TARGET_SOURCE = {  # target -> (the bench.run step whose ceiling is beside it, the depth whose MFU is)
    "all_images_per_s": ("throughput", "all"), "unfreeze1_images_per_s": ("throughput", "1"),
    "loader_speedup": ("throughput", None), "data_wait_pct": ("throughput", None),
    "dali_loader_speedup": ("dali", None), "dali_data_wait_pct": ("dali", None),
    "study_gpu_minutes": ("seed000", None), "compile_overhead_pct": ("compile", None),
    "timm_ratio": ("throughput", "all")}
RUN_STEPS = ("throughput", "seed000", "fp16", "nchw", "breakdown", "compile", "trace", "dali")
PHASES = (("input_ms", "input"), ("frozen_forward_ms", "frozen fwd"), ("trainable_forward_ms", "trainable fwd"),
          ("backward_ms", "backward"), ("optimizer_ms", "optimizer"))
HEADER = ["| figure | measured | target | result | ceiling in the same run | notes |", "|---|---|---|---|---|---|"]


def number(value, unit: str = "") -> str:
    if value is None:
        return "–"
    if unit == "x":
        return f"{value:.2f}x"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".rstrip()


def gib(size: int | None) -> str:
    return number(None if size is None else size / 2**30, "GiB")


def cell(text: str) -> str:
    return text.replace("|", "/").strip()


def ceiling_note(records: dict, step: str, depth: str | None) -> str:
    """The matmul ceiling measured by the same bench.run process, and the row's MFU against it."""
    run = step_figures(records, step).get("run", {})
    if not run.get("ceiling_tflops"):
        return "–"
    dtype = run.get("ceiling_dtype") or run.get("precision") or ""
    note = f"{number(run['ceiling_tflops'], 'TFLOP/s')} {dtype}".rstrip()
    mfu = ok_rows(records, step).get(depth, {}).get("mfu") if depth else None
    return note + (f", MFU {100 * mfu:.1f} %" if mfu is not None else "")


def target_note(records: dict, figures: dict, key: str, step: str | None) -> str:
    if key in ("all_images_per_s", "timm_ratio") and figures.get("timm_images_per_s"):
        return f"peer: timm {number(figures['timm_images_per_s'], 'img/s')}, ours/timm {number(figures['timm_ratio'], 'x')}"
    if key == "compile_overhead_pct":
        return "estimate, see below"
    if key.endswith("loader_speedup") and figures.get(key) is not None:
        fastest = max(r["images_per_s"] for r in ok_rows(records, step).values())
        return (f"loader {number(step_figures(records, step)['run']['loader_images_per_s'], 'img/s')}, fastest "
                f"variant {number(fastest, 'img/s')}")
    if key == "study_gpu_minutes" and figures.get(key) is not None:
        whole = step_figures(records, step).get("run", {}).get("wall_s")
        return "bench.run's whole run (`run.wall_s`)" if whole else "the step's wall time (no `run.wall_s`)"
    return ""


def target_lines(records: dict, figures: dict) -> list[str]:
    lines = []
    for t in check_targets(figures):
        step, depth = TARGET_SOURCE.get(t["key"], (None, None))
        lines.append(f"| {t['label']} | {number(t['value'], t['unit'])} | {t['op']} {number(t['goal'], t['unit'])} "
                     f"| **{t['result']}** | {ceiling_note(records, step, depth) if step else '–'} "
                     f"| {target_note(records, figures, t['key'], step)} |")
    return lines


def run_row_line(records: dict, step: str, variant: str, row: dict) -> str:
    """One bench.run row: img/s (end to end; a feature-cache row's tail rate beside it), step time,
    data wait, torch's peak memory and, where bench.run measured it, the whole device's."""
    if row.get("status") != "ok":
        return f"| {step}: {variant} | {row.get('status')} | – | – | – | {cell((row.get('error') or '')[:200])} |"
    notes = [f"step {number(row.get('step_ms_median'), 'ms')}", f"data wait {number(row.get('data_wait_pct'), '%')}",
             f"peak {gib(row.get('peak_mem_bytes'))} (torch)"]
    if row.get("device_peak_mem_bytes") is not None:
        notes.append(f"{gib(row['device_peak_mem_bytes'])} (device)")
    if row.get("warmup_peak_mem_bytes") is not None:  # cuDNN's autotuning and compilation, apart
        device = row.get("warmup_device_peak_mem_bytes")
        notes.append(f"warm-up {gib(row['warmup_peak_mem_bytes'])}" + (f", {gib(device)} (device)" if device else ""))
    if row.get("tail_images_per_s"):
        notes.append(f"tail {number(row['tail_images_per_s'], 'img/s')}")
    if row.get("compile_s"):
        graphs = row.get("compile_graphs")
        hits, misses = row.get("compile_cache_hits"), row.get("compile_cache_misses")
        notes.append(f"compile {number(row['compile_s'], 's')}"
                     + (f", {graphs} graph{'s' * (graphs != 1)}" if graphs is not None else "")
                     + (f", cache {hits} hits / {misses} misses" if hits is not None else ""))
    if row.get("trace"):
        notes.append(f"idle {number(row['trace'].get('idle_pct'), '%')}, layout copies {row['trace'].get('layout_copies')}")
    if isinstance(row.get("breakdown"), dict):  # synchronised phases, ms per step
        notes.append("phases " + ", ".join(f"{label} {number(row['breakdown'].get(key), 'ms')}" for key, label in PHASES))
    return (f"| {step}: {variant} | {number(row.get('images_per_s'), 'img/s')} | – | – | "
            f"{ceiling_note(records, step, str(row.get('unfreeze')))} | {', '.join(notes)} |")


def info_lines(records: dict) -> list[str]:
    """Every other figure, without a target: each bench.run row, the loaders, the peer, the pytest steps."""
    lines = [run_row_line(records, step, variant, row) for step in RUN_STEPS
             for variant, row in step_figures(records, step).get("rows", {}).items()]
    for step, what in (("loaders", "alone"), ("loaders-dali", "alone"), ("folder", "on JPEG files")):
        for name, loader in step_figures(records, step).get("loaders", {}).items():
            note = loader.get("error") or f"batch {number(loader['batch_ms_median'], 'ms')}"
            lines.append(f"| {step}: {name} {what} | {number(loader['images_per_s'], 'img/s')} | – | – | – | "
                         f"{cell(note[:300])} |")
    timm = step_figures(records, "timm")
    if timm.get("train_samples_per_sec"):
        lines.append(f"| timm: {timm.get('model')} train | {number(timm['train_samples_per_sec'], 'img/s')} | – | – "
                     f"| – | batch {timm.get('train_batch_size')}, {timm.get('train_img_size')} px |")
    for name, case in step_figures(records, "microbench").get("cases", {}).items():
        lines.append(f"| microbench: {name} | {number(case['images_per_s'], 'img/s')} | – | – | – | "
                     f"median {number(case['median_ms'], 'ms')} |")
    tests = step_figures(records, "pytest")
    if "tests" in tests:
        lines.append(f"| pytest | {tests['passed']} passed | – | – | – | {tests['failures']} failed, "
                     f"{tests['errors']} errors, {tests['skipped']} skipped |")
    return lines


def environment_line(records: dict) -> str:
    env = step_figures(records, "environment")
    if not env:
        return "Environment: not measured (the environment step did not run)."
    versions = ", ".join(f"{k} {env.get(k) or '–'}"
                         for k in ("driver", "python", "torch", "torchvision", "dali", "timm", "cuda", "cudnn"))
    return (f"Environment: {env.get('device')} ({versions}). Measured in the environment step: bf16 matmul "
            f"{number(env.get('matmul_bf16_tflops'), 'TFLOP/s')} ({env.get('matmul_n')}² matmuls), "
            f"device-to-device copy {number(env.get('copy_gbps'), 'GB/s')} (read + write).")


def step_lines(records: dict) -> list[str]:
    lines = ["| step | status | seconds | limit s | notes |", "|---|---|---|---|---|"]
    for record in records.values():
        note = record.get("reason") or ""
        if record.get("traces_dropped"):
            note += f" traces dropped: {record['traces_dropped']}"
        if record.get("log"):
            note += f" (log: `{record['log']}`)"
        lines.append(f"| {record['name']} | {record['status']} | {record['seconds']:.0f} | {record['limit_s']} | "
                     f"{cell(note)} |")
    return lines


def parts_lines(doc: dict) -> list[str]:
    """A merged suite: which parts it holds, when each ran and what each gave up to fit its archive."""
    lines = []
    for part in doc.get("parts") or []:
        cut = f"; cut to fit its archive: {', '.join(part['archive_cut'])}" if part.get("archive_cut") else ""
        lines.append(f"- part {part['part']} (`{part['folder']}`): started {part['started_utc']}, "
                     f"{part['elapsed_s']:,.0f} s{cut}")
    if doc.get("parts_missing"):
        lines.append(f"- not run yet: part {', '.join(str(n) for n in doc['parts_missing'])}")
    return ["Parts:", "", *lines, ""] if lines else []


def render_summary(doc: dict) -> str:
    """SUMMARY.md from a suite.json document: one part's, or the merge of several."""
    records = {record["name"]: record for record in doc["steps"]}
    s = doc["settings"]
    mode = ("a CPU rehearsal: every step's real command at CPU size. The targets are for one H200; here they "
            "only show that every figure is computed." if doc["mode"] == "rehearsal" else "a GPU run.")
    budget = f" of --budget {doc['budget_s']:g} s" if doc.get("budget_s") else ""
    what = f"part {doc['part']}" if doc.get("part") else "the suite"
    head = [f"# Benchmark suite: {step_figures(records, 'environment').get('device') or doc['mode']}",
            "", f"Started {doc['started_utc']}, {doc['elapsed_s']:,.0f} s{budget} for {what}; this is {mode}", "",
            *parts_lines(doc), environment_line(records), "",
            f"Configuration: {s['model']}, {s['image_size']} px, bf16 autocast, channels_last, batch {s['batch_size']}, "
            f"synthetic data ({s['num_classes']} classes), torch loader, {s['warmup_steps']} warm-up + {s['steps']} "
            "timed steps per depth, throughput mode (no evaluation). Targets: ResNet-50, 224 px, bf16, one H200.", ""]
    body = target_lines(records, compute_figures(records)) + info_lines(records)
    return "\n".join(head + HEADER + body + ["", COMPILE_ESTIMATE, "", "## Steps", ""] + step_lines(records)) + "\n"
