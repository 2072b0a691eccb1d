"""One GFlowNet fine-tuning run: ``Trainer(cfg).run()``.

``run`` evaluates the initial policy, trains for ``steps`` steps (checkpointing, stopping
cleanly on SIGTERM/SIGINT), evaluates again, prints the before/after table and saves the
fine-tuned model. ``train_step`` is one optimizer step over ``grad_accum`` micro-batches:

    batch   = batches.next_batch()                batches.py: sampled or replayed, final rows
    log R   = task.log_rewards(prompt, rows)      tasks/: the reward of every prefix
    log q   = gfn_logprobs(policy, prompt, rows)  scoring.py: one teacher-forced pass
    loss    = objective.loss(log q, log R / T)    objective.py: SubTB/DB/TB/VarGrad, log Z
    engine.backward(loss); ...; engine.step()     engines/: torch or DeepSpeed ZeRO

The parts are built in ``run_setup.py``; checkpoints, resume and the exported model are in
``persistence/``, metrics files, the before/after table, the pictures and the model card in
``reporting/``, the evaluation in ``evaluation/in_training.py``, the policy for non-finite
values in ``nonfinite.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fastgfn.trainer import run_setup
from fastgfn.trainer.evaluation.in_training import evaluate
from fastgfn.trainer.model.precision import autocast
from fastgfn.trainer.nonfinite import SkipCounter, nonfinite_rows, poisoned, report_rows
from fastgfn.trainer.persistence import checkpoint, resume
from fastgfn.trainer.persistence.export import export_model, usage
from fastgfn.trainer.reporting.diagnostics import batch_diagnostics, worked_rationale_metrics
from fastgfn.trainer.reporting.metrics_log import MetricsLogger
from fastgfn.trainer.reporting.model_card import model_card
from fastgfn.trainer.reporting.plots import training_curves
from fastgfn.trainer.reporting.report import format_table, histogram
from fastgfn.trainer.scoring import gfn_logprobs
from fastgfn.trainer.signals import StopSignals


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        resume.check_run_directories(cfg)  # before the model loads
        parts = run_setup.build(cfg)
        self.rank, self.world = parts.rank, parts.world
        self.is_main = self.rank == 0
        self.tokenizer, self.task, self.answer_task = parts.tokenizer, parts.task, parts.answer_task
        self.engine, self.objective, self.batches = parts.engine, parts.objective, parts.batches
        self.buffer, self.streams = parts.buffer, parts.streams
        self.load_seconds = parts.load_seconds
        self.step = 0
        self.saved_step = None  # the step of the checkpoint this run saved or resumed last
        self.skips = SkipCounter(cfg.optimisation.max_nonfinite_steps)
        self.out = Path(cfg.run.output_dir)
        self.logger = MetricsLogger(cfg, self.out, self.is_main)

    # one step -----------------------------------------------------------------------------
    def train_step(self) -> dict:
        t0 = time.time()
        micro = [self._micro_step() for _ in range(self.cfg.optimisation.grad_accum)]
        grad_norm, skipped = self.engine.step()
        self.objective.step(skipped)
        metrics = {}  # the mean over the micro-batches that have the key (sampled-only ones)
        for k in dict.fromkeys(k for m in micro for k in m):
            values = [m[k] for m in micro if k in m]
            metrics[k] = sum(values) / len(values)
        # the step's one host read of device values: the norm and the skip flag together
        grad_norm, skipped = torch.stack([torch.as_tensor(grad_norm, dtype=torch.float32).cpu(),
                                          torch.as_tensor(skipped, dtype=torch.float32).cpu()]
                                         ).tolist()
        dt = time.time() - t0
        tokens = sum(m["rows"] * (m["length"] + 1) for m in micro)
        metrics.update(
            grad_norm=grad_norm,
            skipped=int(skipped),
            lr=self.engine.lr(),
            tokens_per_s=tokens / dt,
            step_s=dt,
            peak_memory_mb=run_setup.peak_memory_mb(self.engine.device),
            buffer=len(self.buffer),
        )
        del metrics["rows"]
        return metrics

    def _micro_step(self) -> dict:
        cfg, task, dev = self.cfg, self.task, self.engine.device
        # mixed_precision (model/precision.py); the backward runs outside
        with autocast(cfg.model.mixed_precision, dev):
            batch = self.batches.next_batch()  # final: cut at its dead ends
            dead = batch.dead
            # untempered; with a tool, at the states only (actions count, tool tokens do not)
            log_r = task.state_log_rewards(batch.prompt_index, batch.rows, batch.width,
                                           batch.states)
            n = batch.num_actions
            bad = nonfinite_rows(log_r, n)
            if bad:
                who = f" (rank {self.rank})" if self.world > 1 else ""
                print(report_rows(task, batch, bad, log_r, self.step + 1, who), flush=True)
            log_pf, log_pterm = gfn_logprobs(
                self.engine.module, task.prompt_tokens(batch.prompt_index).to(dev),
                batch.tokens.to(dev), task.termination_token_id,
                use_fused=cfg.objective.use_fused_logprobs, vocab_bias=self.batches.policy_bias,
                states=batch.states,
            )
            tempered = self.objective.tempered_log_rewards(log_r, self.step).to(dev)
            loss, flow = self.objective.loss(log_pf, log_pterm, tempered, n.to(dev), dead,
                                             batch.prompt_index)
        self.engine.backward(poisoned(loss, bool(bad)))
        final = log_r.gather(1, n[:, None]).squeeze(1)  # untempered
        self.batches.remember(batch, final.tolist())  # the buffer refuses non-finite rewards
        log_pterm = self.objective.forced_stops(log_pterm.detach(), n.to(dev), dead)
        return batch_diagnostics(cfg, batch, log_pf, log_pterm, tempered, final) | {
            "loss": float(loss.detach()),
            "log_reward": float(final.mean()),
            "length": float(n.float().mean()),
            "replayed": float(batch.replayed),
            "reward_temperature": self.objective.reward_temperature(self.step),
            "log_z": flow,
            "rows": len(batch.rows),
            "nonfinite_rows": len(bad),
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
                if cfg.evaluation.eval_before and cfg.evaluation.eval_samples > 0 and not resumed:
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
        steps = cfg.optimisation.steps
        bar = run_setup.progress_bar(cfg, self.is_main, steps, self.step, "fastgfn")
        t_train, first_step = time.time(), self.step
        results = {}
        while self.step < steps:
            m = self.train_step()
            self.step += 1
            self.skips.update(bool(m["skipped"]))
            m["skipped_steps"] = self.skips.total
            self.logger.log(self.step, m)
            if m["skipped"]:
                self.skips.check(self.step, m["grad_norm"], m["loss"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3g}", logR=f"{m['log_reward']:.2f}",
                                logZ=f"{m['log_z']:.2f}", buf=m["buffer"])
            every = cfg.evaluation.eval_every
            if every and self.step % every == 0 and self.step < steps:
                self._log_policy_metrics(bar)
            stop = signals.requested()
            if cfg.run.stop_after_steps and self.step - first_step >= cfg.run.stop_after_steps:
                stop = stop or "stop_after_steps"
            if (cfg.run.save_every and self.step % cfg.run.save_every == 0) or stop:
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
        """After the last step: the final checkpoint first, then the evaluation with its table
        and pictures, then the exported model with its model card. Should the evaluation or the
        export fail in a run that saves no checkpoints, its state is saved before the error
        propagates."""
        cfg, results, after = self.cfg, {}, None
        if cfg.run.save_every:
            self.save()
        try:
            if cfg.evaluation.eval_samples > 0:
                after = self._evaluate("after")
                results.update(before=before, after=after)
            if self.is_main:
                self._report(before, after)
            if cfg.run.save_model:
                card = model_card(cfg, steps=self.step, before=before, after=after,
                                  prompt=self.task.prompt_text(0),
                                  log_z=self.objective.log_z.value())
                export_model(self.engine, self.tokenizer, cfg.model_dir, cfg.model.lora, card)
                results["model_dir"] = str(cfg.model_dir)
        except Exception:
            self._rescue()
            raise
        if cfg.run.save_model:
            self.print(f"fine-tuned model saved to {cfg.model_dir}; load and sample it with:\n"
                       + usage(cfg.model_dir, self.task.prompt_text(0)))
        return results

    def _report(self, before: dict | None, after: dict | None) -> None:
        """Rank 0: the before/after table, the histogram, the training curves."""
        cfg = self.cfg
        if after is not None:
            print(format_table(before, after))
            if cfg.evaluation.histogram and "counts" in after:
                png = self.out / "histogram.png"
                histogram(before["counts"] if before else None, after["counts"], self.task, png)
                print(f"histogram: {png}")
        png = self.out / "training_curves.png"
        if cfg.evaluation.training_curves and training_curves(self.out / "metrics.jsonl", png,
                                                   f"{cfg.task.name}, loss={cfg.objective.loss}"):
            print(f"training curves: {png}")

    def _rescue(self) -> None:
        """A checkpoint of the trained state when the run has none of this step."""
        if self.saved_step == self.step:
            return
        try:
            path = self.save()
        except Exception as exc:  # noqa: BLE001 (the original error is the one to raise)
            self.print(f"fastgfn: saving the trained state failed too: {exc}")
            return
        self.print(f"fastgfn: the trained state is saved in {path}; fix the error below and "
                   "run again with --resume to finish (export and evaluation)")

    def _evaluate(self, when: str) -> dict:
        cfg = self.cfg
        self.print(f"evaluating the {'initial' if when == 'before' else 'fine-tuned'} policy "
                   f"on {cfg.evaluation.eval_samples} samples ...")
        bar = run_setup.progress_bar(cfg, self.is_main, cfg.evaluation.eval_samples, 0,
                                      f"eval ({when})",
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
        metrics = self.task.policy_metrics(self.engine, self.cfg.sampling.min_new_tokens)
        metrics.update(worked_rationale_metrics(self.engine, self.task,
                                                self.batches.policy_bias))
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
            "skipped_steps": self.skips.total,
        }

    def save(self) -> Path:
        """Checkpoint this step, once: a step already saved (or resumed from) is not saved
        again, so the end-of-run save never rewrites the periodic one."""
        root = self.out / "checkpoints"
        if self.saved_step == self.step:
            return root / checkpoint.checkpoint_name(self.step)
        path = checkpoint.save_checkpoint(
            self.engine, root, self.step, self.client_state(), self.streams.state(),
            self.cfg.run.keep_checkpoints, self.objective.state_dict(),
        )
        self.saved_step = self.step
        return path

    def maybe_resume(self) -> bool:
        """With ``resume``: load the newest usable checkpoint (``resume.py``)."""
        return resume.resume(self) if self.cfg.run.resume else False

    def print(self, *a) -> None:
        if self.is_main:
            print(*a, flush=True)
