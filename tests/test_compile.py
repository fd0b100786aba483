"""A compiled sweep compiles every variant the same way, from a clean compiler state, with static shapes.

Dynamo keys its caches on code objects, and every variant runs the same `forward`: without a reset
between variants the recompile limit (8) is reached around the fifth variant and the rest run eager
under a "compiled" label. A backend that records each graph it is handed shows what was compiled.
"""
import json

import pytest
import torch
from torch._dynamo import register_backend

from bench.run import main

GRAPHS: list[dict] = []


@register_backend(name="recording_for_tests")
def _recording(gm: torch.fx.GraphModule, example_inputs):
    """Eager execution of the captured graph; notes whether any input shape is symbolic (dynamic)."""
    symbolic = False
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor)
                                               and any(isinstance(d, torch.SymInt) for d in value.shape)):
            symbolic = True
    GRAPHS.append({"symbolic": symbolic})
    return gm.forward


TINY = ["--profile", "smoke", "--device", "cpu", "--loader", "torch", "--train-size", "128", "--val-size", "40",
        "--batch-size", "32", "--workers", "1", "--no-evaluate-best", "--compile",
        "--compile-backend", "recording_for_tests"]


def test_every_variant_of_a_compiled_six_depth_sweep_is_compiled_alike(tmp_path):
    GRAPHS.clear()
    out = tmp_path / "run"
    # --eval-batch-size differs from the training batch, and the last evaluation batch is partial (40 = 16+16+8)
    assert main([*TINY, "--unfreeze", "1,3,6,12,15,25", "--epochs", "1", "--eval-batch-size", "16",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["unfreeze-1", "unfreeze-3", "unfreeze-6", "unfreeze-12", "unfreeze-15",
                                            "unfreeze-25"]
    graphs = [r["compile_graphs"] for r in rows]
    # one training graph and one evaluation graph each (the partial batch is padded): the sixth as the first
    assert graphs == [2] * 6, graphs
    assert len(GRAPHS) == sum(graphs)
    assert not any(g["symbolic"] for g in GRAPHS), "a compiled variant traced a dynamic (symbolic) batch dimension"
    torch._dynamo.reset()


def test_compile_backend_is_checked(capsys):
    assert main([*TINY, "--compile-backend", "no_such_backend", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown --compile-backend 'no_such_backend'" in err and "inductor" in err
    assert main(["--profile", "smoke", "--compile-backend", "eager", "--dry-run"]) == 2
    assert "--compile-backend eager needs --compile" in capsys.readouterr().err


def test_batch_size_auto_trials_the_compiled_step(tmp_path):
    GRAPHS.clear()
    out = tmp_path / "run"
    assert main([*TINY, "--unfreeze", "1", "--batch-size", "auto", "--steps", "1", "--warmup-steps", "1",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    trials = doc["run"]["batch_size_search"]
    assert [t["batch_size"] for t in trials] == [16, 32, 64, 128]  # up to the 128 training images
    (row,) = doc["rows"]
    # each trial compiled its training step from a clean state, as the variant then did
    assert len(GRAPHS) == len(trials) + row["compile_graphs"] and row["compile_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_rows_count_their_compile_cache_hits(tmp_path, monkeypatch):
    """torch._dynamo.reset() leaves inductor's and AOTAutograd's caches on disk: the second seed of a
    variant compiles the same graphs and is served from them, which its row must say."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold for the first seed
    out = tmp_path / "run"
    assert main(["--profile", "smoke", "--device", "cpu", "--loader", "torch", "--model", "simple_cnn",
                 "--weights", "none", "--train-size", "64", "--val-size", "32", "--batch-size", "32",
                 "--workers", "1", "--no-evaluate-best", "--compile", "--unfreeze", "1", "--seeds", "0,1",
                 "--steps", "1", "--warmup-steps", "1", "--out", str(out)]) == 0
    first, second = json.loads((out / "results.json").read_text())["rows"]
    print(f"\ncompile s {first['compile_s']} -> {second['compile_s']}; cache hits/misses "
          f"{first['compile_cache_hits']}/{first['compile_cache_misses']} -> "
          f"{second['compile_cache_hits']}/{second['compile_cache_misses']}")
    assert first["compile_cache_misses"] > 0 and first["compile_cache_hits"] == 0
    assert second["compile_cache_hits"] > 0 and second["compile_cache_misses"] == 0
    torch._dynamo.reset()
