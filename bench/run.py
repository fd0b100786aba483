"""`python -m bench.run`: sweep freezing depths, train and evaluate each, report speed, memory and accuracy.

`main` is four steps: prepare (flags, device, data, weights, output directory: bad input ends here
with one line and exit code 2, before anything is written), calibrate (batch size, the device's
ceiling, the loader alone), sweep (every variant; one that fails is recorded in its row and the sweep
goes on) and report. `exit_code` maps every way out to one exit code.

Under `torchrun` every rank runs this same `main` (bench.parallel: `--parallel data` trains each variant
on all ranks with DDP, `--parallel variants` spreads the variants over the ranks); only rank 0 prints
and writes, except each rank's own profiler traces.
"""
from __future__ import annotations

import itertools
import json
import statistics
import sys
import traceback
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench import batch_size, distributed, parallel, source_task
from bench.config import Invocation, load_profile, parse_config, profile_names, resumed
from bench.context import RunContext
from bench.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, USER_ERRORS, ConfigError
from bench.files import ensure_writable
from bench.flops import matmul_ceiling_tflops
from bench.inputs import load_splits, make_loader, resolve_device
from bench.measure import environment, measure_loader, process_wall_s
from bench.outputs import Checkpoints, best_key, write_artifacts
from bench.report import LiveProgress, comparison_lines, results_table, step_progress, what_ran, write_results
from bench.schema import FINISHED, Status, saved_rows
from bench.settings import Settings
from bench.signals import StopSignal, Terminated, interrupt_exit_code
from bench.stats import aggregate, comparisons, recommend
from bench.sweep import plan_variants, run_sweep
from bench.train import PRECISIONS
from bench.variant import weights_key
from bench.variants import Variant, make_variants
from models import build_model, layers, load_pretrained
from pipelines import folder_path, loader_class, num_classes, overlap, select_splits


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


def print_layers(console: Console, s: Settings) -> None:
    m = s.model
    model = build_model(m.model, num_classes(s.data.dataset, s.data.num_classes), None, m.head)
    table = Table(title=f"{m.model} layers with --unit {m.unit} (--unfreeze N trains rows 1..N)")
    for col in ("#", "layer", "type", "tensors", "params"):
        table.add_column(col, justify="right" if col in ("#", "tensors", "params") else "left")
    for i, layer in enumerate(layers(model, m.unit), 1):
        params = layer.parameters()
        table.add_row(str(i), layer.name, _kind(layer), str(len(params)), f"{sum(p.numel() for p in params):,}")
    console.print(table)


def print_plan(console: Console, s: Settings, variants: list[Variant], plans: list[dict], device: torch.device) -> None:
    t = s.train
    table = Table(title=f"plan ({s.output.profile}): {s.data.dataset}, {s.data.image_size}px, augment "
                        f"{s.data.augment}, batch {t.batch_size}, {s.speed.precision}, {device.type}")
    for col in ("variant", "model", "head", "weights", "unit", "unfreeze", "tensors", "trainable params", "share",
                "deepest trainable", "training"):
        table.add_column(col)
    for v, p in zip(variants, plans):
        c = v.apply(s)
        ct = c.train
        length = (f"{ct.warmup_steps} + {ct.steps} timed steps, no evaluation" if ct.steps else
                  f"{ct.max_steps} steps" if ct.max_steps else f"{ct.epochs} epochs")
        if c.speed.feature_cache:
            length += ", feature cache"
        training = f"{ct.optimizer} lr {ct.lr:g} wd {ct.weight_decay:g}, {ct.scheduler}, {length}"
        if ct.early_stop:
            training += f", early stop {ct.early_stop}"
        table.add_row(p["variant"], c.model.model, c.model.head, c.model.weights, p["unit"], str(p["unfreeze"]),
                      str(p["trainable_tensors"]), f"{p['trainable_params']:,}",
                      f"{100 * p['trainable_params'] / p['total_params']:.1f}%", p["trainable_layers"][-1], training)
    console.print(table)
    if s.sweep.final_best:
        console.print("then: the best variant on validation, retrained on train + val and scored on the test split")


def read_saved_run(out: Path) -> tuple[dict, list[dict]]:
    try:
        saved = json.loads((out / "results.json").read_text())
        return saved["run"], saved_rows(saved)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--resume {out}: no readable results.json there ({type(e).__name__}: {e})") from None


def prepare_out(s: Settings) -> tuple[Path, list[dict], dict]:
    """The output directory, checked before anything is written; for --resume also the rows it keeps
    and the saved run."""
    o = s.output
    if not o.resume:
        out = Path(o.out or f"runs/{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{o.profile}")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out} exists and is not empty; finish it with --resume {out}, or choose another")
        ensure_writable(out, "--out")
        return out, [], {}
    out = Path(o.resume)
    if o.out and Path(o.out) != out:
        raise ConfigError(f"--resume {out} writes to {out}; drop --out {o.out}")
    saved_run, rows = read_saved_run(out)
    return out, [r for r in rows if r.get("status") in FINISHED], saved_run


def leakage_guard(train, evaluation, allow: bool, console: Console) -> tuple[int, str | None]:
    """Evaluation images that are also training images void the accuracy: (count, reason to withhold)."""
    leaked = overlap(train, evaluation)
    if not leaked:
        return 0, None
    reason = (f"{leaked} of {len(evaluation)} evaluation images also appear in the training split; "
              f"accuracy withheld (--allow-overlap to report it anyway)")
    console.print(f"[red]leakage guard[/red]: {reason.split(';')[0] if allow else reason}")
    return leaked, None if allow else reason


def final_variant(s: Settings, variants: list[Variant], rows: list[dict]) -> Variant | None:
    """With --final-best: the best `ok` variant on validation, to retrain with --final (once, with
    --seed); None when there is none, or when a resumed run already has the final row."""
    if not s.sweep.final_best or s.data.final or any(r.get("kind") == "final" and r["status"] in FINISHED
                                                     for r in rows):
        return None
    scored = [r for r in rows if r["status"] == Status.OK and r.get("kind") != "final"]
    if not scored:
        return None
    # with repeats, the best mean over seeds; ties go to the earlier variant
    names = list(dict.fromkeys(r["variant"] for r in scored))
    best = max(names, key=lambda n: statistics.fmean(r["top1"] for r in scored if r["variant"] == n))
    source = next(v for v in variants if v.name == best)
    return Variant(f"final-{source.name}", "final", {**source.overrides, "final": True})


def earlier_wall_s(saved_run: dict) -> float:
    """The whole-run wall time a resumed run recorded (0 where it has none)."""
    try:
        return float(saved_run.get("wall_s") or 0.0)
    except (TypeError, ValueError):
        return 0.0


class Run:
    """One invocation of the sweep: what it prepared, what it measured, and the rows so far."""

    def __init__(self, invocation: Invocation, dist: distributed.Dist, console: Console):
        self.invocation, self.dist, self.console = invocation, dist, console
        self.s = invocation.settings
        self.out: Path | None = None
        self.rows: list[dict] = []
        self.todo: list[Job] = []
        self.aggregates: list[dict] = []
        self.run_info: dict = {}

    # -- prepare ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can be wrong with the input is found here, before anything is written.

        Under torchrun every rank loads the data (each node's local rank 0 first, so a download happens
        once per node) and rank 0 alone prepares the output directory; a user error on any rank is then
        raised on every rank, so all of them exit 2 together instead of waiting for each other."""
        s, dist = self.s, self.dist
        device = resolve_device(s.speed.device)
        # fails here, in one line, when e.g. DALI cannot be imported
        loader = loader_class(s.data.loader, files=folder_path(s.data.dataset) is not None)
        parallel.check_config(s, dist)
        device = distributed.rank_device(dist, device)  # cuda:LOCAL_RANK under torchrun
        if hasattr(loader, "check_device"):  # e.g. DALI without its image decoders: one line, nothing written
            loader.check_device(device)
        distributed.init(dist, device, s.output.dist_timeout)
        trace = device.type == "cuda" if s.output.trace is None else s.output.trace
        error, result = None, None
        try:
            if not dist.is_local_leader:
                distributed.barrier()  # ... until the node's local rank 0 has the files
            try:
                self.data, self.train, self.evaluation = load_splits(s)
                # Every (model, weights) pair the variants use, loaded once, before anything is written.
                self.pretrained = {}
                for v in self.variants:
                    c = v.apply(s)
                    if weights_key(c) not in self.pretrained:
                        weights = c.model.weights
                        if weights == "pretext":
                            weights = str(self.pretext(c.model.model, c.data.image_size))
                        self.pretrained[weights_key(c)] = load_pretrained(c.model.model, weights)
            finally:
                if dist.is_local_leader:
                    distributed.barrier()
            if s.train.batch_size != "auto":
                parallel.check_sizes(s, dist, len(self.train), len(self.evaluation))
            if dist.is_main:
                result = prepare_out(s)
                if s.output.resume:
                    parallel.check_resume(result[0], s, dist)
                if trace:
                    ensure_writable(Path(s.output.trace_dir or result[0] / "traces"), "--trace-dir")
        except USER_ERRORS as e:
            error = str(e)
        failed = distributed.first_error(error)
        if failed is not None:
            rank, message = failed
            raise ConfigError(message if rank == 0 else f"{message} (rank {rank})")
        # rank 0's directory (its clock named it) and what a resumed run keeps, on every rank
        self.out, kept, self.saved_run = distributed.broadcast_object(result)
        self.rows = [{**r, "seed": self.seed_of(r)} for r in kept]  # rows of schemas before 5 carry no seed
        self.ctx = RunContext(device, dist, s.output.parallel,
                              trace_dir=Path(s.output.trace_dir or self.out / "traces") if trace else None,
                              trace_steps=s.output.trace_steps)

    def pretext(self, model: str, image_size: int) -> Path:
        """--weights pretext: the cached source-task weights, trained first where there are none."""
        data_dir = self.s.output.data_dir
        source_task.check(model, image_size)
        if source_task.cached(source_task.cache_path(data_dir, model, image_size), model, image_size) is None:
            return source_task.cache_path(data_dir, model, image_size)
        # a minute of training must not end in a traceback at the write
        ensure_writable(source_task.cache_path(data_dir, model, image_size).parent, "--data-dir")
        self.console.print(f"--weights pretext: training {model} once on the synthetic source task at {image_size} px "
                           f"(cached in {Path(data_dir) / 'pretext'}; about a minute for resnet18 at 32 px on 2 cores)")
        with step_progress(self.console, f"pretext {model}") as update:
            return source_task.ensure(model, image_size, data_dir, on_progress=update)

    # -- calibrate -------------------------------------------------------------------------------------

    def calibrate(self) -> None:
        """What the run measures once, before any variant: the batch size (with auto), the device's
        matmul ceiling (MFU's denominator), the loader alone; then the run's info is written."""
        s, ctx, console = self.s, self.ctx, self.console
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        search = None
        if s.train.batch_size == "auto" and self.saved_run.get("batch_size_search"):
            s, search = s.replace(batch_size=self.saved_run["batch_size"]), self.saved_run["batch_size_search"]
        elif s.train.batch_size == "auto":  # after cudnn.benchmark: the trials run the kernels training will
            chosen, search = self.find_batch_size()
            s = s.replace(batch_size=chosen)
        self.s = s
        # In fp32 on CUDA the ceiling is TF32's when the convolutions train with it (cuDNN's default).
        tf32 = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        self.ctx = ctx = replace(ctx, ceiling_tflops=matmul_ceiling_tflops(ctx.device, PRECISIONS[s.speed.precision],
                                                                           tf32=tf32["cudnn"]))
        dist, variants = self.dist, self.variants
        self.run_info = {
            **s.flat(), "profile_description": self.invocation.profile_description,
            "given": sorted(self.invocation.given), "trace": ctx.trace_dir is not None,
            "trace_dir": str(ctx.trace_dir or Path(s.output.trace_dir or self.out / "traces")),
            "rank": dist.rank, "world_size": dist.world_size, "devices_used": ctx.devices_used,
            "ceiling_tflops": ctx.ceiling_tflops, "batch_size_search": search,
            "out": str(self.out), "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device_used": str(ctx.device), "num_classes": self.data.num_classes, "classes": self.data.classes,
            "data_info": self.data.info,
            "train_images": len(self.train), "eval_images": len(self.evaluation), "eval_on": s.data.scored_split,
            "variants": [v.name for v in variants], "env": environment(ctx.device),
            # variants may bring their own model and image size (seed 002): every one, for titles
            "models": list(dict.fromkeys(v.apply(s).model.model for v in variants)),
            "image_sizes": list(dict.fromkeys(v.apply(s).data.image_size for v in variants)),
            "local_world_size": dist.local_world_size, "tf32": tf32,
            "earlier_wall_s": earlier_wall_s(self.saved_run),
            "ceiling_dtype": ("tf32" if s.speed.precision == "fp32" and ctx.device.type == "cuda" and tf32["cudnn"]
                              else s.speed.precision)}
        # --resume: keep what finished, run the rest; rows stay in the order of the variants.
        self.rows = sorted((r for r in self.rows if r["variant"] in self.order or r.get("kind") == "final"),
                           key=self.position)
        done = {(r["variant"], self.seed_of(r)) for r in self.rows}
        self.todo = [Job(seed, v, p) for seed in self.seeds for v, p in zip(variants, self.plans)
                     if (v.name, seed) not in done]
        self.run_info["resumed_rows"] = len(self.rows)
        self.save()
        if s.output.resume:
            console.print(f"resuming {self.out}: {len(self.rows)} finished rows kept, {len(self.todo)} to run")
        console.print(f"[bold]{s.output.profile}[/bold]: {what_ran(self.run_info)} ({len(self.train)} train / "
                      f"{len(self.evaluation)} {s.data.scored_split} images) on {self.run_info['env']['device']} "
                      f"({ctx.device.type}), {len(variants)} variants -> {self.out}")
        files = self.data.info
        if files.get("ignored_files") or files.get("skipped_images"):
            console.print(f"{s.data.dataset}: {files['ignored_files']} files without an image extension ignored, "
                          f"{len(files['skipped_images'])} unreadable images skipped (listed in results.json)")
        self.run_info["eval_overlap"], withhold = leakage_guard(self.train, self.evaluation,
                                                                s.data.allow_overlap, console)
        self.split_cache = {s.train.seed: ((self.train, self.evaluation), withhold)}
        # Input alone, at the run's settings: can the loader keep up with the fastest variant?
        # Under --parallel data every rank measures its own shard at the same time, and the rates add up.
        if dist.is_main or ctx.data_parallel:
            speed = measure_loader(make_loader(s, self.train, ctx.device, train=True, shard=ctx.shard), ctx.device)
            self.run_info.update(parallel.combine_loader_speeds(distributed.all_gather_objects(speed))
                                 if ctx.data_parallel else speed)

    def find_batch_size(self) -> tuple[int, list[dict]]:
        """--batch-size auto, on the variant that trains the most parameters (the most memory)."""
        heaviest = max(zip(self.variants, self.plans), key=lambda vp: vp[1]["trainable_params"])[0]
        measure = batch_size.trial_step(heaviest.apply(self.s), self.ctx, self.train, self.data.num_classes,
                                        self.pretrained)
        chosen, trials = batch_size.search(measure, limit=min(batch_size.LIMIT, len(self.train)))
        tried = ", ".join(f"{t['batch_size']}: " + ("out of memory" if t.get("oom") else f"{t['images_per_s']:,.0f} img/s")
                          for t in trials)
        self.console.print(f"--batch-size auto on {heaviest.name}: {tried} -> batch {chosen}")
        return chosen, trials

    # -- sweep -----------------------------------------------------------------------------------------

    def sweep(self) -> bool:
        """Every variant still to run, then the --final-best one. False on a rank that has nothing left
        to report (--parallel variants: rank 0 reports for all)."""
        s, ctx, dist = self.s, self.ctx, self.dist
        # Under --parallel data the trained weights are the same on every rank: rank 0 saves them. Under
        # --parallel variants the rank that trained a variant saves it, and rank 0 promotes the best.
        self.checkpoints = Checkpoints(self.out / "checkpoints", s.output.save_checkpoint, self.data.classes, self.rows)
        on_trained = self.checkpoints.on_trained if dist.is_main else None
        candidates = parallel.CandidateCheckpoints(self.out / "checkpoints", s.output.save_checkpoint,
                                                   self.data.classes)
        row_sink = parallel.DataParallelRows(dist, self.on_row) if ctx.data_parallel else self.on_row
        spread = dist.world_size > 1 and not ctx.data_parallel  # --parallel variants under torchrun
        with StopSignal() as stop, LiveProgress(self.console, len(self.todo)) as live:
            def on_progress(**progress) -> None:  # every training step
                stop.raise_if_received()
                live.update(**progress)

            def sweep(jobs: list[Job], sink, trained_hook, final_splits=None):
                seed = jobs[0].seed
                if final_splits is None:
                    splits, withhold = self.splits_for(seed)
                else:
                    splits, (_, withhold) = final_splits, leakage_guard(*final_splits, s.data.allow_overlap,
                                                                        self.console)
                return run_sweep(s.replace(seed=seed), ctx, [j.variant for j in jobs], [j.plan for j in jobs], splits,
                                 self.data.num_classes, self.pretrained, on_row=sink, on_progress=on_progress,
                                 withhold=withhold, on_trained=trained_hook)
            if spread:  # each rank trains whole variants from a shared queue
                parallel.run_variant_queue(dist, self.todo, lambda job, publish: sweep([job], publish,
                                                                                       candidates.on_trained),
                                           self.on_row)
                if not dist.is_main:
                    distributed.destroy()
                    return False
                best = max((r for r in self.rows if r.get("status") == Status.OK), key=best_key, default=None)
                candidates.promote(best, self.checkpoints.best_path, {j.variant.name for j in self.todo})
                self.checkpoints.best = best_key(best) if best is not None else None
            else:
                for _, jobs in itertools.groupby(self.todo, key=lambda j: j.seed):  # seed by seed: one split each
                    sweep(list(jobs), row_sink, on_trained)
            final = final_variant(s, self.variants, self.rows)
            if final is not None:  # seed 000's last step: the best variant, on train + val, scored on test
                sweep([Job(s.train.seed, final, plan_variants(s, [final], self.data.num_classes)[0])], row_sink,
                      self.checkpoints.on_trained if spread else on_trained,
                      select_splits(self.data, s.data.eval_split, final=True))
        distributed.destroy()  # after a failure, the exit tears the process group down instead
        return dist.is_main

    def on_row(self, row: dict) -> None:
        row["loader_images_per_s"] = self.run_info["loader_images_per_s"]
        self.rows.append(row)
        self.rows.sort(key=self.position)
        self.save()

    # -- report ----------------------------------------------------------------------------------------

    def report(self) -> int:
        s, ctx, console = self.s, self.ctx, self.console
        self.whole_run()
        hours = self.hours_label
        table = results_table(self.rows, f"{s.output.profile}: {what_ran(self.run_info)}, {ctx.device.type} "
                                         f"({self.run_info['env']['device']}); whole run so far "
                                         f"{self.run_info['wall_s']:,.1f} s = {self.run_info['device_hours']:.4f} "
                                         f"{hours}", hours, self.aggregates)
        console.print(table)
        pick = self.run_info["recommendation"]
        if pick:
            console.print(pick["sentence"])
        for line in comparison_lines(self.run_info):
            console.print(line)
        loader_speed = self.run_info["loader_images_per_s"]
        console.print(f"loader alone: {'-' if loader_speed is None else f'{loader_speed:,.0f}'} img/s "
                      f"({s.data.loader}); results: {self.out / 'results.json'}, {self.out / 'results.csv'}")
        write_artifacts(console, s.output.evaluate_best, self.out, self.run_info, self.rows, self.aggregates, table,
                        self.data, self.checkpoints.best_path, ctx.device)
        self.save()
        console.print(f"whole run: {self.run_info['wall_s']:,.1f} s = {self.run_info['device_hours']:.4f} {hours} "
                      f"(start-up, every variant, the best variant's evaluation, plots and report)")
        return EXIT_OK if all(r["status"] == Status.OK for r in self.rows) else EXIT_FAILED

    def interrupted(self, error: KeyboardInterrupt) -> None:
        """Ctrl-C or SIGTERM during the sweep: the table so far, and how to finish."""
        finished = sum(r["status"] in FINISHED for r in self.rows)
        self.console.print(results_table(self.rows, f"interrupted: {finished}/{len(self.todo) + len(self.rows)} rows "
                                                    f"finished", self.hours_label, self.aggregates))
        if self.dist.is_main:
            print(f"bench.run: {'terminated' if isinstance(error, Terminated) else 'interrupted'}; finished variants "
                  f"are in {self.out}/results.json; finish with --resume {self.out}", file=sys.stderr)

    # -- the variants and their rows -------------------------------------------------------------------

    def plan(self) -> None:
        self.variants = make_variants(self.s, self.invocation.given)
        self.plans = plan_variants(self.s, self.variants, num_classes(self.s.data.dataset, self.s.data.num_classes))
        self.order = {v.name: i for i, v in enumerate(self.variants)}

    @property
    def seeds(self) -> list[int]:
        return self.s.sweep.seeds or [self.s.train.seed]

    def seed_of(self, row: dict) -> int:
        return row.get("seed", self.s.train.seed)  # rows of runs before repeats carry no seed

    def position(self, row: dict) -> tuple[int, int]:
        """Variant by variant (the --final-best row last), seed by seed within one."""
        seed = self.seed_of(row)
        return self.order.get(row["variant"], len(self.order)), self.seeds.index(seed) if seed in self.seeds else 0

    def splits_for(self, seed: int) -> tuple[tuple, str | None]:
        """The (train, evaluation) splits a seed trains on, and why accuracy must be withheld (the
        leakage guard): the run's own, or with --vary-split the seed's."""
        seed = seed if self.s.data.vary_split else self.s.train.seed
        if seed not in self.split_cache:
            _, train, evaluation = load_splits(self.s.replace(seed=seed))
            _, withhold = leakage_guard(train, evaluation, self.s.data.allow_overlap, self.console)
            self.split_cache[seed] = ((train, evaluation), withhold)
        return self.split_cache[seed]

    @property
    def hours_label(self) -> str:
        return "GPU-h" if self.ctx.device.type == "cuda" else "device-h"

    def whole_run(self) -> None:
        """The process's wall time so far, and the device-hours it held (every rank holds its device the
        whole time): what the study costs, beyond the sum of its variants' rows. A resumed run adds the
        time of the processes before it."""
        self.run_info["wall_s"] = round(self.run_info.get("earlier_wall_s", 0.0) + process_wall_s(), 3)
        self.run_info["device_hours"] = self.run_info["wall_s"] * self.dist.world_size / 3600.0

    def summarise(self) -> None:
        """The aggregates over seeds, the paired comparisons of neighbours, and the pick."""
        names = list(dict.fromkeys([*self.order, *(r["variant"] for r in self.rows)]))
        self.aggregates = aggregate(self.rows, names)
        swept = [r for r in self.rows if r.get("kind") != "final"]
        self.run_info["comparisons"] = comparisons(swept, list(self.order))
        self.run_info["recommendation"] = recommend([a for a in self.aggregates if a["kind"] != "final"], swept,
                                                    self.s.output.tolerance, self.hours_label[:-1] + "hour")

    def save(self) -> None:
        self.whole_run()
        self.summarise()
        if self.dist.is_main:
            write_results(self.out, self.run_info, self.rows, self.aggregates)


@dataclass(frozen=True)
class Job:
    """One variant trained with one seed."""
    seed: int
    variant: Variant
    plan: dict


def answer(invocation: Invocation, console: Console) -> int:
    """--list-profiles, --list-layers, --dry-run: print and exit, nothing written."""
    s = invocation.settings
    if invocation.command == "list_profiles":
        print_profiles(console)
        return EXIT_OK
    if invocation.command == "list_layers":
        print_layers(console, s)
        return EXIT_OK
    variants = make_variants(s, invocation.given)
    print_plan(console, s, variants, plan_variants(s, variants, num_classes(s.data.dataset, s.data.num_classes)),
               resolve_device(s.speed.device))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    dist, run = distributed.Dist(), None
    try:
        dist = distributed.from_env()  # torchrun's RANK / WORLD_SIZE; rank 0 of 1 without it
        # Piped output (CI logs, files) gets rich's 80-column default; the results table needs more.
        # Under torchrun only rank 0 prints: the other ranks' output would repeat it.
        console = (Console() if sys.stdout.isatty() else Console(width=240)) if dist.is_main else Console(quiet=True)
        invocation = parse_config(argv)
        if invocation.settings.output.resume:  # every rank reads the saved settings: OUT must be shared
            invocation = resumed(invocation, read_saved_run(Path(invocation.settings.output.resume))[0])
        if invocation.command != "run":
            return answer(invocation, console)
        run = Run(invocation, dist, console)
        run.plan()
        run.prepare()
        run.calibrate()
        if not run.sweep():
            return EXIT_OK  # rank 0 reports for all; a non-zero exit would make torchrun stop it mid-report
        return run.report()
    except BaseException as e:  # noqa: BLE001 -- exit_code re-raises what it does not map
        return exit_code(e, dist, run)


def exit_code(error: BaseException, dist: distributed.Dist, run: Run | None) -> int:
    """Every way out of a run, and its exit code. Anything not listed here propagates (a traceback)."""
    if isinstance(error, USER_ERRORS):  # found before anything was written; the same on every rank
        if dist.is_main:
            print(f"bench.run: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(error, KeyboardInterrupt):
        if run is not None and run.out is not None and run.run_info:
            run.interrupted(error)
        return interrupt_exit_code(error)
    if isinstance(error, parallel.RankFailure):  # --parallel data: this rank's variant failed; torchrun stops the rest
        distributed.record_failure(error)
        where = f"; finished variants are in {run.out}/results.json, finish with --resume {run.out}" if dist.is_main else ""
        print(f"bench.run: {error}{where}", file=sys.stderr)
        if error.details:
            print(error.details, file=sys.stderr, end="")
        return EXIT_FAILED
    if isinstance(error, Exception) and dist.world_size > 1:  # mostly a collective that failed because a peer stopped
        distributed.record_failure(error)
        print(f"bench.run: rank {dist.rank}: stopped by {type(error).__name__} (when another rank failed first, "
              f"torchrun's summary names it):", file=sys.stderr)
        traceback.print_exception(error)
        return EXIT_FAILED
    raise error


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"bench.run: warning: {message}\n"


if __name__ == "__main__":
    warnings.formatwarning = _one_line_warning  # warnings are for users here: no source line dumps
    sys.exit(main())
