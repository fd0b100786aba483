"""A fuzzed command line: hypothesis draws flags with valid and junk values, and every one ends in a
run or in one line and exit 2, never a traceback. hypothesis is in the [test] extra; where it is not
installed (the GPU machine) this file is skipped with the reason, and the rest of the suite runs."""
import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (it is in the [test] extra)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bench.source_task  # noqa: E402
from bench.run import main  # noqa: E402


# Every flag with valid and junk values; hypothesis builds command lines from them.
JUNK = ["", "-1", "0", "nan", "1e999", "x", "--", "1,,2", "all", "9999999", "☃", "-0.5"]
FLAGS = {
    "--model": ["resnet18", "resnet51", "vgg16"], "--weights": ["none", "imagenet", "pretext", "/nonexistent.pt"],
    "--head": ["linear", "mlp"], "--unit": ["module", "block", "stage", "neuron"],
    "--unfreeze": ["1", "1,2", "all", "200", "1,1"], "--frozen-bn": ["eval", "train", "sometimes"],
    "--dataset": ["synthetic", "cifar10", "mnist", "folder:/no/such/folder"], "--data-dir": ["/proc/nope"],
    "--val-size": ["64", "63", "100000"], "--train-size": ["128", "16"], "--num-classes": ["4", "1"],
    "--image-size": ["32", "33"], "--augment": ["none", "flip-crop", "heavy", "mixup"],
    "--normalize": ["cifar", "imagenet", "zca"], "--loader": ["dali", "torch", "torchvision", "ffcv"],
    "--eval-split": ["val", "test", "train"], "--workers": ["0", "1"], "--device": ["cpu", "cuda", "tpu"],
    "--precision": ["fp32", "bf16", "fp8"], "--compile-mode": ["default", "fast"], "--epochs": ["1"],
    "--steps": ["1", "2"], "--batch-size": ["16", "32", "100000"], "--optimizer": ["sgd", "adam", "lion"],
    "--lr": ["0.01", "-1"], "--weight-decay": ["0"], "--momentum": ["0.9"], "--scheduler": ["cosine", "step", "none", "linear"],
    "--step-size": ["1"], "--gamma": ["0.5"], "--label-smoothing": ["0.1"], "--warmup-steps": ["1"],
    "--oom": ["fail", "retry", "ignore"], "--profile": ["smoke", "default", "nope"], "--seed": ["0", "7"],
}
SWITCHES = ["--final", "--allow-overlap", "--compile", "--no-channels-last", "--oom-scale-lr", "--dry-run", "--list-layers"]


@st.composite
def command_lines(draw):
    argv = ["--profile", "smoke", "--device", "cpu", "--train-size", "64", "--val-size", "32", "--batch-size", "16", "--steps", "1",
            "--workers", "0"]
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=5)):
        argv += [flag, draw(st.sampled_from(FLAGS[flag] + JUNK))]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    return argv


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_fuzzed_command_lines_never_give_a_traceback(argv, tmp_path_factory, capsys, monkeypatch):
    # Training itself is not what is fuzzed here: the sweep is replaced by a no-op, and everything
    # before it (parsing, profiles, models, data, splits, the output directory) runs for real.
    monkeypatch.setattr("bench.run.run_sweep", lambda *a, **k: [])
    monkeypatch.setattr("bench.run.make_loader", lambda *a, **k: None)
    monkeypatch.setattr("bench.run.measure_loader", lambda *a, **k: {"loader_images_per_s": 1.0})
    # the smoke profile's --weights pretext builds in a second, not a minute, into temporary folders:
    # a relative junk --data-dir (`0`, `nan`) not into the checkout, the default not into the real cache
    monkeypatch.setattr(bench.source_task, "RECIPE", {**bench.source_task.RECIPE, "source_classes": 10, "images": 256,
                                                      "epochs": 1, "batch_size": 64})
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("fuzz") / "out"
    try:
        code = main([*argv, "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (argv, err)
