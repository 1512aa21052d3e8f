import os

import pytest
import torch

# Two cores: keep intra-op threads bounded so parallel test processes do not thrash.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:
    from hypothesis import settings

    settings.register_profile("lowbit", max_examples=60, deadline=None)
    settings.load_profile("lowbit")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (tiny tensors on a shared 2-core machine), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
