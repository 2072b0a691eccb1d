"""Packaging promises: light import, C++ kernels built, a loud fallback when they are not."""

import os
import subprocess
import sys

import fastgfn
from fastgfn._extension import cpu_kernels_available


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_import_does_not_pull_the_training_stack():
    code = (
        "import sys, fastgfn\n"
        "heavy = [m for m in ('triton', 'transformers', 'deepspeed', 'peft') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cpp_kernels_are_built():
    assert cpu_kernels_available(), "the C++ CPU kernels did not build; see setup.py / CMake"


def test_fallback_without_cpp_kernels_warns_once_and_matches():
    code = (
        "import warnings, torch, fastgfn\n"
        "warnings.simplefilter('always')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "pf, pt, r = torch.randn(3, 5, generator=g), torch.randn(3, 6, generator=g), "
        "torch.randn(3, 6, generator=g)\n"
        "n = torch.tensor([5, 2, 0])\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    a = fastgfn.subtb_loss(pf, pt, r, n)\n"
        "    b = fastgfn.subtb_loss(pf, pt, r, n)\n"
        "ref = fastgfn.subtb_loss(pf.double(), pt.double(), r.double(), n, backend='reference')\n"
        "msgs = [str(w.message) for w in caught if 'C++ CPU kernels' in str(w.message)]\n"
        "print(len(msgs), float((a - ref).abs()) < 1e-5, float(a) == float(b))\n"
    )
    out = run_python(code, FASTGFN_DISABLE_CPP="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True", "True"]


def test_public_api_is_exported():
    for name in ("subtb_loss", "db_loss", "tb_loss", "vargrad_loss", "SubTBLoss", "TBLoss"):
        assert hasattr(fastgfn, name), name
