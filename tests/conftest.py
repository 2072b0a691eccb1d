"""Test configuration. The Triton interpreter must be switched on before any @triton.jit runs,
so that the GPU kernels execute on CPU tensors in CI. On a machine with a CUDA GPU the Triton
tests run natively instead (force either way with FASTGFN_TEST_NATIVE_TRITON=1 or =0)."""

import os

import torch

_native = os.environ.get("FASTGFN_TEST_NATIVE_TRITON")
if _native == "1" or (_native is None and torch.cuda.is_available()):
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def triton_device() -> str:
    """Where Triton tests put their tensors: CUDA natively, the CPU under the interpreter."""
    return "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture
def tdevice() -> str:
    return triton_device()


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not have_triton(), reason="triton is not installed")
