"""fastgfn training entry point.

    deepspeed [--num_gpus K] fastgfn/train.py --config CONFIG.yaml \
        [--deepspeed_config ds.json] [key=value ...]
    python -m fastgfn.train [--config CONFIG.yaml] [key=value ...]      # one plain process
    fastgfn-train ...                                                    # console script

With no arguments it runs the embedded default: full-parameter GFlowNet fine-tuning of the
packaged SmolLM2-135M-Instruct on the random-number task, on CPU, with a before/after table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: `deepspeed fastgfn/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastgfn.config import REWARD_LM_TASKS, Config, ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="YAML config (default: the embedded default run)")
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=None,
        help="DeepSpeed JSON config (ZeRO-2/3)",
    )
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the DeepSpeed launcher (LOCAL_RANK is also read)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def build_config(args) -> Config:
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"deepspeed_config={args.deepspeed_config}")
    if args.resume:
        overrides.append("resume=true")
    return load_config(args.config, overrides)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """Rank 0 only: JSONL file and TensorBoard (when installed)."""

    def __init__(self, cfg, out: Path, active: bool):
        self.active = active
        self.fh = None
        self.tb = None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.fh = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.fh:
            self.fh.close()
        if self.tb:
            self.tb.close()


def _resolve_sample_dtype(requested: str, model, zero_stage: int) -> str:
    """'auto': a bf16 sampling replica for an fp32 policy on a CPU with native bf16 matmuls
    (decoding reads half the bytes; measured 1.8 s vs 3.2 s for 30 tokens of SmolLM2 at batch
    16 on the project's CPU), otherwise sample with the policy itself."""
    if requested != "auto":
        return requested
    param = next(model.parameters())
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if param.device.type == "cpu" and param.dtype == torch.float32 and native_bf16:
        return "bfloat16" if zero_stage != 3 else "model"
    return "model"


# Answer accuracy (reasoning task) scores every distinct answer after every rationale: a
# classification label set, not free-form answers such as the arithmetic task's numbers.
MAX_ANSWER_CHOICES = 32


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.distributed = cfg.deepspeed_config is not None or (
            "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
        )
        ds_config = None
        if self.distributed:
            from fastgfn import engine as eng

            eng.init_distributed()
            ds_config = eng.load_ds_config(cfg) if cfg.deepspeed_config else _default_ds(cfg)
        from fastgfn.engine import (
            DeepSpeedEngine,
            TorchEngine,
            rank,
            world_size,
            zero3_init_context,
        )
        from fastgfn.models import load_model
        from fastgfn.replay import ReplayBuffer
        from fastgfn.tasks import build_task

        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        data_seed = cfg.seed if cfg.same_data_all_ranks else cfg.seed + 1000003 * self.rank
        self.py_rng = random.Random(data_seed)
        t0 = time.time()
        if ds_config is not None and cfg.model != "tiny":
            # ZeRO-3: build the model already partitioned. (A tiny test model is built whole
            # so its initial weights do not depend on the stage; DeepSpeed partitions it.)
            with zero3_init_context(ds_config):
                model, self.tokenizer = load_model(cfg)
        else:
            model, self.tokenizer = load_model(cfg)
        self.load_seconds = time.time() - t0
        task_kwargs = {}
        self.reward_engine = None
        if cfg.task in REWARD_LM_TASKS:
            if cfg.lora and cfg.reward_model == "initial":
                # the frozen reward is the same model with its adapters disabled
                task_kwargs = {"reward_model": model, "adapters_off": True}
            else:  # a frozen copy of the initial policy
                task_kwargs = {"reward_model": self._frozen_reward_model(model, ds_config)}
        self.task = build_task(cfg, self.tokenizer, **task_kwargs)
        self.answer_task = None  # reasoning: the questions of the answer-accuracy evaluation
        if cfg.task == "reasoning" and cfg.eval_rationales > 0 and cfg.eval_samples > 0:
            self.answer_task = self._answer_task(task_kwargs)
        model.train()
        # Dropout would make the teacher-forced pass disagree with sampling; turn it off.
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if ds_config is not None:
            self.engine = DeepSpeedEngine(model, cfg, ds_config)
        else:
            self.engine = TorchEngine(model, cfg)
        stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
        sample_dtype = _resolve_sample_dtype(cfg.sample_dtype, self.engine.module, stage)
        self.sampling_replica = None
        if sample_dtype != "model":
            from fastgfn.sampler import SamplingReplica

            if stage == 3:
                raise ValueError("sample_dtype: a sampling replica needs whole weights, not ZeRO-3")
            replica_dtype = getattr(torch, sample_dtype)
            self.sampling_replica = SamplingReplica(
                self.engine.module, replica_dtype, compile=cfg.compile_sampler,
                batch_hint=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
            )
        elif cfg.compile_sampler:
            raise ValueError(
                "compile_sampler: needs a sampling replica (sample_dtype=bfloat16, float16 or "
                f"float32); sample_dtype={cfg.sample_dtype!r} samples with the policy itself"
            )
        # Sampling generators live on the model's device (no host round trip per token).
        dev = self.engine.device
        self.generator = torch.Generator(device=dev).manual_seed(data_seed)
        self.eval_generator = torch.Generator(device=dev).manual_seed(
            cfg.seed + 7 + 1000003 * self.rank
        )
        self.buffer = ReplayBuffer(cfg.replay_size, cfg.replay_min_distance)
        self.step = 0
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.logger = MetricsLogger(cfg, self.out, self.is_main)
        self._stop_signal = None
        self._log_z_set = False

    def _frozen_reward_model(self, model, ds_config):
        """The frozen reward LM: a separate copy of the initial policy (``reward_model:
        initial``) or another model with the policy's vocabulary (``reward_model: <name, dir or
        .gguf>``, loaded in the policy's dtype, never with LoRA). Under ZeRO-3 it is partitioned
        like the policy (each rank holds 1/world of its weights) and runs through an
        optimizer-less DeepSpeed engine that gathers each layer for its forward; otherwise it is
        a plain replica on every rank."""
        import contextlib
        import copy
        import dataclasses

        from fastgfn.engine import frozen_zero3_module, zero3_init_context
        from fastgfn.models import load_model

        stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
        other = self.cfg.reward_model != "initial"
        # A whole policy (any stage but 3, or the tiny test model, built whole) is copied; a
        # ZeRO-3 policy is already partitioned, so the initial weights are loaded again.
        if not other and (stage != 3 or self.cfg.model == "tiny"):
            reward = copy.deepcopy(model)
        else:
            load_cfg = self.cfg
            if other:
                load_cfg = dataclasses.replace(self.cfg, model=self.cfg.reward_model,
                                               gguf_file=None, lora=False)
            partitioned = zero3_init_context(ds_config) if stage == 3 else contextlib.nullcontext()
            with partitioned:
                reward, _ = load_model(load_cfg, tokenizer=False)
        self._check_reward_vocab(reward).eval().requires_grad_(False)
        if stage != 3:
            return reward
        self.reward_engine = frozen_zero3_module(reward, ds_config)
        return self.reward_engine.module

    def _answer_task(self, task_kwargs):
        """The reasoning questions scored for answer accuracy (``eval_data_path``, else the
        training questions); the choices are every answer seen in either set."""
        import dataclasses

        from fastgfn.tasks.reasoning import LatentReasoningTask

        task = self.task
        if self.cfg.eval_data_path:
            eval_cfg = dataclasses.replace(self.cfg, data_path=self.cfg.eval_data_path)
            task = LatentReasoningTask.from_config(eval_cfg, self.tokenizer, **task_kwargs)
        choices = sorted(set(self.task.answers) | set(task.answers))
        if len(choices) > MAX_ANSWER_CHOICES:
            raise ValueError(
                f"eval_rationales: answer accuracy scores every distinct answer and needs at "
                f"most {MAX_ANSWER_CHOICES}, found {len(choices)}; set eval_rationales=0"
            )
        task.choices = choices
        return task

    def _check_reward_vocab(self, reward):
        """A reward LM scores the policy's token ids: its vocabulary must be the policy's."""
        want = len(self.tokenizer) if self.tokenizer is not None else None
        got = int(reward.config.vocab_size)
        if want is not None and got < want:
            raise ValueError(
                f"reward_model: {self.cfg.reward_model!r} has a vocabulary of {got} tokens, "
                f"fewer than the policy's tokenizer ({want}); the reward LM must share the "
                "policy's tokenizer"
            )
        return reward

    # ------------------------------------------------------------------------------------
    def reward_temperature(self, step: int) -> float:
        cfg = self.cfg
        if cfg.reward_temperature_end is None or cfg.reward_temperature_steps <= 0:
            return cfg.reward_temperature
        f = min(1.0, step / cfg.reward_temperature_steps)
        return cfg.reward_temperature + f * (cfg.reward_temperature_end - cfg.reward_temperature)

    def get_batch(self, prompt_index: int):
        from fastgfn.replay import ReplayBuffer
        from fastgfn.sampler import draw_temperatures, sample

        cfg, task = self.cfg, self.task
        pad = _pad(task)
        use_replay = self.py_rng.random() < cfg.replay_prob and self.buffer.size(prompt_index) > 0
        if self.world > 1:
            # Sampling runs collectives (the stop flag, ZeRO-3 gathers) and replay none: all
            # ranks replay or all sample, or a rank that samples waits forever.
            flag = torch.tensor([int(use_replay)], device=self.engine.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            use_replay = bool(flag.item())
        if use_replay:
            rows = self.buffer.sample(prompt_index, cfg.batch_size, self.py_rng)
            tokens, lengths = ReplayBuffer.to_tensors(rows, pad)
            return tokens, lengths, rows, True
        temps = draw_temperatures(
            cfg.batch_size,
            prob=cfg.explore_prob,
            low=cfg.explore_temp_low,
            high=cfg.explore_temp_high,
            generator=self.generator,
        )
        bias = None
        if cfg.explore_vocab_prob > 0 and hasattr(task, "allowed_token_ids"):
            # Restricted exploration: some rows may only use the task's allowed tokens.
            V = self.engine.module.config.vocab_size
            dev = self.engine.device
            allowed = torch.full((V,), float("-inf"), device=dev)
            allowed[task.allowed_token_ids()] = 0.0
            rows_r = (
                torch.rand(cfg.batch_size, generator=self.generator, device=dev)
                < cfg.explore_vocab_prob
            )
            bias = torch.where(rows_r[:, None], allowed[None], torch.zeros(1, V, device=dev))
        model = self.engine.module
        model.eval()
        behaviour = model if self.sampling_replica is None else self.sampling_replica.sync(model)
        r = sample(
            behaviour,
            task.prompt_tokens(prompt_index).to(self.engine.device),
            cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            termination_token_id=task.termination_token_id,
            temperatures=temps,
            vocab_bias=bias,
            pad_token_id=pad,
            generator=self.generator,
            param_context=self.engine.param_context(),
        )
        model.train()
        return r.tokens.cpu(), r.lengths.cpu(), r.rows(), False

    def compute_loss(self, log_pf, log_pterm, log_r, lengths):
        import fastgfn

        cfg = self.cfg
        if cfg.loss == "subtb":
            return fastgfn.subtb_loss(log_pf, log_pterm, log_r, lengths, lam=cfg.subtb_lambda)
        if cfg.loss == "db":
            return fastgfn.db_loss(log_pf, log_pterm, log_r, lengths)
        if cfg.loss == "tb":
            return fastgfn.tb_loss(log_pf, log_pterm, log_r, lengths, self.engine.log_z.param)
        return fastgfn.vargrad_loss(log_pf, log_pterm, log_r, lengths)

    def _set_initial_log_z(self, log_pf, log_pterm, log_r, lengths) -> None:
        """log Z from the first (on-policy) batch: the mean over its rows of
        ``log R(z) - log q(z)`` with ``log q(z) = sum_t log_pf + log_pterm(end)``, which is the
        log Z that minimises the squared TB residual of the initial policy, averaged over the
        ranks. Far-off initial values (rewards of -50 nats against log Z = 0) otherwise let the
        policy balance the flows by never terminating instead of by moving log Z."""
        import fastgfn

        with torch.no_grad():
            ratio = fastgfn.trajectory_log_ratio(log_pf, log_pterm, log_r, lengths)  # log q/R
            value = self.engine.log_z.reset(-ratio.mean())
        self._log_z_set = True
        if self.is_main:
            print(f"fastgfn: log Z initialised to {value:.3f} from the first batch")

    def train_step(self) -> dict:
        from fastgfn.scoring import gfn_logprobs

        cfg, task, dev = self.cfg, self.task, self.engine.device
        t0 = time.time()
        metrics = {}
        for _ in range(cfg.grad_accum):
            prompt_index = self.py_rng.randrange(task.num_prompts())
            tokens, lengths, rows, replayed = self.get_batch(prompt_index)
            dead = torch.zeros(len(rows), dtype=torch.bool)
            if cfg.dead_ends and hasattr(task, "dead_index"):
                for b, row in enumerate(rows):
                    t = task.dead_index(row)
                    if t is not None:
                        rows[b] = row[:t]
                        lengths[b] = t
                        dead[b] = True
            T = tokens.shape[1]
            log_r_raw = task.log_rewards(prompt_index, rows, T)
            rt = self.reward_temperature(self.step)
            log_r = (log_r_raw / rt).to(dev)
            log_pf, log_pterm = gfn_logprobs(
                self.engine.module,
                task.prompt_tokens(prompt_index).to(dev),
                tokens.to(dev),
                task.termination_token_id,
                use_fused=cfg.use_fused_logprobs,
            )
            log_pf, log_pterm = log_pf.float(), log_pterm.float()
            if dead.any():
                # a dead end is a forced stop: P(STOP | dead state) = 1
                at_end = torch.arange(T + 1)[None] == lengths[:, None]
                log_pterm = log_pterm.masked_fill((at_end & dead[:, None]).to(dev), 0.0)
            if cfg.log_z_auto_init and self.step == 0 and not self._log_z_set:
                self._set_initial_log_z(log_pf, log_pterm, log_r, lengths.to(dev))
            if cfg.min_new_tokens >= 1 and cfg.loss in ("subtb", "db"):
                # s_0 cannot terminate: its flow R(s_0)/P(STOP|s_0) is the learned log Z
                # (log_r[0] - log_pterm[0] = log Z).
                log_r = log_r.clone()
                log_r[:, 0] = 0.0
                log_pterm = torch.cat(
                    [
                        (-self.engine.log_z.param).expand(log_pterm.shape[0], 1).to(log_pterm),
                        log_pterm[:, 1:],
                    ],
                    dim=1,
                )
            loss = self.compute_loss(log_pf, log_pterm, log_r, lengths.to(dev))
            self.engine.backward(loss)
            term_lr = log_r_raw.gather(1, lengths[:, None]).squeeze(1)
            if not replayed:
                self.buffer.add_batch(prompt_index, rows, term_lr.tolist())
            metrics = {
                "loss": float(loss.detach()),
                "log_reward": float(term_lr.mean()),
                "length": float(lengths.float().mean()),
                "replayed": int(replayed),
                "reward_temperature": rt,
            }
        grad_norm = self.engine.step()
        dt = time.time() - t0
        metrics.update(
            {
                "grad_norm": grad_norm,
                "lr": self.engine.lr(),
                "log_z": float(self.engine.log_z.param.detach()),
                "tokens_per_s": cfg.grad_accum * cfg.batch_size * float(metrics["length"] + 1) / dt,
                "step_s": dt,
                "peak_memory_mb": peak_memory_mb(dev),
                "buffer": len(self.buffer),
            }
        )
        return metrics

    # checkpoints ----------------------------------------------------------------------
    def client_state(self) -> dict:
        return {
            "step": self.step,
            "buffer": self.buffer.state_dict(),
            "log_z": float(self.engine.log_z.param.detach()),
            "reward_temperature": self.reward_temperature(self.step),
            "config": self.cfg.to_dict(),
            "world_size": self.world,
        }

    def save(self) -> Path:
        from fastgfn.checkpoint import rng_state, save_checkpoint

        return save_checkpoint(
            self.engine,
            self.ckpt_root,
            self.step,
            self.client_state(),
            rng_state(self.generator, self.py_rng),
            self.cfg.keep_checkpoints,
        )

    def maybe_resume(self) -> bool:
        from fastgfn.checkpoint import latest_checkpoint, load_checkpoint, set_rng_state

        if not self.cfg.resume:
            return False
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            self.print(f"resume: no checkpoint under {self.ckpt_root}; starting fresh")
            return False
        client, rng = load_checkpoint(self.engine, path)
        self.step = int(client["step"])
        self.buffer.load_state_dict(client["buffer"])
        set_rng_state(rng, self.generator, self.py_rng)
        saved_world = int(client.get("world_size", self.world))
        if self.rank >= saved_world and not self.cfg.same_data_all_ranks:
            # A rank the saving run did not have got rank 0's RNG state; give it its own
            # stream (deterministic in seed, rank and step) so ranks do not sample alike.
            seed = self.cfg.seed + 1000003 * self.rank + 7919 * self.step
            self.generator.manual_seed(seed)
            self.py_rng.seed(seed)
        if saved_world != self.world:
            self.print(f"resume: checkpoint of {saved_world} process(es) loaded in {self.world}")
        self.print(f"resumed from {path} at step {self.step}")
        return True

    def export(self, directory: str) -> None:
        """save_pretrained to a Hugging Face directory (ZeRO-3 weights gathered)."""
        with self.engine.full_parameters() as model:
            if self.is_main:
                from fastgfn.models import exportable

                m = exportable(model.merge_and_unload() if self.cfg.lora else model)
                m.save_pretrained(directory, safe_serialization=True)
                if hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(directory)
        if self.world > 1:
            torch.distributed.barrier()

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    # ------------------------------------------------------------------------------------
    def run(self) -> dict:
        from fastgfn.evaluate import format_table, histogram

        cfg = self.cfg
        resumed = self.maybe_resume()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.time()
        before = None
        results: dict = {"load_seconds": self.load_seconds}
        try:
            if cfg.eval_before and cfg.eval_samples > 0 and not resumed:
                self.print(f"evaluating the initial policy on {cfg.eval_samples} samples ...")
                before = self._evaluate("eval (before)")
                self.logger.log(
                    self.step,
                    {
                        f"eval_before/{k}": v
                        for k, v in before.items()
                        if isinstance(v, (int, float))
                    },
                )
            bar = None
            if self.is_main and cfg.progress:
                from tqdm import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, desc="fastgfn", dynamic_ncols=True)
            t_train = time.time()
            first_step = self.step
            while self.step < cfg.steps:
                m = self.train_step()
                self.step += 1
                self.logger.log(self.step, m)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{m['loss']:.3g}",
                        logR=f"{m['log_reward']:.2f}",
                        logZ=f"{m['log_z']:.2f}",
                        buf=m["buffer"],
                    )
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    ex = self._quick_eval()
                    if ex:
                        self.logger.log(self.step, ex)
                        if bar is not None:
                            bar.write(f"step {self.step}: {json.dumps(ex)}")
                stop = self._signal_flag()
                if cfg.stop_after_steps and self.step - first_step >= cfg.stop_after_steps:
                    stop = stop or "stop_after_steps"
                if (cfg.save_every and self.step % cfg.save_every == 0) or stop:
                    path = self.save()
                    if stop:
                        self.print(f"\nstopping ({stop}): saved {path}; exiting")
                        results["interrupted"] = True
                        break
            if bar is not None:
                bar.close()
            results["train_seconds"] = time.time() - t_train
            if results.get("interrupted"):
                return results
            if cfg.save_every:
                self.save()
            after = None
            if cfg.eval_samples > 0:
                self.print(f"evaluating the fine-tuned policy on {cfg.eval_samples} samples ...")
                after = self._evaluate("eval (after)")
                self.logger.log(
                    self.step,
                    {f"eval_after/{k}": v for k, v in after.items() if isinstance(v, (int, float))},
                )
                results.update(before=before, after=after)
                if self.is_main:
                    print(format_table(before, after))
                    if cfg.histogram and "counts" in after:
                        png = self.out / "histogram.png"
                        histogram(
                            before["counts"] if before else None, after["counts"], self.task, png
                        )
                        print(f"histogram: {png}")
            if cfg.export_dir:
                self.export(cfg.export_dir)
                self.print(f"exported to {cfg.export_dir}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.logger.close()
        results["total_seconds"] = time.time() - t_start + self.load_seconds
        self.print(
            f"total time {results['total_seconds']:.0f} s "
            f"(model load {self.load_seconds:.0f} s, "
            f"training {results.get('train_seconds', 0):.0f} s)"
        )
        if self.is_main:
            with open(self.out / "results.json", "w") as fh:
                json.dump({k: v for k, v in results.items()}, fh, indent=1, default=str)
        return results

    def _evaluate(self, desc: str) -> dict:
        from fastgfn.evaluate import evaluate

        bar = None
        if self.is_main and self.cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.eval_samples, desc=desc, unit="sample", dynamic_ncols=True)
        try:
            return evaluate(
                self.engine,
                self.task,
                self.cfg,
                self.eval_generator,
                progress=(lambda n: bar.update(n * self.world)) if bar else None,
                answer_task=self.answer_task,
            )
        finally:
            if bar is not None:
                bar.close()

    def _signal_flag(self):
        flag = torch.tensor(0 if self._stop_signal is None else int(self._stop_signal))
        if self.world > 1:  # on the engine's device: nccl reduces CUDA tensors only
            flag = flag.to(self.engine.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag) or None

    def _quick_eval(self) -> dict:
        if getattr(self.task, "name", "") != "random_number":
            return {}
        from fastgfn.evaluate import exact_number_distribution

        return exact_number_distribution(self.engine, self.task, self.cfg.min_new_tokens)


def _pad(task) -> int:
    pad = getattr(task.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _default_ds(cfg) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": 0},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"fastgfn: config error: {exc}", file=sys.stderr)
        return 2
    Trainer(cfg).run()
    from fastgfn.engine import shutdown_distributed

    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
