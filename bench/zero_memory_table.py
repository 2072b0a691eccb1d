"""The largest model trainable full-parameter on 1, 8 and 64 80-GB GPUs, per ZeRO stage,
from DeepSpeed's own model-state estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``, the functions behind the ``*_all_cold`` reports).

Assumptions (printed with the table): mixed-precision AdamW (16-bit params and grads, fp32
master params and two moments: 18 bytes/param sharded + 2 bytes/param 16-bit weights for
ZeRO-2), model states only -- activations, KV cache, the frozen reward model and the
allocator's fragmentation are not counted, so a real run needs head room; we keep 10% of
each GPU (72 GB usable of 80); 8 GPUs per node; ZeRO-3's largest layer = 2% of the
parameters (a Llama-style MLP block or embedding); "offload" = optimizer (and for ZeRO-3
parameter) offload to CPU, which moves the limit to host memory, reported separately.

    python bench/zero_memory_table.py
"""

from __future__ import annotations

GPU_BYTES = 80e9
USABLE = 0.9
LARGEST_LAYER_FRACTION = 0.02


def largest(fits) -> float:
    lo, hi = 1e6, 1e14
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def table() -> list[tuple[str, int, float]]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for gpus in (1, 8, 64):
        per_node = min(gpus, 8)
        nodes = max(1, gpus // 8)
        budget = GPU_BYTES * USABLE

        def z2(n, per_node=per_node, nodes=nodes, budget=budget):
            return (
                estimate_zero2_model_states_mem_needs(int(n), per_node, nodes, cpu_offload=False)[1]
                <= budget
            )

        def z3(n, per_node=per_node, nodes=nodes, budget=budget):
            return (
                estimate_zero3_model_states_mem_needs(
                    int(n),
                    int(n * LARGEST_LAYER_FRACTION),
                    per_node,
                    nodes,
                    cpu_offload=False,
                    cpu_offload_params=False,
                )[1]
                <= budget
            )

        def z0(n, budget=budget):  # plain data parallel: every GPU holds all 20 bytes/param
            return 20 * n <= budget

        rows += [
            ("no ZeRO (DDP)", gpus, largest(z0)),
            ("ZeRO-2", gpus, largest(z2)),
            ("ZeRO-3", gpus, largest(z3)),
        ]
    return rows


def markdown() -> str:
    rows = table()
    stages = ["no ZeRO (DDP)", "ZeRO-2", "ZeRO-3"]
    out = ["| stage | 1 GPU | 8 GPUs | 64 GPUs |", "|---|---|---|---|"]
    for st in stages:
        vals = [f"{n / 1e9:.1f} B" for s, g, n in rows if s == st]
        out.append(f"| {st} | " + " | ".join(vals) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
