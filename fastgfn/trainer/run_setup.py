"""Building the parts of a run, in order: the process group (DeepSpeed or none), the random
streams, the policy, the frozen reward LM and the task, the engine, the objective, the
replay buffer and the source of batches (``build``)."""

from __future__ import annotations

import random
import resource
import time
from dataclasses import dataclass

import torch

from fastgfn.trainer.batches import BatchSource
from fastgfn.trainer.engines import build_engine, uses_deepspeed
from fastgfn.trainer.engines.distributed import (
    init_distributed,
    rank,
    rank_seed,
    world_size,
    zero3_init_context,
)
from fastgfn.trainer.engines.host_memory import keep_freed_memory
from fastgfn.trainer.model.loading import disable_dropout, load_model, load_tokenizer
from fastgfn.trainer.model.reward import build_reward_lm
from fastgfn.trainer.objective import Objective
from fastgfn.trainer.persistence import checkpoint
from fastgfn.trainer.replay import ReplayBuffer
from fastgfn.trainer.replay_seed import seed_buffer
from fastgfn.trainer.sampling.replica import build_replica
from fastgfn.trainer.tasks import build_task, task_class
from fastgfn.trainer.tasks.base import termination_token


class RandomStreams:
    """The run's random streams: torch's and Python's global generators (seeded with
    ``seed``), the batch stream (``py_rng``: prompts and replay; ``generator``: sampling, on
    the model's device, seeded per rank unless ``same_data_all_ranks``) and the evaluation
    generator."""

    def __init__(self, cfg, rank_: int):
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        self.cfg, self.rank = cfg, rank_
        run = cfg.run
        self.data_seed = run.seed if run.same_data_all_ranks else rank_seed(run.seed, rank_)
        self.py_rng = random.Random(self.data_seed)
        self.generator = self.eval_generator = None

    def place(self, device: torch.device) -> None:
        """Create the device generators (no host round trip per sampled token)."""
        self.generator = torch.Generator(device=device).manual_seed(self.data_seed)
        self.eval_generator = torch.Generator(device=device).manual_seed(
            rank_seed(self.cfg.run.seed + 7, self.rank))

    def state(self) -> dict:
        return checkpoint.rng_state(self.generator, self.py_rng)

    def restore(self, state: dict, step: int, rank_: int, fresh: bool = False) -> None:
        """Restore a checkpoint's streams. ``fresh``: rank ``rank_`` did not exist in the
        saving run and got rank 0's state, so it gets its own stream instead (deterministic in
        seed, rank and step), unless every rank samples the same data."""
        checkpoint.set_rng_state(state, self.generator, self.py_rng)
        if fresh and not self.cfg.run.same_data_all_ranks:
            seed = rank_seed(self.cfg.run.seed, rank_) + 7919 * step
            self.generator.manual_seed(seed)
            self.py_rng.seed(seed)


@dataclass
class Components:
    rank: int
    world: int
    streams: RandomStreams
    tokenizer: object
    task: object
    answer_task: object
    engine: object
    objective: Objective
    buffer: ReplayBuffer
    batches: BatchSource
    load_seconds: float


def start_process_group(cfg) -> dict | None:
    """Join the process group when the run uses DeepSpeed; its config (None otherwise)."""
    if not uses_deepspeed(cfg):
        return None
    from fastgfn.trainer.engines.ds_config import load_ds_config

    ds_config = load_ds_config(cfg)  # a bad file stops the run before the process group
    init_distributed()
    return ds_config


def load_policy(cfg, ds_config: dict | None):
    """(model, tokenizer). The tokenizer comes first, so a termination string it cannot
    encode as one token is refused before the model loads. Under ZeRO-3 the model is built
    already partitioned; a tiny test model is built whole so its initial weights do not depend
    on the stage."""
    tokenizer = load_tokenizer(cfg)
    termination_token(tokenizer, cfg.task.termination)  # a ConfigError naming the key
    if ds_config is not None and cfg.model.name != "tiny":
        with zero3_init_context(ds_config):
            return load_model(cfg, tokenizer=False)[0], tokenizer
    return load_model(cfg, tokenizer=False)[0], tokenizer


def build(cfg) -> Components:
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    ds_config = start_process_group(cfg)
    streams = RandomStreams(cfg, rank())
    t0 = time.time()
    model, tokenizer = load_policy(cfg, ds_config)
    load_seconds = time.time() - t0
    reward = None
    if task_class(cfg.task.name).needs_reward_model:
        reward = build_reward_lm(cfg, model, tokenizer, ds_config)
    task = build_task(cfg, tokenizer, reward)
    answer_task = task.answer_task(cfg, tokenizer, reward)
    model.train()
    disable_dropout(model)
    engine = build_engine(model, cfg, ds_config)
    if cfg.run.malloc_reuse and engine.device.type == "cpu":
        why_not = keep_freed_memory()
        if why_not is not None and rank() == 0:
            print(f"fastgfn: malloc_reuse: left off ({why_not})")
    streams.place(engine.device)
    sampling = cfg.sampling
    buffer = ReplayBuffer(sampling.replay_size, sampling.replay_min_distance,
                          sampling.replay_relative_distance, sampling.replay_sampling)
    if cfg.sampling.replay_seed:  # a resumed run then loads its saved buffer over these
        seeded, outside = seed_buffer(buffer, task, sampling.min_new_tokens,
                                      sampling.max_new_tokens)
        if rank() == 0:
            left = "" if not outside else (
                f" ({outside} with more than max_new_tokens={sampling.max_new_tokens} or fewer "
                f"than min_new_tokens={sampling.min_new_tokens} actions left out)")
            print(f"fastgfn: replay buffer seeded with {seeded} worked rationales{left}")
    batches = BatchSource(sampling, task, engine, build_replica(engine, sampling), buffer,
                        streams.py_rng, streams.generator)
    return Components(rank(), world_size(), streams, tokenizer, task, answer_task, engine,
                      Objective(cfg, engine.device, task.num_prompts()), buffer, batches,
                      load_seconds)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress_bar(cfg, is_main: bool, total: int, initial: int, desc: str, unit: str = "it"):
    """A tqdm bar on rank 0 when ``progress`` is on, else None."""
    if not (is_main and cfg.run.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
