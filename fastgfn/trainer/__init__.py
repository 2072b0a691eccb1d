"""The training engine: GFlowNet fine-tuning of Hugging Face causal LMs in one process or
under DeepSpeed ZeRO-2/3. The files are the steps of a run:

    config.py, config_loading.py, errors.py   what a run is asked to do
    components.py                             building the parts of a run
    trainer.py                                Trainer: run() and train_step()
    rollout.py                                where a batch comes from (sampled or replayed)
    sampling/                                 the sampler, decoders, the sampling replica
    tasks/                                    prompts, termination and rewards (Task)
    reward_model.py                           the frozen reward LM
    scoring.py, kv_cache.py                   teacher-forced log-probs with a shared prompt
    objective.py                              loss choice, log Z, dead ends, the s0 flow
    engines/                                  torch and DeepSpeed ZeRO engines (Engine)
    replay.py                                 the replay buffer
    checkpoint.py, checkpoint_files.py        checkpoints that never lose work
    resume.py                                 which checkpoint resume takes; config changes
    nonfinite.py                              never training on NaN
    signals.py, export.py                     clean stops, the saved model
    evaluation.py, report.py, metrics_log.py  evaluation, the final table, metrics files
    plots.py, model_card.py                   training curves; the exported model's card
    integrations/                             other tools (TRL); imported only by their users
    continuation_eval/                        the continuation results table (a command)
    infilling_eval/                           the story-infilling results table (a command)
    baselines/                                SFT (TRL); imported only by their users

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
