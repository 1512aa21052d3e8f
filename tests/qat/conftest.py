import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one intra-op thread is fastest, and the 2-core machine is shared with other test runs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
