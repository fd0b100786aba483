"""The speed features on the CPU: throughput mode, FLOPs and MFU in every row, the frozen trunk split
off, and the feature cache, each against the plain path it replaces."""
import json

import pytest

from bench.run import main

TINY = ["--profile", "smoke", "--train-size", "256", "--val-size", "128", "--batch-size", "32", "--workers", "1",
        "--loader", "torch", "--no-evaluate-best"]


def rows(out):
    return json.loads((out / "results.json").read_text())["depths"]


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
    assert all(r["batch_size"] == chosen for r in doc["depths"])
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
