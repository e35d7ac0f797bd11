"""Test set-up: Triton kernels run under the interpreter where there is no GPU.

TRITON_INTERPRET must be set before any kernel is decorated, i.e. before memlayers' triton modules
are imported (they are imported lazily, on first use).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else CPU under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """The list of every Python-level read of tensor data while the test runs (``.item()``,
    ``.tolist()``, ``bool(t)``, ...): on a GPU each one waits for the device (issue 13's decode rule)."""
    reads = []
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


@pytest.fixture(scope="module")
def gloo_group():
    """A gloo process group of one rank in this process: runs the sharded code paths (their equality on
    several ranks is tested with spawned processes)."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()
