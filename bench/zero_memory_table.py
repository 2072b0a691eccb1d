"""The largest model trainable full-parameter on 1, 8 and 64 80-GB GPUs, per ZeRO stage, with
and without CPU offload, from DeepSpeed's own model-state estimators
(``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs``, the
functions behind the ``*_all_cold`` reports).

Assumptions (printed with the table): mixed-precision AdamW (16-bit params and grads, fp32
master params and two moments: 18 bytes/param sharded + 2 bytes/param 16-bit weights for
ZeRO-2), model states only -- activations, KV cache, the frozen reward model and the
allocator's fragmentation are not counted, so a real run needs head room; we keep 10% of
each GPU (72 GB usable of 80) and of each node's host memory; 8 GPUs per node; ZeRO-3's
largest layer = 2% of the parameters (a Llama-style MLP block or embedding), ``zero_init``
on. The offload rows (``offload_optimizer`` to CPU for ZeRO-2, ``offload_optimizer`` and
``offload_param`` to CPU for ZeRO-3) need both the GPU and the host estimate to fit; host
memory per node is ``--host_gb`` (default 1000 GB), and the table gives the host memory per
node the largest model needs.

    python bench/zero_memory_table.py [--host_gb 1000]
"""

from __future__ import annotations

import argparse

GPU_BYTES = 80e9
USABLE = 0.9
LARGEST_LAYER_FRACTION = 0.02
GPUS_PER_NODE = 8
GPU_COUNTS = (1, 8, 64)
STAGES = (
    "no ZeRO (DDP)",
    "ZeRO-2",
    "ZeRO-3",
    "ZeRO-2, optimizer offload (CPU)",
    "ZeRO-3, optimizer + parameter offload (CPU)",
)


def largest(fits) -> float:
    lo, hi = 1e6, 1e15
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def model_state_bytes(stage: str, n: float, gpus: int) -> tuple[float, float]:
    """(host bytes per node, bytes per GPU) of the model states of ``n`` parameters."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node, nodes = min(gpus, GPUS_PER_NODE), max(1, gpus // GPUS_PER_NODE)
    n = int(n)
    if stage == "no ZeRO (DDP)":  # every GPU holds all 20 bytes/param
        return 0.0, 20.0 * n
    if stage.startswith("ZeRO-2"):
        offload = "offload" in stage
        return estimate_zero2_model_states_mem_needs(n, per_node, nodes, cpu_offload=offload)
    offload = "offload" in stage
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        n, int(n * LARGEST_LAYER_FRACTION), per_node, nodes,
        cpu_offload=offload, cpu_offload_params=offload,
    )
    return cpu, gpu


def table(host_gb: float = 1000.0) -> list[tuple[str, int, float, float]]:
    """(stage, GPUs, largest parameter count, host bytes per node it needs)."""
    rows = []
    for gpus in GPU_COUNTS:
        for stage in STAGES:
            offload = "offload" in stage

            def fits(n, stage=stage, gpus=gpus, offload=offload):
                cpu, gpu = model_state_bytes(stage, n, gpus)
                return gpu <= GPU_BYTES * USABLE and (
                    not offload or cpu <= host_gb * 1e9 * USABLE
                )

            n = largest(fits)
            rows.append((stage, gpus, n, model_state_bytes(stage, n, gpus)[0]))
    return rows


def markdown(host_gb: float = 1000.0) -> str:
    rows = table(host_gb)
    out = [
        f"Offload rows: {host_gb:.0f} GB of host memory per node; in brackets, the host memory"
        " per node the largest model needs.",
        "",
        "| stage | 1 GPU | 8 GPUs | 64 GPUs |",
        "|---|---|---|---|",
    ]
    for st in STAGES:
        cells = []
        for s, _, n, host in rows:
            if s != st:
                continue
            cell = f"{n / 1e9:.1f} B"
            if "offload" in st:
                cell += f" ({host / 1e9:.0f} GB)"
            cells.append(cell)
        out.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host_gb", type=float, default=1000.0,
                   help="host (CPU) memory per node in GB, for the offload rows")
    args = p.parse_args(argv)
    if args.host_gb <= 0:
        p.error(f"--host_gb must be > 0, got {args.host_gb}")
    print(markdown(args.host_gb))


if __name__ == "__main__":
    main()
