"""The optional native CPU library (kernels/, CMake) against the naive reference."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from memlayers import knn_search

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory, monkeypatch_module):
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed for the native build")
    build = tmp_path_factory.mktemp("native-build")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DMEMLAYERS_BUILD_NATIVE=ON"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    lib = build / "libmemlayers_kernels.so"
    monkeypatch_module.setenv("MEMLAYERS_NATIVE_LIB", str(lib))
    return lib


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("B, Hq, Hkv, T, M, D, k", [(2, 4, 2, 5, 1000, 64, 33), (1, 1, 1, 1, 20, 16, 50), (1, 2, 1, 40, 3000, 80, 7)])
def test_native_matches_reference(native_lib, metric, B, Hq, Hkv, T, M, D, k):
    q, keys = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, M, D)
    lengths = torch.randint(1, M + 1, (B,))
    s, i = knn_search(q, keys, k, valid_lengths=lengths, metric=metric, backend="native")
    s_ref, i_ref = knn_search(q, keys, k, valid_lengths=lengths, metric=metric, backend="torch")
    finite = s_ref > float("-inf")
    assert torch.equal(s > float("-inf"), finite)
    assert torch.allclose(s[finite], s_ref[finite], rtol=1e-5, atol=1e-4)
    assert bool((i[~finite] == -1).all())
    assert (i == i_ref).float().mean() > 0.99  # equal up to near-ties


def test_native_rejects_non_fp32(native_lib):
    with pytest.raises(ValueError, match="fp32"):
        knn_search(torch.randn(1, 1, 2, 16).half(), torch.randn(1, 1, 9, 16).half(), 3, backend="native")


def test_native_missing_library_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMLAYERS_NATIVE_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(RuntimeError, match="make native"):
        knn_search(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 9, 16), 3, backend="native")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_native_follows_the_nan_rule(native_lib, metric):
    """Same rule as the torch and Triton paths (tests/ops/test_nonfinite.py): a NaN score is no match."""
    q, keys = torch.randn(1, 2, 4, 16), torch.randn(1, 1, 30, 16)
    keys[0, 0, 5, 1] = float("nan")
    q[0, 1, 2, 0] = float("nan")
    s, i = knn_search(q, keys, 5, metric=metric, backend="native")
    s_ref, i_ref = knn_search(q, keys, 5, metric=metric, backend="torch")
    assert not bool((i == 5).any())
    assert bool((i[0, 1, 2] == -1).all()) and bool((s[0, 1, 2] == float("-inf")).all())
    assert not bool(s.isnan().any())
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(i, i_ref)
