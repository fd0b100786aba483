import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Tests share 2 cores with DALI's threads; a fixed seed keeps the learnability checks stable.
    torch.manual_seed(0)
    yield
