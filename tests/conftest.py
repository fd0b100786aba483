import json

import pytest
import torch

from bench.schema import validate_results
from pipelines.synthetic import make_synthetic


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Plain `pytest` runs every benchmark once, as a test (a broken benchmark fails the suite, cheaply);
    `pytest --benchmark-only` or `--benchmark-enable` times them. Runs before pytest-benchmark reads
    its options."""
    timed = any(config.getoption(name, False) for name in ("benchmark_only", "benchmark_enable", "benchmark_skip"))
    if not timed and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


@pytest.fixture(autouse=True)
def _seed():
    # A fixed seed keeps the learnability checks stable.
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _every_results_file_matches_the_schema(request):
    """After each test that used tmp_path: every results.json it left validates against bench.schema."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    for path in sorted(tmp.rglob("results.json")) if tmp else []:
        errors = validate_results(json.loads(path.read_text()))
        assert not errors, f"{path}: {errors[:5]}"


@pytest.fixture(scope="module")
def synth():
    """100 synthetic CIFAR-shaped images of 10 classes, for the loader tests."""
    return make_synthetic(100, 10, seed=5)
