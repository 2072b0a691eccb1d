"""The process group: rank and world size, joining and leaving it, collectives the trainer
needs on any backend, and the ZeRO-3 construction context.

One process without a launcher is a world of one: every function here works there and the
collectives are no-ops. Under the DeepSpeed launcher the group is gloo on CPUs and nccl on
GPUs (nccl reduces CUDA tensors only, so small flags are moved to ``comm_device()``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

import torch

# Per-rank random streams: rank r's seed is seed + RANK_SEED_STRIDE * r (a prime, so the
# streams of nearby seeds and ranks never coincide).
RANK_SEED_STRIDE = 1000003


def rank_seed(seed: int, rank_: int) -> int:
    return seed + RANK_SEED_STRIDE * rank_


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def comm_device() -> torch.device:
    """Where a tensor for a collective lives: nccl reduces CUDA tensors only."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_max(value: int) -> int:
    """The largest of every rank's ``value`` (one small all-reduce; local value alone)."""
    if world_size() == 1:
        return int(value)
    flag = torch.tensor([int(value)], device=comm_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def all_ranks_agree(value: bool) -> bool:
    """True only when every rank's ``value`` is true."""
    return all_ranks_max(int(not value)) == 0


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the ranks in place (same value everywhere); returns it."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def zero_stage(ds_config: dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without one)."""
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def init_distributed() -> None:
    """Join the process group the DeepSpeed launcher set up (gloo on CPU, nccl on GPUs). A
    process started without a launcher (``python -m fastgfn.train --deepspeed_config ...``)
    becomes a group of one instead of DeepSpeed's MPI discovery (which needs mpi4py)."""
    import deepspeed

    launched = any(k in os.environ for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    if not launched:
        import socket

        with socket.socket() as sock:  # a free port for the one-process rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    """Tear the process group down while the interpreter is still whole. A process that
    exits with the group alive leaves gloo's worker threads to C++ static destruction, where
    they can abort the process (SIGABRT, "terminate called without an active exception")
    after a run that finished cleanly."""
    if is_distributed():
        torch.distributed.destroy_process_group()


def shutdown_distributed() -> None:
    """End of a distributed run: wait for every rank (none may still be talking to this one
    when its sockets close), then destroy the process group. A no-op without one."""
    if is_distributed():
        torch.distributed.barrier()
        _destroy_process_group()


def exit_rank(code: int) -> None:
    """End a process that is one of several ranks (a launcher set ``WORLD_SIZE`` > 1) with
    ``code``, once its run is over and written: output flushed, then ``os._exit``, which skips
    the C++ static destruction where libraries' worker threads left behind (gloo, DeepSpeed's
    ops) can abort a rank that finished cleanly (SIGABRT, "terminate called without an active
    exception"). Returns without doing anything in any other process (one plain process, a
    library caller's interpreter)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return
    shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def zero3_init_context(ds_config: dict | None):
    """Context in which a Hugging Face model is built already partitioned (ZeRO-3)."""
    if zero_stage(ds_config) != 3:
        return contextlib.nullcontext()
    from transformers.integrations import HfDeepSpeedConfig

    return _KeepAlive(HfDeepSpeedConfig(ds_config))


class _KeepAlive(contextlib.AbstractContextManager):
    """HfDeepSpeedConfig works through a weak reference: keep it alive for the run."""

    held = []

    def __init__(self, obj):
        self.held.append(obj)

    def __exit__(self, *exc):
        return False
