"""One GFlowNet fine-tuning run: ``Trainer(cfg).run()``.

``run`` evaluates the initial policy, trains for ``steps`` steps (checkpointing, stopping
cleanly on SIGTERM/SIGINT), evaluates again, prints the before/after table and saves the
fine-tuned model. ``train_step`` is one optimizer step over ``grad_accum`` micro-batches:

    batch   = rollouts.next_batch()               rollout.py: sampled or replayed rows
    log R   = task.log_rewards(prompt, rows)      tasks/: the reward of every prefix
    log q   = gfn_logprobs(policy, prompt, rows)  scoring.py: one teacher-forced pass
    loss    = objective.loss(log q, log R / T)    objective.py: SubTB/DB/TB/VarGrad, log Z
    engine.backward(loss); ...; engine.step()     engines/: torch or DeepSpeed ZeRO

The parts are built in ``components.py``; checkpoints are ``checkpoint.py``, the exported
model ``export.py``, evaluation ``evaluation.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastgfn.trainer import checkpoint, components
from fastgfn.trainer.evaluation import evaluate
from fastgfn.trainer.export import export_model, usage
from fastgfn.trainer.metrics_log import MetricsLogger
from fastgfn.trainer.precision import autocast
from fastgfn.trainer.report import format_table, histogram
from fastgfn.trainer.scoring import gfn_logprobs
from fastgfn.trainer.signals import StopSignals


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        parts = components.build(cfg)
        self.rank, self.world = parts.rank, parts.world
        self.is_main = self.rank == 0
        self.tokenizer, self.task, self.answer_task = parts.tokenizer, parts.task, parts.answer_task
        self.engine, self.objective, self.rollouts = parts.engine, parts.objective, parts.rollouts
        self.buffer, self.streams = parts.buffer, parts.streams
        self.load_seconds = parts.load_seconds
        self.step = 0
        self.out = Path(cfg.output_dir)
        self.logger = MetricsLogger(cfg, self.out, self.is_main)

    # one step -----------------------------------------------------------------------------
    def train_step(self) -> dict:
        t0 = time.time()
        micro = [self._micro_step() for _ in range(self.cfg.grad_accum)]
        grad_norm = self.engine.step()
        self.objective.step()
        metrics = {k: sum(m[k] for m in micro) / len(micro) for k in micro[0]}
        dt = time.time() - t0
        tokens = sum(m["rows"] * (m["length"] + 1) for m in micro)
        metrics.update(
            grad_norm=grad_norm,
            lr=self.engine.lr(),
            log_z=self.objective.log_z.value(),
            tokens_per_s=tokens / dt,
            step_s=dt,
            peak_memory_mb=components.peak_memory_mb(self.engine.device),
            buffer=len(self.buffer),
        )
        del metrics["rows"]
        return metrics

    def _micro_step(self) -> dict:
        cfg, task, dev = self.cfg, self.task, self.engine.device
        with autocast(cfg, dev):  # mixed_precision (precision.py); the backward runs outside
            batch = self.rollouts.next_batch()
            dead = self.objective.cut_dead_ends(task, batch.rows, batch.lengths)
            log_r = task.log_rewards(batch.prompt_index, batch.rows, batch.width)
            temperature = self.objective.reward_temperature(self.step)
            log_pf, log_pterm = gfn_logprobs(
                self.engine.module, task.prompt_tokens(batch.prompt_index).to(dev),
                batch.tokens.to(dev), task.termination_token_id, use_fused=cfg.use_fused_logprobs,
            )
            loss = self.objective.loss(log_pf, log_pterm, (log_r / temperature).to(dev),
                                       batch.lengths.to(dev), dead)
        self.engine.backward(loss)
        final = log_r.gather(1, batch.lengths[:, None]).squeeze(1)  # untempered
        self.rollouts.remember(batch, final.tolist())
        return {
            "loss": float(loss.detach()),
            "log_reward": float(final.mean()),
            "length": float(batch.lengths.float().mean()),
            "replayed": float(batch.replayed),
            "reward_temperature": temperature,
            "rows": len(batch.rows),
        }

    # the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        resumed = self.maybe_resume()
        t_start = time.time()
        results: dict = {"load_seconds": self.load_seconds}
        before = None
        try:
            with StopSignals() as signals:
                if cfg.eval_before and cfg.eval_samples > 0 and not resumed:
                    before = self._evaluate("before")
                results.update(self._train(signals))
            if not results.get("interrupted"):
                results.update(self._finish(before))
        finally:
            self.logger.close()
        results["total_seconds"] = time.time() - t_start + self.load_seconds
        self.print(f"total time {results['total_seconds']:.0f} s (model load "
                   f"{self.load_seconds:.0f} s, training {results.get('train_seconds', 0):.0f} s)")
        if self.is_main:
            (self.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        return results

    def _train(self, signals: StopSignals) -> dict:
        cfg = self.cfg
        bar = components.progress_bar(cfg, self.is_main, cfg.steps, self.step, "fastgfn")
        t_train, first_step = time.time(), self.step
        results = {}
        while self.step < cfg.steps:
            m = self.train_step()
            self.step += 1
            self.logger.log(self.step, m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3g}", logR=f"{m['log_reward']:.2f}",
                                logZ=f"{m['log_z']:.2f}", buf=m["buffer"])
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._log_policy_metrics(bar)
            stop = signals.requested()
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
        return results

    def _finish(self, before: dict | None) -> dict:
        """After the last step: the final checkpoint, the evaluation with its table, the
        exported model."""
        cfg, results = self.cfg, {}
        if cfg.save_every:
            self.save()
        if cfg.eval_samples > 0:
            after = self._evaluate("after")
            results.update(before=before, after=after)
            if self.is_main:
                print(format_table(before, after))
                if cfg.histogram and "counts" in after:
                    png = self.out / "histogram.png"
                    histogram(before["counts"] if before else None, after["counts"], self.task,
                              png)
                    print(f"histogram: {png}")
        if cfg.save_model:
            export_model(self.engine, self.tokenizer, cfg.model_dir, cfg.lora)
            results["model_dir"] = str(cfg.model_dir)
            self.print(f"fine-tuned model saved to {cfg.model_dir}; load and sample it with:\n"
                       + usage(cfg.model_dir, self.task.prompt_text(0)))
        return results

    def _evaluate(self, when: str) -> dict:
        cfg = self.cfg
        self.print(f"evaluating the {'initial' if when == 'before' else 'fine-tuned'} policy "
                   f"on {cfg.eval_samples} samples ...")
        bar = components.progress_bar(cfg, self.is_main, cfg.eval_samples, 0, f"eval ({when})",
                                      unit="sample")
        try:
            metrics = evaluate(self.engine, self.task, cfg, self.streams.eval_generator,
                               progress=(lambda n: bar.update(n * self.world)) if bar else None,
                               answer_task=self.answer_task)
        finally:
            if bar is not None:
                bar.close()
        self.logger.log_prefixed(self.step, f"eval_{when}", metrics)
        return metrics

    def _log_policy_metrics(self, bar) -> None:
        metrics = self.task.policy_metrics(self.engine, self.cfg.min_new_tokens)
        if metrics:
            self.logger.log(self.step, metrics)
            if bar is not None:
                bar.write(f"step {self.step}: {json.dumps(metrics)}")

    # checkpoints --------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {
            "step": self.step,
            "buffer": self.buffer.state_dict(),
            "log_z": self.objective.log_z.value(),
            "reward_temperature": self.objective.reward_temperature(self.step),
            "config": self.cfg.to_dict(),
            "world_size": self.world,
        }

    def save(self) -> Path:
        return checkpoint.save_checkpoint(
            self.engine, self.out / "checkpoints", self.step, self.client_state(),
            self.streams.state(), self.cfg.keep_checkpoints, self.objective.state_dict(),
        )

    def maybe_resume(self) -> bool:
        if not self.cfg.resume:
            return False
        root = self.out / "checkpoints"
        path = checkpoint.latest_checkpoint(root)
        if path is None:
            self.print(f"resume: no checkpoint under {root}; starting fresh")
            return False
        client, rng, objective = checkpoint.load_checkpoint(self.engine, path)
        self.step = int(client["step"])
        self.buffer.load_state_dict(client["buffer"])
        self.objective.load_state_dict(objective)
        saved_world = int(client.get("world_size", self.world))
        self.streams.restore(rng, self.step, self.rank, fresh=self.rank >= saved_world)
        if saved_world != self.world:
            self.print(f"resume: checkpoint of {saved_world} process(es) loaded in {self.world}")
        self.print(f"resumed from {path} at step {self.step}")
        return True

    def print(self, *a) -> None:
        if self.is_main:
            print(*a, flush=True)
