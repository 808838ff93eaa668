import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (Dynamo caches are per process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
