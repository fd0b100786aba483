"""`python -m bench.run`: sweep freezing depths, train and evaluate each, report speed, memory and accuracy.

Bad input gets one line on stderr and exit code 2 before anything is written; a variant that fails
during the sweep is recorded in its row and the sweep goes on.

Under `torchrun` every rank runs this same `main` (bench.parallel: `--parallel data` trains each variant
on all ranks with DDP, `--parallel variants` spreads the variants over the ranks); only rank 0 prints
and writes, except each rank's own profiler traces.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench import batch_size
from bench import distributed, parallel  # under torchrun: ranks, DDP, the two --parallel modes
from bench.config import ConfigError, get_args_parser, load_profile, parse_config, profile_names, setting_names
from bench.files import ensure_writable
from bench.flops import matmul_ceiling_tflops
from bench.loaders import measure_loader
from bench.measure import environment, process_wall_s
from bench.outputs import Checkpoints, best_key, write_artifacts
from bench.report import LiveProgress, results_table, what_ran, write_results
from bench.sweep import make_loader, plan_variants, run_sweep
from bench.train import PRECISIONS
from bench.variants import Variant, make_variants
from models import ModelError, build_model, layers, load_pretrained
from pipelines import DataError, load_dataset, loader_class, num_classes, overlap, select_splits

USER_ERRORS = (ConfigError, ModelError, DataError)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    return torch.device(name)


def default_data_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "finetune-bench")


def print_profiles(console: Console) -> None:
    table = Table(title="profiles (python -m bench.run --profile NAME)")
    table.add_column("name")
    table.add_column("what it runs")
    for name in profile_names():
        table.add_row(name, load_profile(name).get("description", ""))
    console.print(table)


def _kind(layer) -> str:
    """'Conv2d', 'Conv2d+BatchNorm2d' for a shortcut or the stem, 'Bottleneck' for a block or stage."""
    modules = layer.modules
    if len(modules) == 1 and isinstance(modules[0], torch.nn.Sequential):
        modules = tuple(modules[0])
    return "+".join(dict.fromkeys(type(m).__name__ for m in modules))


def print_layers(console: Console, cfg: argparse.Namespace, num_classes: int) -> None:
    model = build_model(cfg.model, num_classes, None, cfg.head)
    table = Table(title=f"{cfg.model} layers with --unit {cfg.unit} (--unfreeze N trains rows 1..N)")
    for col in ("#", "layer", "type", "tensors", "params"):
        table.add_column(col, justify="right" if col in ("#", "tensors", "params") else "left")
    for i, layer in enumerate(layers(model, cfg.unit), 1):
        params = layer.parameters()
        table.add_row(str(i), layer.name, _kind(layer), str(len(params)), f"{sum(p.numel() for p in params):,}")
    console.print(table)


def print_plan(console: Console, cfg: argparse.Namespace, variants, plans: list[dict], device: torch.device) -> None:
    table = Table(title=f"plan ({cfg.profile}): {cfg.dataset}, {cfg.image_size}px, augment {cfg.augment}, "
                        f"batch {cfg.batch_size}, {cfg.precision}, {device.type}")
    for col in ("variant", "model", "head", "weights", "unit", "unfreeze", "tensors", "trainable params", "share",
                "deepest trainable", "training"):
        table.add_column(col)
    for v, p in zip(variants, plans):
        c = v.apply(cfg)
        length = (f"{c.warmup_steps} + {c.steps} timed steps, no evaluation" if c.steps else
                  f"{c.max_steps} steps" if c.max_steps else f"{c.epochs} epochs")
        if c.feature_cache:
            length += ", feature cache"
        training = f"{c.optimizer} lr {c.lr:g} wd {c.weight_decay:g}, {c.scheduler}, {length}"
        if c.early_stop:
            training += f", early stop {c.early_stop}"
        table.add_row(p["variant"], c.model, c.head, c.weights, p["unit"], str(p["unfreeze"]),
                      str(p["trainable_tensors"]), f"{p['trainable_params']:,}",
                      f"{100 * p['trainable_params'] / p['total_params']:.1f}%", p["trainable_layers"][-1], training)
    console.print(table)
    if cfg.final_best:
        console.print("then: the best variant on validation, retrained on train + val and scored on the test split")


# Statuses a resumed run keeps; `error` and `interrupted` variants run again.
FINISHED = ("ok", "oom", "nan", "overlap")
# Settings that may differ between a run and its resumption.
NOT_SETTINGS = {"profile", "profile_description", "out", "resume", "list_profiles", "list_layers", "dry_run",
                "data_dir", "given", "trace", "trace_dir", "trace_steps", "save_checkpoint", "evaluate_best",
                "ceiling_tflops", "parallel", "dist_timeout", "rank", "world_size"}
# (`parallel` and the world size are checked apart: bench.parallel.check_resume.)


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the same path records the running variant and exits."""


class StopSignal:
    """Ctrl-C and SIGTERM: raised where the signal lands, and again at the next training step when it
    landed where an exception is swallowed. A finalizer run by the garbage collector (DALI's pipelines
    have slow ones) is such a place: CPython prints "Exception ignored" and the sweep would go on."""

    def __init__(self):
        self.signum = None

    def handler(self, signum, frame):
        self.signum = signum
        self.raise_if_received()

    def raise_if_received(self) -> None:
        if self.signum is not None:
            raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


def prepare_out(cfg: argparse.Namespace) -> tuple[Path, list[dict]]:
    """The output directory, checked before anything is written, and the rows a resumed run keeps."""
    if cfg.resume:
        out = Path(cfg.resume)
        if cfg.out and Path(cfg.out) != out:
            raise ConfigError(f"--resume {out} writes to {out}; drop --out {cfg.out}")
        try:
            saved = json.loads((out / "results.json").read_text())
            saved_run, saved_rows = saved["run"], saved["depths"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--resume {out}: no readable results.json there ({type(e).__name__}: {e})") from None
        if cfg.batch_size == "auto" and saved_run.get("batch_size_search"):  # found once, kept
            cfg.batch_size, cfg.batch_size_search = saved_run["batch_size"], saved_run["batch_size_search"]
        dests = setting_names() - NOT_SETTINGS | {"variant_specs"}
        # A setting added since the run was saved (schema 2 had no --compile-backend) had its default then.
        parser = get_args_parser()
        defaults = {k: parser.get_default(k) for k in dests - saved_run.keys()}
        diff = [f"{k}: saved {saved_run.get(k, defaults.get(k))!r}, now {getattr(cfg, k)!r}"
                for k in sorted(dests) if saved_run.get(k, defaults.get(k)) != getattr(cfg, k)]
        if diff:
            raise ConfigError(f"--resume {out}: settings differ from the saved run ({'; '.join(diff)})")
        return out, [r for r in saved_rows if r.get("status") in FINISHED]
    out = Path(cfg.out or f"runs/{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{cfg.profile}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; finish it with --resume {out}, or choose another")
    ensure_writable(out, "--out")
    return out, []


def leakage_guard(train, evaluation, allow: bool, console: Console) -> tuple[int, str | None]:
    """Evaluation images that are also training images void the accuracy: (count, reason to withhold)."""
    leaked = overlap(train, evaluation)
    if not leaked:
        return 0, None
    reason = (f"{leaked} of {len(evaluation)} evaluation images also appear in the training split; "
              f"accuracy withheld (--allow-overlap to report it anyway)")
    console.print(f"[red]leakage guard[/red]: {reason.split(';')[0] if allow else reason}")
    return leaked, None if allow else reason


def final_variant(cfg: argparse.Namespace, variants, rows: list[dict]) -> Variant | None:
    """With --final-best: the best `ok` variant on validation, to retrain with --final; None when there
    is none, or when a resumed run already has the final row."""
    if not cfg.final_best or cfg.final or any(r.get("kind") == "final" and r["status"] in FINISHED for r in rows):
        return None
    scored = [r for r in rows if r["status"] == "ok" and r.get("kind") != "final"]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["top1"])
    source = next(v for v in variants if v.name == best["variant"])
    return Variant(f"final-{source.name}", "final", {**source.overrides, "final": True})


def load_splits(cfg: argparse.Namespace):
    """The dataset and the (train, evaluation) splits the run uses; the data directory defaults here."""
    cfg.data_dir = cfg.data_dir or default_data_dir()
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size, seed=cfg.seed,
                        num_classes=cfg.num_classes, train_size=cfg.train_size)
    train, evaluation = select_splits(data, cfg.eval_split, cfg.final)
    if cfg.batch_size != "auto" and len(train) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(train)} training images")
    return data, train, evaluation


def prepare(cfg: argparse.Namespace, variants, dist: distributed.Dist):
    """Data, pretrained weights and the output directory, checked before anything is written.

    Under torchrun every rank loads the data (each node's local rank 0 first, so a download happens
    once per node) and rank 0 alone prepares the output directory; a user error on any rank is then
    raised on every rank (ConfigError), so all of them exit 2 together instead of waiting for each other."""
    error, result = None, None
    try:
        if not dist.is_local_leader:
            distributed.barrier()  # ... until the node's local rank 0 has the files
        try:
            data, train, evaluation = load_splits(cfg)
            # Every (model, weights) pair the variants use, loaded once, before anything is written.
            pretrained = {}
            for v in variants:
                c = v.apply(cfg)
                if (c.model, c.weights) not in pretrained:
                    pretrained[c.model, c.weights] = load_pretrained(c.model, c.weights)
        finally:
            if dist.is_local_leader:
                distributed.barrier()
        if cfg.batch_size != "auto":
            parallel.check_sizes(cfg, dist, len(train), len(evaluation))
        if dist.is_main:
            result = prepare_out(cfg)
            if cfg.resume:
                parallel.check_resume(result[0], cfg, dist)
            if cfg.trace:
                ensure_writable(Path(cfg.trace_dir or result[0] / "traces"), "--trace-dir")
    except USER_ERRORS as e:
        error = str(e)
    failed = distributed.first_error(error)
    if failed is not None:
        rank, message = failed
        raise ConfigError(message if rank == 0 else f"{message} (rank {rank})")
    out, saved_rows = distributed.broadcast_object(result)  # rank 0's directory: its clock named it
    return data, train, evaluation, pretrained, out, saved_rows


def main(argv: list[str] | None = None) -> int:
    try:
        dist = distributed.from_env()  # torchrun's RANK / WORLD_SIZE; rank 0 of 1 without it
    except ConfigError as e:
        print(f"bench.run: error: {e}", file=sys.stderr)
        return 2
    # Piped output (CI logs, files) gets rich's 80-column default; the results table needs more.
    # Under torchrun only rank 0 prints: the other ranks' output would repeat it.
    console = (Console() if sys.stdout.isatty() else Console(width=200)) if dist.is_main else Console(quiet=True)
    try:
        cfg = parse_config(argv)
        if cfg.list_profiles:
            print_profiles(console)
            return 0
        if cfg.list_layers:
            print_layers(console, cfg, num_classes(cfg.dataset, cfg.num_classes))
            return 0
        device = resolve_device(cfg.device)
        variants = make_variants(cfg, setting_names())
        plans = plan_variants(cfg, variants, num_classes(cfg.dataset, cfg.num_classes))
        if cfg.dry_run:
            print_plan(console, cfg, variants, plans, device)
            return 0
        loader_class(cfg.loader)  # fails here, in one line, when e.g. DALI cannot be imported
        parallel.check_config(cfg, dist)
        device = distributed.rank_device(dist, device)  # cuda:LOCAL_RANK under torchrun
    except USER_ERRORS as e:  # the same on every rank (same flags): rank 0 says it once
        if dist.is_main:
            print(f"bench.run: error: {e}", file=sys.stderr)
        return 2
    distributed.init(dist, device, cfg.dist_timeout)  # the process group, when there are several ranks
    cfg.trace = device.type == "cuda" if cfg.trace is None else cfg.trace
    try:
        data, train, evaluation, pretrained, out, saved_rows = prepare(cfg, variants, dist)
    except USER_ERRORS as e:
        if dist.is_main:
            print(f"bench.run: error: {e}", file=sys.stderr)
        return 2
    cfg.trace_dir = cfg.trace_dir or str(out / "traces")

    cfg.rank, cfg.world_size = dist.rank, dist.world_size
    # Devices that train one variant (GPU-hours count each): the world under --parallel data, else 1.
    cfg.devices_used = distributed.data_shard(cfg)[1]
    data_parallel = cfg.devices_used > 1
    spread = dist.world_size > 1 and not data_parallel  # --parallel variants under torchrun
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    if cfg.batch_size == "auto":  # after cudnn.benchmark: the trials must run the kernels training will
        cfg.batch_size, cfg.batch_size_search = find_batch_size(console, cfg, variants, plans, train,
                                                                data.num_classes, pretrained, device)
    # MFU's denominator, measured on this device in this run: a large matmul in the training dtype; in
    # fp32 on CUDA with TF32 when the convolutions train with it (cuDNN's default), as they will here.
    tf32 = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    cfg.ceiling_tflops = matmul_ceiling_tflops(device, PRECISIONS[cfg.precision], tf32=tf32["cudnn"])
    started = datetime.now(timezone.utc)
    run_info = {**{k: v for k, v in vars(cfg).items() if k not in ("list_profiles", "list_layers", "dry_run")},
                "out": str(out), "started_utc": started.isoformat(timespec="seconds"),
                "device_used": str(device), "num_classes": data.num_classes, "classes": data.classes,
                "train_images": len(train), "eval_images": len(evaluation),
                "eval_on": "test" if cfg.final else cfg.eval_split,
                "variants": [v.name for v in variants], "env": environment(device),
                # variants may bring their own model and image size (seed 002): every one, for titles
                "models": list(dict.fromkeys(v.apply(cfg).model for v in variants)),
                "image_sizes": list(dict.fromkeys(v.apply(cfg).image_size for v in variants)),
                "local_world_size": dist.local_world_size, "tf32": tf32,
                "earlier_wall_s": earlier_wall_s(out) if cfg.resume else 0.0,
                "ceiling_dtype": ("tf32" if cfg.precision == "fp32" and device.type == "cuda" and tf32["cudnn"]
                                  else cfg.precision)}
    whole_run(run_info, dist.world_size)
    # --resume: keep what finished, run the rest; rows stay in the order of the variants.
    order = {v.name: i for i, v in enumerate(variants)}

    def position(row: dict) -> int:  # the --final-best row comes last
        return order.get(row["variant"], len(order))
    rows = sorted((r for r in saved_rows if r["variant"] in order or r.get("kind") == "final"), key=position)
    todo = [(v, p) for v, p in zip(variants, plans) if v.name not in {r["variant"] for r in rows}]
    run_info["resumed_rows"] = len(rows)
    if dist.is_main:
        write_results(out, run_info, rows)
    if cfg.resume:
        console.print(f"resuming {out}: {len(rows)} finished variants kept, {len(todo)} to run")
    console.print(f"[bold]{cfg.profile}[/bold]: {what_ran(run_info)} ({len(train)} train / "
                  f"{len(evaluation)} {run_info['eval_on']} images) on "
                  f"{run_info['env']['device']} ({device.type}), {len(variants)} variants -> {out}")
    run_info["eval_overlap"], withhold = leakage_guard(train, evaluation, cfg.allow_overlap, console)
    # Input alone, at the run's settings: can the loader keep up with the fastest variant?
    # Under --parallel data every rank measures its own shard at the same time, and the rates add up.
    if dist.is_main or data_parallel:
        speed = measure_loader(make_loader(cfg, train, device, train=True), device)
        run_info.update(parallel.combine_loader_speeds(distributed.all_gather_objects(speed)) if data_parallel
                        else speed)

    def on_row(row: dict) -> None:
        row["loader_images_per_s"] = run_info["loader_images_per_s"]
        rows.append(row)
        rows.sort(key=position)
        whole_run(run_info, dist.world_size)
        if dist.is_main:
            write_results(out, run_info, rows)
    # Under --parallel data the trained weights are the same on every rank: rank 0 saves them. Under
    # --parallel variants the rank that trained a variant saves it, and rank 0 promotes the best.
    checkpoints = Checkpoints(out / "checkpoints", cfg.save_checkpoint, data.classes, rows, checkpoint_settings)
    on_trained = checkpoints.on_trained if dist.is_main else None
    candidates = parallel.CandidateCheckpoints(out / "checkpoints", cfg.save_checkpoint, data.classes,
                                               checkpoint_settings)
    row_sink = parallel.DataParallelRows(dist, on_row) if data_parallel else on_row
    hours = "GPU-h" if device.type == "cuda" else "device-h"
    stop = StopSignal()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in previous.items():
        if handler != signal.SIG_IGN:  # started ignoring it (`cmd &` in a script, nohup): keep ignoring it
            signal.signal(s, stop.handler)

    def on_progress(**progress) -> None:  # every training step
        stop.raise_if_received()
        live.update(**progress)
    try:
        with LiveProgress(console, len(todo)) as live:
            def sweep(todo_variants, todo_plans, sink, trained_hook):
                return run_sweep(cfg, todo_variants, todo_plans, (train, evaluation), data.num_classes, pretrained,
                                 device, on_row=sink, on_progress=on_progress, withhold=withhold,
                                 on_trained=trained_hook)
            if spread:  # --parallel variants: each rank trains whole variants from a shared queue
                parallel.run_variant_queue(dist, todo, lambda v, p, publish: sweep([v], [p], publish,
                                                                                   candidates.on_trained), on_row)
                if not dist.is_main:
                    distributed.destroy()
                    return 0  # rank 0 reports for all; a non-zero exit would make torchrun stop it
                best = max((r for r in rows if r.get("status") == "ok"), key=best_key, default=None)
                candidates.promote(best, checkpoints.best_path, {v.name for v, _ in todo})
                checkpoints.best = best_key(best) if best is not None else None
            else:
                sweep([v for v, _ in todo], [p for _, p in todo], row_sink, on_trained)
            final = final_variant(cfg, variants, rows)
            if final is not None:  # seed 000's last step: the best variant, on train + val, scored on test
                splits = select_splits(data, cfg.eval_split, final=True)
                _, final_withhold = leakage_guard(*splits, cfg.allow_overlap, console)
                run_sweep(cfg, [final], plan_variants(cfg, [final], data.num_classes), splits, data.num_classes,
                          pretrained, device, on_row=row_sink, on_progress=on_progress, withhold=final_withhold,
                          on_trained=on_trained if not spread else checkpoints.on_trained)
    except KeyboardInterrupt as e:
        finished = sum(r["status"] in FINISHED for r in rows)
        console.print(results_table(rows, f"interrupted: {finished}/{len(variants)} variants finished", hours))
        if dist.is_main:
            print(f"bench.run: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; finished variants "
                  f"are in {out}/results.json; finish with --resume {out}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except parallel.RankFailure as e:  # --parallel data: this rank's variant failed; torchrun stops the others
        distributed.record_failure(e)
        print(f"bench.run: {e}" + ("" if not dist.is_main else f"; finished variants are in {out}/results.json, "
                                   f"finish with --resume {out}"), file=sys.stderr)
        if e.details:
            print(e.details, file=sys.stderr, end="")
        return 1
    except Exception as e:  # under torchrun, mostly: a collective failed because another rank stopped first
        if dist.world_size == 1:
            raise
        distributed.record_failure(e)
        print(f"bench.run: rank {dist.rank}: stopped by {type(e).__name__} (when another rank failed first, "
              f"torchrun's summary names it):", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)  # (SIG_IGN stays SIG_IGN)
    # The process group ends here on a normal finish (after a failure, the exit tears it down).
    distributed.destroy()
    if not dist.is_main:
        return 0  # rank 0 reports for all; a non-zero exit would make torchrun stop it mid-report
    whole_run(run_info, dist.world_size)
    table = results_table(rows, f"{cfg.profile}: {what_ran(run_info)}, {device.type} ({run_info['env']['device']}); "
                                f"whole run so far {run_info['wall_s']:,.1f} s = {run_info['device_hours']:.4f} {hours}",
                          hours)
    console.print(table)
    loader_speed = run_info["loader_images_per_s"]
    console.print(f"loader alone: {'-' if loader_speed is None else f'{loader_speed:,.0f}'} img/s ({cfg.loader}); "
                  f"results: {out / 'results.json'}, {out / 'results.csv'}")
    write_artifacts(console, cfg, out, run_info, rows, table, data, checkpoints.best_path, device)
    whole_run(run_info, dist.world_size)
    write_results(out, run_info, rows)
    console.print(f"whole run: {run_info['wall_s']:,.1f} s = {run_info['device_hours']:.4f} {hours} (start-up, "
                  f"every variant, the best variant's evaluation, plots and report)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def earlier_wall_s(out: Path) -> float:
    """The whole-run wall time a resumed run's results.json recorded (0 where it has none)."""
    try:
        return float(json.loads((out / "results.json").read_text())["run"].get("wall_s") or 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def whole_run(run_info: dict, world_size: int) -> None:
    """The process's wall time so far, and the device-hours it held (every rank holds its device the
    whole time): what the study costs, beyond the sum of its variants' rows. A resumed run adds the
    time of the processes before it (`earlier_wall_s`)."""
    run_info["wall_s"] = round(run_info.get("earlier_wall_s", 0.0) + process_wall_s(), 3)
    run_info["device_hours"] = run_info["wall_s"] * world_size / 3600.0


def find_batch_size(console: Console, cfg: argparse.Namespace, variants, plans: list[dict], train,
                    num_classes: int, pretrained, device: torch.device) -> tuple[int, list[dict]]:
    """--batch-size auto, on the variant that trains the most parameters (the most memory)."""
    heaviest = max(zip(variants, plans), key=lambda vp: vp[1]["trainable_params"])[0]
    chosen, trials = batch_size.search(batch_size.trial_step(heaviest.apply(cfg), train, num_classes, pretrained, device),
                                       limit=min(batch_size.LIMIT, len(train)))
    tried = ", ".join(f"{t['batch_size']}: " + ("out of memory" if t.get("oom") else f"{t['images_per_s']:,.0f} img/s")
                      for t in trials)
    console.print(f"--batch-size auto on {heaviest.name}: {tried} -> batch {chosen}")
    return chosen, trials


def checkpoint_settings(cfg: argparse.Namespace) -> dict:
    """What a checkpoint keeps of the settings: enough to rebuild the model and its evaluation split."""
    return {k: v for k, v in vars(cfg).items() if k not in NOT_SETTINGS | {"variant_specs"}}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"bench.run: warning: {message}\n"


if __name__ == "__main__":
    warnings.formatwarning = _one_line_warning  # warnings are for users here: no source line dumps
    sys.exit(main())
