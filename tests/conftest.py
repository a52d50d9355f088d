"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread, then restore the count.

    Small FFTs and tiny models run fastest on one thread, and on a CPU shared with other
    jobs extra intra-op threads spin and slow the tests several times over.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
