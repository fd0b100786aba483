"""The speed features on the CPU: throughput mode, FLOPs and MFU in every row, the frozen trunk split
off, and the feature cache, each against the plain path it replaces."""
import json
import time

import pytest
import torch

from bench.run import main

TINY = ["--profile", "smoke", "--device", "cpu", "--train-size", "256", "--val-size", "128", "--batch-size", "32", "--workers", "1",
        "--loader", "torch", "--no-evaluate-best"]


def rows(out):
    return json.loads((out / "results.json").read_text())["rows"]


def test_throughput_mode_times_steps_without_evaluating(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,all", "--steps", "3", "--warmup-steps", "2", "--out", str(out)]) == 0
    head, full = rows(out)
    for row in (head, full):
        assert row["mode"] == "throughput" and row["steps"] == 5  # 2 warm-up + 3 timed
        assert row["top1"] is None and row["acc_per_gpu_hour"] is None and row["eval_images_per_s"] is None
        assert row["images_per_s"] > 0 and 0 < row["mfu"] and row["achieved_tflops"] > 0
    # a full fine-tune step costs about 3 forwards, a head-only step about 1
    assert 2.5 < full["train_gflops_per_image"] / head["train_gflops_per_image"] < 3.1
    assert not (out / "checkpoints").exists() and not (out / "evaluation").exists()
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["ceiling_tflops"] > 0
    assert run["tf32"] == {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    # The whole process costs more than its variants: start-up, the loader benchmark, the report.
    assert run["wall_s"] > head["wall_s"] + full["wall_s"]
    assert run["device_hours"] == pytest.approx(run["wall_s"] / 3600)
    for row in (head, full):  # a variant's own build (model, FLOP count) is inside its wall time
        assert row["wall_s"] > row["train_s"]
        assert row["device_peak_mem_bytes"] is None  # the CPU has no device memory apart from the process's


def test_split_trunk_trains_exactly_as_the_whole_model(tmp_path):
    args = [*TINY, "--unfreeze", "3", "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "split")]) == 0
    assert main([*args, "--no-split-trunk", "--out", str(tmp_path / "whole")]) == 0
    (split,), (whole,) = rows(tmp_path / "split"), rows(tmp_path / "whole")
    assert split["trunk_cut"] == "layer4.1" and whole["trunk_cut"] is None
    assert split["history"][0]["train_loss"] == whole["history"][0]["train_loss"]
    assert split["top1"] == whole["top1"]


def test_feature_cache_matches_training_through_the_trunk(tmp_path):
    args = [*TINY, "--unfreeze", "1", "--epochs", "3", "--augment", "none"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--feature-cache", "--out", str(tmp_path / "cached")]) == 0
    (plain,), (cached,) = rows(tmp_path / "plain"), rows(tmp_path / "cached")
    assert cached["feature_cache_s"] > 0 and plain["feature_cache_s"] is None
    # fp32, and the cache draws the torch loader's per-epoch order: the same training, to the last digit
    assert cached["top1"] == plain["top1"]
    assert cached["history"][-1]["train_loss"] == pytest.approx(plain["history"][-1]["train_loss"], rel=1e-4)
    # only the head's FLOPs are left per training image
    assert cached["train_gflops_per_image"] < 0.01 * plain["train_gflops_per_image"]
    # images/s is end to end, the cache's build included; the tail's own rate is named apart
    assert plain["tail_images_per_s"] is None
    trained = cached["steps"] * 32
    assert cached["images_per_s"] == pytest.approx(trained / (cached["train_s"] + cached["feature_cache_s"]), rel=1e-2)  # both times rounded to ms
    assert cached["tail_images_per_s"] > cached["images_per_s"]


@pytest.mark.parametrize("args, message", [
    (["--feature-cache", "--augment", "flip-crop"], "--feature-cache needs --augment none"),
    (["--feature-cache", "--augment", "none", "--frozen-bn", "train"], "--feature-cache needs the frozen prefix"),
    (["--steps", "3", "--max-steps", "4"], "contradict"),
    (["--steps", "3", "--final-best"], "--final-best cannot be honoured"),
])
def test_contradicting_speed_flags_are_refused(args, message, capsys):
    assert main([*TINY, *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_batch_search_doubles_until_out_of_memory_and_keeps_the_fastest():
    import torch

    from bench.batch_size import search

    speeds = {16: 100.0, 32: 180.0, 64: 260.0, 128: 250.0}

    def fake(batch):
        if batch > 128:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return speeds[batch]
    chosen, trials = search(fake, start=16, limit=4096)
    assert chosen == 64
    assert [t["batch_size"] for t in trials] == [16, 32, 64, 128, 256] and trials[-1]["oom"]
    assert search(lambda b: float(b), start=16, limit=100)[1][-1]["batch_size"] == 100  # the limit is tried
    with pytest.raises(torch.OutOfMemoryError, match="not even batch 16"):
        search(lambda b: fake(10_000), start=16, limit=4096)


def test_batch_size_auto_is_found_once_and_used_by_every_variant(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1,3", "--batch-size", "auto", "--steps", "2", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    chosen, trials = doc["run"]["batch_size"], doc["run"]["batch_size_search"]
    assert isinstance(chosen, int) and chosen in [t["batch_size"] for t in trials]
    assert trials[-1]["batch_size"] == 256  # doubling stops at the training set (256 images)
    assert all(r["batch_size"] == chosen for r in doc["rows"])
    assert f"-> batch {chosen}" in capsys.readouterr().out


def test_compiled_evaluation_pads_the_last_batch_instead_of_recompiling():
    import torch

    from bench.train import Trainer, make_optimizer, make_scheduler
    from models import build_model

    torch._dynamo.reset()
    model = build_model("resnet18", 10, None, "linear").to(memory_format=torch.channels_last)
    opt = make_optimizer("sgd", model.parameters(), lr=0.1, weight_decay=0, momentum=0, device=torch.device("cpu"))
    sched = make_scheduler("none", opt, total_steps=1, steps_per_epoch=1, step_size=1, gamma=1)
    kw = dict(device=torch.device("cpu"), precision="fp32", compile_mode=None, optimizer=opt, scheduler=sched)
    x = torch.randn(20, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (20,))
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]  # the last one is partial
    eager = Trainer(model, compile=False, **kw).evaluate(batches, 10)
    compiled_trainer = Trainer(model, compile=True, **kw)
    compiled_trainer.evaluate(batches[:2], 10)  # compiles for the full batch
    with torch.compiler.set_stance("fail_on_recompile"):  # the partial batch must not recompile
        compiled = compiled_trainer.evaluate(batches, 10)
    assert compiled.images == 20 and compiled.top1 == eager.top1
    assert abs(compiled.loss - eager.loss) < 1e-4
    torch._dynamo.reset()


def test_data_wait_is_the_idle_share_of_the_timed_steps_only():
    from bench.config import parse_config
    from bench.variant import summarise
    from bench.train import EpochStats

    train = parse_config(["--warmup-steps", "2", "--batch-size", "10"]).settings.train
    # 6 steps of 10 ms; the two warm-up steps waited 90 ms each for input, the timed ones 2 ms
    step_ms, idle_ms = [100.0, 100.0, 10.0, 10.0, 10.0, 10.0], [90.0, 90.0, 2.0, 2.0, 2.0, 2.0]
    epochs = [(EpochStats(loss=1.0, images=60, step_ms=step_ms, idle_ms=idle_ms, wall_s=0.24), None)]
    assert summarise(train, False, epochs)["data_wait_pct"] == 20.0


def test_data_wait_shows_a_slow_loader():
    from bench.train import Trainer, make_optimizer, make_scheduler

    model = torch.nn.Linear(8, 2)
    opt = make_optimizer("sgd", model.parameters(), lr=0.1, weight_decay=0, momentum=0, device=torch.device("cpu"))
    trainer = Trainer(model, device=torch.device("cpu"), precision="fp32", compile=False, compile_mode=None,
                      optimizer=opt, scheduler=make_scheduler("none", opt, total_steps=1, steps_per_epoch=1,
                                                              step_size=1, gamma=1))

    def slow(batches=6):
        for _ in range(batches):
            time.sleep(0.05)  # input that takes 50 ms against a step of well under 1 ms
            yield torch.randn(4, 8), torch.randint(0, 2, (4,))
    stats = trainer.train_epoch(slow())
    assert len(stats.idle_ms) == len(stats.step_ms) == 6
    # interval i ends with fetching batch i + 1: five waited 50 ms for input, the last (end of data) did not
    assert all(ms >= 50.0 for ms in stats.idle_ms[:5]) and stats.idle_ms[5] < 50.0
    assert all(idle <= step for idle, step in zip(stats.idle_ms, stats.step_ms))


def test_batch_search_takes_every_allocation_failure_for_out_of_memory():
    from bench.batch_size import search

    def cublas(batch):
        if batch > 32:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return float(batch)
    chosen, trials = search(cublas, start=16, limit=4096)
    assert chosen == 32 and trials[-1]["oom"] and "CUBLAS_STATUS_ALLOC_FAILED" in trials[-1]["error"]

    def broken(batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):  # a real error is not mistaken for a full device
        search(broken, start=16, limit=4096)


BIG = 256 * 2**20  # bytes: far above what a step of the tiny model allocates


def allocating_in_first_step(monkeypatch, device: torch.device) -> None:
    """The run's first training step also allocates (and touches) BIG bytes and frees them, as cuDNN's
    autotuner does with its trial workspaces."""
    from bench.train import Trainer
    step = Trainer.step

    def first_step_allocates(self, images, labels):
        if self.steps_done == 0:
            torch.ones(BIG // 4, device=device).sum().item()
        return step(self, images, labels)
    monkeypatch.setattr(Trainer, "step", first_step_allocates)


def test_peak_memory_is_the_steady_state_and_the_warmup_peak_is_apart(tmp_path, monkeypatch):
    """On the CPU the peak is resident memory (VmHWM, reset after the warm-up through /proc)."""
    allocating_in_first_step(monkeypatch, torch.device("cpu"))
    out = tmp_path / "run"
    assert main([*TINY, "--weights", "none", "--unfreeze", "1", "--steps", "3", "--warmup-steps", "2",
                 "--out", str(out)]) == 0
    (row,) = rows(out)
    assert row["warmup_peak_mem_bytes"] - row["peak_mem_bytes"] > 0.8 * BIG, row
    assert row["warmup_device_peak_mem_bytes"] is None and row["device_peak_mem_bytes"] is None
    assert "warm-up mem" in (out / "table.txt").read_text()


def test_without_warmup_steps_the_peak_covers_the_whole_run(tmp_path, monkeypatch):
    allocating_in_first_step(monkeypatch, torch.device("cpu"))
    out = tmp_path / "run"
    assert main([*TINY, "--weights", "none", "--unfreeze", "1", "--steps", "3", "--warmup-steps", "0",
                 "--out", str(out)]) == 0
    (row,) = rows(out)
    assert row["warmup_peak_mem_bytes"] is None and row["peak_mem_bytes"] > BIG
    assert "warm-up mem" not in (out / "table.txt").read_text()


@pytest.mark.parametrize("warmup, release, reset", [(5, 4, 5), (2, 1, 2), (1, 1, 1)])
def test_the_cache_is_released_in_the_last_untimed_step_and_the_peaks_reset_after_the_warmup(
        monkeypatch, warmup, release, reset):
    """The release synchronises and the next step reserves again: both belong in a step left out of
    images/s, so the release comes one step before the warm-up ends (at its end when it is one step)."""
    import bench.measure as measure
    events = []
    monkeypatch.setattr(measure, "release_cached_memory", lambda device: events.append(("release", step)))
    monkeypatch.setattr(measure, "reset_peak_memory", lambda device: events.append(("reset", step)))
    memory = measure.PeakMemory(torch.device("cpu"), warmup)
    for step in range(1, warmup + 4):
        memory.step_done(step)
    assert events == [("release", release), ("reset", reset)]
    assert memory.warmup_bytes > 0 and memory.warmup_device_bytes is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's and the device's peaks on CUDA need a GPU")
def test_cuda_peaks_leave_the_warmup_out(tmp_path, monkeypatch):
    allocating_in_first_step(monkeypatch, torch.device("cuda"))
    out = tmp_path / "run"
    assert main([*TINY, "--device", "cuda", "--weights", "none", "--unfreeze", "1", "--steps", "5",
                 "--warmup-steps", "3", "--out", str(out)]) == 0
    (row,) = rows(out)
    print(f"\ntorch peak {row['peak_mem_bytes'] / 2**20:.0f} MiB (warm-up {row['warmup_peak_mem_bytes'] / 2**20:.0f}), "
          f"device {row['device_peak_mem_bytes'] / 2**20:.0f} MiB (warm-up "
          f"{row['warmup_device_peak_mem_bytes'] / 2**20:.0f})")
    assert row["warmup_peak_mem_bytes"] - row["peak_mem_bytes"] > 0.9 * BIG
    # the allocator's cache was released before the steady state: the device no longer holds BIG for us
    assert row["warmup_device_peak_mem_bytes"] - row["device_peak_mem_bytes"] > 0.9 * BIG
