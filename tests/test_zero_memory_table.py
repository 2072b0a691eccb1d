"""`bench/zero_memory_table.py`: the largest model per ZeRO stage and GPU count from
DeepSpeed's estimators, with the CPU-offload rows limited by host memory per node."""

import pytest

pytest.importorskip("deepspeed")

from bench import zero_memory_table as zmt  # noqa: E402


def test_offload_rows_fit_their_budgets_and_follow_the_estimators():
    rows = {(s, g): (n, host) for s, g, n, host in zmt.table(host_gb=1000)}
    budget_gpu, budget_host = 80e9 * 0.9, 1000e9 * 0.9
    for (stage, gpus), (n, host) in rows.items():
        cpu, gpu = zmt.model_state_bytes(stage, n, gpus)
        assert gpu <= budget_gpu and cpu == host
        if "offload" in stage:
            assert host <= budget_host
            # 1% more parameters no longer fit on the GPU or in host memory
            cpu2, gpu2 = zmt.model_state_bytes(stage, n * 1.01, gpus)
            assert gpu2 > budget_gpu or cpu2 > budget_host, (stage, gpus)
    # ZeRO-3 with optimizer and parameter offload: host-bound, 18 bytes/param x 1.5 buffer
    # factor spread over the nodes
    z3 = "ZeRO-3, optimizer + parameter offload (CPU)"
    for gpus, nodes in ((1, 1), (8, 1), (64, 8)):
        assert rows[(z3, gpus)][0] == pytest.approx(budget_host * nodes / 27, rel=1e-6)
    # ZeRO-2 with optimizer offload on one GPU: the 16-bit weights on the GPU are the limit
    assert rows[("ZeRO-2, optimizer offload (CPU)", 1)][0] == pytest.approx(budget_gpu / 2, 1e-6)
    # offload moves the one-GPU limit from ~4 B to tens of billions
    assert rows[("ZeRO-3", 1)][0] < 5e9 < 30e9 < rows[(z3, 1)][0]


def test_host_memory_argument_checked(capsys):
    with pytest.raises(SystemExit):
        zmt.main(["--host_gb", "0"])
    assert "--host_gb must be > 0" in capsys.readouterr().err
