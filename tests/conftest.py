import pytest
import torch


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
