"""fastgfn/trainer/reporting/machine.py: the machine every reported figure names."""

from fastgfn.trainer.reporting.machine import EXTENSIONS, cpu_facts, describe_machine, machine_line

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse avx avx2 fma
"""


def test_cpu_facts_read_the_first_processor():
    assert cpu_facts(XEON) == {"model": "Intel(R) Xeon(R) Platinum 8488C",
                               "extensions": ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]}
    assert cpu_facts(EPYC) == {"model": "AMD EPYC", "extensions": ["avx2"]}
    assert cpu_facts("") == {"model": "", "extensions": []}


def test_this_machine_is_described():
    m = describe_machine()
    assert m["cpu"] and m["cores"] >= 1 and set(m["extensions"]) <= set(EXTENSIONS)
    assert m["bf16_matmuls"] in ("native", "emulated")
    assert m["lm_head_bf16_products"] in ("mkl", "avx512_bf16", "off", "unavailable")
    if "amx_bf16" in m["extensions"]:
        assert m["lm_head_bf16_products"] in ("mkl", "unavailable")
    line = machine_line(m)
    assert line.endswith(f"; lm_head bf16 products {m['lm_head_bf16_products']}")
    assert line.startswith(m["cpu"]) and f"{m['cores']} cores" in line
    assert machine_line({"cpu": "X", "cores": 2, "extensions": [], "bf16_matmuls": "emulated"}) \
        == "X, 2 cores, no AVX2; bf16 matmuls emulated"
