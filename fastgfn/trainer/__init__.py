"""The training engine: GFlowNet fine-tuning of Hugging Face causal LMs in one process or
under DeepSpeed ZeRO-2/3, grouped by job:

    config.py, sections.py, config_loading.py  what a run is asked to do: typed sections,
    errors.py                                   flat YAML keys, errors that name the key
    run_setup.py                                building the parts of a run, in order
    trainer.py                                  Trainer: run() and train_step()
    batches.py                                  where a batch comes from (sampled or replayed)
    sampling/                                   the sampler and its one entry point
                                                (policy.py), decoders, the sampling replica
    tasks/, tools/                              prompts, termination, rewards and each task's
                                                own config keys (Task, its Options); the tool
    scoring.py                                  teacher-forced log-probs with a shared prompt
    objective.py                                loss choice, log Z, forced stops, the s0 flow
    replay.py, replay_seed.py                   the replay buffer, seeded with worked rows
    nonfinite.py, signals.py                    never training on NaN; clean stops
    model/                                      loading the policy, the frozen reward LM, the
                                                shared KV cache, mixed precision
    engines/                                    torch and DeepSpeed ZeRO engines (Engine)
    persistence/                                checkpoints that never lose work, resume, the
                                                exported model
    reporting/                                  metrics files, per-step diagnostics, the final
                                                table, plots, the model card, the machine
    evaluation/                                 evaluation during a run, and one command per
                                                task against the paper's baselines
    baselines/                                  SFT and RL on TRL; imported only by their users
    integrations/                               other tools (TRL); imported only by their users

The library (``fastgfn`` itself: losses, ops, kernels) never imports this package.
"""

from fastgfn.trainer.config import Config
from fastgfn.trainer.config_loading import load_config
from fastgfn.trainer.errors import CheckpointError, ConfigError, FastgfnError, TrainingError
from fastgfn.trainer.trainer import Trainer

__all__ = [
    "CheckpointError", "Config", "ConfigError", "FastgfnError", "Trainer", "TrainingError",
    "load_config",
]
