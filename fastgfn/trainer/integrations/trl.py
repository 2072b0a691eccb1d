"""A GFlowNet trainer for TRL (``trl==1.16.0``): ``GFNTrainer`` and ``GFNConfig``.

    from datasets import Dataset
    from fastgfn.trainer.integrations.trl import GFNConfig, GFNTrainer

    def valid_number(completions, **kwargs):           # one log-reward per completion
        return [0.0 if c.isdigit() and int(c) <= 100 else -20.0 for c in completions]

    args = GFNConfig(output_dir="runs/trl", loss="subtb", termination=",", max_steps=200)
    trainer = GFNTrainer("HuggingFaceTB/SmolLM2-135M", valid_number, args=args,
                         train_dataset=Dataset.from_dict({"prompt": ["A random integer: "] * 64}))
    trainer.train()

It is a TRL online trainer built on TRL's own base class (``trl.trainer.base_trainer.
_BaseTrainer``, the ``transformers.Trainer`` subclass that ``GRPOTrainer`` and ``RLOOTrainer``
extend) and follows their conventions: prompts are the ``"prompt"`` column of a
``datasets.Dataset`` (plain text or conversational), each is repeated ``num_generations``
times by TRL's ``RepeatSampler``, reward functions are plain callables on completions
(``trl_rewards.py``), accelerate/DeepSpeed run underneath, and a checkpoint carries TRL's model
card. Inside, a step is fastgfn's:

1. **sample** each group with ``fastgfn.trainer.sampling.sampler.sample`` (the prompt runs
   once, its KV cache shared by the group), tempered per row (``explore_*``), optionally
   restricted to ``explore_vocab_ids``, or **replay** the group from fastgfn's
   ``ReplayBuffer`` (``replay_prob``);
2. **reward** the completions (and for SubTB/DB every prefix) with the reward functions: their
   weighted sum is the log-reward, divided by the reward temperature;
3. **score** ``log_pf``/``log_pterm`` with ``fastgfn.causal_lm_gfn_logprobs`` (the lm_head
   fused with the log-softmax) in one pass through the wrapped model's forward, so DDP and
   DeepSpeed see a normal forward;
4. **loss**: ``fastgfn.vargrad_loss`` per prompt group, or the engine's ``Objective``
   (``trl_objective.py``: s0's flow from the policy with several prompts, else a learned log Z
   stepped by its own Adam after each optimizer step).

The trainer sends no telemetry.
"""

from __future__ import annotations

import json
import os
import random
import textwrap
import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler, identity

import fastgfn
from fastgfn.lm_logprobs import causal_lm_gfn_logprobs
from fastgfn.trainer.engines.distributed import rank_seed
from fastgfn.trainer.integrations import trl_rewards
from fastgfn.trainer.integrations.trl_config import (
    PREFIX_LOSSES,
    GFNConfig,
    check_dataset,
    objective_config,
)
from fastgfn.trainer.model.loading import disable_dropout, eval_mode
from fastgfn.trainer.objective import Objective
from fastgfn.trainer.replay import ReplayBuffer
from fastgfn.trainer.sampling.policy import (
    PolicyActions,
    choose_replay,
    restricted_vocabulary,
    sample_policy,
)
from fastgfn.trainer.sampling.sampler import draw_temperatures
from fastgfn.trainer.tasks.base import termination_token

__all__ = ["GFNConfig", "GFNTrainer", "SUPPORTED_TRL"]

SUPPORTED_TRL = "1.16.0"
STATE_FILE = "fastgfn_state.json"


def _add_gfn_forward(model) -> None:
    """``model(gfn_inputs=...)`` returns ``(log_pf, log_pterm)`` from
    ``causal_lm_gfn_logprobs``; any other call is the model's own forward. The loss calls the
    *wrapped* model this way, so DDP and DeepSpeed hooks run as for any forward."""
    original = model.forward
    body = model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(*args, gfn_inputs=None, **kwargs):
        if gfn_inputs is None:
            return original(*args, **kwargs)
        return causal_lm_gfn_logprobs(body, **gfn_inputs)

    model.forward = forward


class _ObjectiveStep(TrainerCallback):
    """log Z's own Adam step, after each optimizer step."""

    def __init__(self, objective: Objective):
        self.objective = objective

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.objective.step()


class GFNTrainer(_BaseTrainer):
    """GFlowNet fine-tuning in TRL's shape (see the module docstring)."""

    loss_is_scaled_for_ga = False  # a mean per micro-batch: transformers divides by the steps
    _tag_names = ["trl", "gflownet", "fastgfn"]
    _name = "GFlowNet"
    _paper = {
        "title": "Amortizing intractable inference in large language models",
        "id": "2310.04363",
        "citation": textwrap.dedent("""\
            @inproceedings{hu2024amortizing,
                title     = {Amortizing intractable inference in large language models},
                author    = {Edward J. Hu and Moksh Jain and Eric Elmoznino and Younesse Kaddar
                             and Guillaume Lajoie and Yoshua Bengio and Nikolay Malkin},
                booktitle = {The Twelfth International Conference on Learning Representations},
                year      = 2024,
            }"""),
    }

    def __init__(self, model, reward_funcs, args: GFNConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None,
                 optimizers=(None, None), peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GFNConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-GFN")
        if not isinstance(args, GFNConfig):
            raise TypeError(f"args: must be a GFNConfig, got {type(args).__name__}")
        model, processing_class = self._model_and_tokenizer(model, processing_class, args)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.reward_funcs, self.reward_func_names, self.reward_weights = \
            trl_rewards.check_reward_funcs(reward_funcs, args.reward_weights)
        check_dataset("train_dataset", train_dataset)
        if eval_dataset is not None:
            check_dataset("eval_dataset", eval_dataset)
        self.termination_token_id = termination_token(processing_class, args.termination or "eos")
        self.pad_token_id = int(processing_class.pad_token_id)
        if args.disable_dropout:
            disable_dropout(model)
        _add_gfn_forward(model)
        super().__init__(model=model, args=args, data_collator=identity,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        device = self.accelerator.device
        self.objective = Objective(objective_config(args, train_dataset), device)
        self.buffer = ReplayBuffer(args.replay_size, args.replay_min_distance)
        seed = rank_seed(args.seed, self.accelerator.process_index)
        self._py_rng = random.Random(seed)
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._prompt_keys: dict[tuple, int] = {}
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._step_start = None
        self.add_callback(_ObjectiveStep(self.objective))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    @staticmethod
    def _model_and_tokenizer(model, processing_class, args):
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        return model, processing_class

    def _send_telemetry(self):
        return  # fastgfn sends none

    # data: TRL's sampler, the dataset rows kept whole ---------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        G = self.args.num_generations
        return RepeatSampler(data_source=dataset, mini_repeat_count=G,
                             batch_size=self.args.per_device_train_batch_size
                             * self.accelerator.num_processes // G,
                             shuffle=self.args.shuffle_dataset, seed=self.args.seed)

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(data_source=eval_dataset, mini_repeat_count=self.args.num_generations,
                             shuffle=False)

    def _groups(self, inputs: list[dict]) -> list[list[dict]]:
        G = self.args.num_generations
        if len(inputs) % G:
            raise ValueError(f"a batch of {len(inputs)} rows is not whole groups of "
                             f"num_generations={G}")
        groups = [inputs[i:i + G] for i in range(0, len(inputs), G)]
        for g in groups:
            if any(row["prompt"] != g[0]["prompt"] for row in g):
                raise ValueError("a group of num_generations rows mixes prompts: the train "
                                 "sampler must repeat each prompt num_generations times")
        return groups

    def _prompt_ids(self, prompt) -> list[int]:
        tok = self.processing_class
        if is_conversational({"prompt": prompt}):
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
        else:
            ids = tok(text=prompt)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
        return [int(i) for i in ids]

    # one batch: sample or replay, reward, pack ---------------------------------------------
    def _prepare_inputs(self, inputs: list[dict]) -> dict:
        training = self.model.training
        prompts, rows, replayed = [], [], []
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped, \
                eval_mode(unwrapped) as policy:
            for g in self._groups(inputs):
                ids = self._prompt_ids(g[0]["prompt"])
                key = self._prompt_keys.setdefault(tuple(ids), len(self._prompt_keys))
                group, was_replayed = self._group_rows(policy, ids, key, training)
                prompts += [ids] * len(g)
                rows += group
                replayed += [(key, was_replayed)] * len(g)
        log_r = self._log_rewards(inputs, rows)
        batch = self._pack(prompts, rows, log_r)
        final = log_r.gather(1, batch["lengths"][:, None].cpu()).squeeze(1)
        if training:
            for b, (key, was_replayed) in enumerate(replayed):
                if not was_replayed:
                    self.buffer.add(key, rows[b], float(final[b]))
        mode = "train" if training else "eval"
        self._metrics[mode]["log_reward"].append(float(final.mean()))
        self._metrics[mode]["length"].append(float(batch["lengths"].float().mean()))
        self._metrics[mode]["replayed"].append(sum(r for _, r in replayed) / len(replayed))
        return batch

    def _group_rows(self, policy, prompt_ids, key, training) -> tuple[list[list[int]], bool]:
        """One group: replayed from the buffer, or sampled from the behaviour policy."""
        args, G = self.args, self.args.num_generations
        if training and choose_replay(self._py_rng, args.replay_prob, self.buffer.size(key) > 0,
                                      self.accelerator.num_processes > 1):
            return self.buffer.sample(key, G, self._py_rng), True
        device = self.accelerator.device
        temps = draw_temperatures(G, prob=args.explore_prob if training else 0.0,
                                  low=args.explore_temp_low, high=args.explore_temp_high,
                                  generator=self._generator)
        r = sample_policy(policy, torch.tensor(prompt_ids, device=device), G,
                          PolicyActions(self.termination_token_id, self.pad_token_id),
                          max_new_tokens=args.max_completion_length,
                          min_new_tokens=args.min_completion_length, temperatures=temps,
                          vocab_bias=self._vocab_bias(policy, G) if training else None,
                          generator=self._generator)
        return r.rows(), False

    def _vocab_bias(self, policy, G: int) -> torch.Tensor | None:
        """0 for every token, or -inf outside ``explore_vocab_ids`` (and the termination
        token) for a fraction ``explore_vocab_prob`` of the rows."""
        ids, prob = self.args.explore_vocab_ids, self.args.explore_vocab_prob
        if not ids or prob == 0:
            return None
        return restricted_vocabulary(G, [*ids, self.termination_token_id], prob,
                                     policy.config.get_text_config().vocab_size,
                                     self._generator, self.accelerator.device)

    def _log_rewards(self, inputs: list[dict], rows: list[list[int]]) -> torch.Tensor:
        """``[B, T + 1]`` untempered log-rewards (every prefix for SubTB/DB, else the end)."""
        flat, where = trl_rewards.prefixes(rows, self.args.loss in PREFIX_LOSSES)
        prompts = [inputs[b]["prompt"] for b, _ in where]
        texts = self.processing_class.batch_decode(flat, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        columns = {k: [inputs[b][k] for b, _ in where] for k in inputs[0] if k != "prompt"}
        values = trl_rewards.log_rewards(
            self.reward_funcs, self.reward_func_names, self.reward_weights, prompts=prompts,
            completions=texts, completion_ids=flat, columns=columns, trainer_state=self.state,
            log_metric=self._log_metric)
        width = max(1, max(len(r) for r in rows))
        return trl_rewards.scatter(values, where, len(rows), width)

    def _log_metric(self, name: str, value: float) -> None:
        self._metrics["train" if self.model.training else "eval"][name].append(float(value))

    def _pack(self, prompts: list[list[int]], rows: list[list[int]], log_r) -> dict:
        """Prompts left-padded to one length P, completions right-padded after them."""
        B, P, T = len(rows), max(len(p) for p in prompts), log_r.shape[1] - 1
        input_ids = torch.full((B, P + T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, P + T, dtype=torch.long)
        for b, (p, r) in enumerate(zip(prompts, rows)):
            input_ids[b, P - len(p):P] = torch.tensor(p)
            input_ids[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, P - len(p):] = 1
        group_ids = torch.arange(B) // self.args.num_generations
        device = self.accelerator.device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                "prompt_len": P, "lengths": torch.tensor([len(r) for r in rows], device=device),
                "log_r": log_r.to(device), "group_ids": group_ids.to(device)}

    # the loss -------------------------------------------------------------------------------
    def gfn_logprobs(self, model, inputs: dict):
        """``(log_pf, log_pterm)`` of a packed batch through ``model``'s (wrapped) forward."""
        return model(gfn_inputs=dict(
            input_ids=inputs["input_ids"], prompt_len=inputs["prompt_len"],
            termination_token_id=self.termination_token_id,
            attention_mask=inputs["attention_mask"], fused=self.args.use_fused_logprobs))

    def gfn_loss(self, log_pf, log_pterm, log_r, lengths, group_ids) -> torch.Tensor:
        """The configured loss of a scored batch; ``log_r`` already tempered; the stop of a
        row at ``max_completion_length`` is forced (``Objective.forced_stops``)."""
        dead = torch.zeros(lengths.shape[0], dtype=torch.bool)
        if self.args.loss == "vargrad":
            log_pterm = self.objective.forced_stops(log_pterm.float(), lengths, dead)
            return fastgfn.vargrad_loss(log_pf.float(), log_pterm, log_r, lengths, group_ids)
        return self.objective.loss(log_pf, log_pterm, log_r, lengths, dead)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GFNTrainer does not return outputs")
        log_pf, log_pterm = self.gfn_logprobs(model, inputs)
        step = self.state.global_step
        temperature = self.objective.reward_temperature(step)
        loss = self.gfn_loss(log_pf, log_pterm,
                             self.objective.tempered_log_rewards(inputs["log_r"], step),
                             inputs["lengths"], inputs["group_ids"])
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["log_z"].append(self.objective.log_z.value())
        self._metrics[mode]["reward_temperature"].append(temperature)
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        t0 = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._metrics["train"]["step_s"].append(time.perf_counter() - t0)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # checkpoints: log Z, the replay buffer and the sampling streams beside TRL's ------------
    def gfn_state(self) -> dict:
        return {
            "objective": {k: v.tolist() for k, v in self.objective.state_dict().items()},
            "buffer": self.buffer.state_dict(),
            "prompts": [list(k) for k in self._prompt_keys],
            "generator": self._generator.get_state().tolist(),
            "py_rng": self._py_rng.getstate(),
        }

    def load_gfn_state(self, state: dict) -> None:
        self.objective.load_state_dict({k: torch.tensor(v) for k, v in
                                        state["objective"].items()})
        self.buffer.load_state_dict(state["buffer"])
        self._prompt_keys = {tuple(p): i for i, p in enumerate(state["prompts"])}
        self._generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        version, internal, gauss = state["py_rng"]
        self._py_rng.setstate((version, tuple(internal), gauss))

    def _save_checkpoint(self, model, trial):
        name = (self.args.hub_model_id or self.args.output_dir).rstrip("/").split("/")[-1]
        self.create_model_card(model_name=name)
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as fh:
                json.dump(self.gfn_state(), fh)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path) as fh:
                self.load_gfn_state(json.load(fh))

