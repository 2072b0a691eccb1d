"""fastgfn: fused kernels and a DeepSpeed engine for GFlowNet fine-tuning of language models.

Importing fastgfn pulls in torch only (no triton, transformers or deepspeed).
"""

from fastgfn._validation import set_debug
from fastgfn.losses import (
    DBLoss,
    SubTBLoss,
    TBLoss,
    VarGradLoss,
    db_loss,
    subtb_loss,
    tb_loss,
    trajectory_log_ratio,
    vargrad_log_z,
    vargrad_loss,
)

__version__ = "0.1.0"

__all__ = [
    "DBLoss",
    "SubTBLoss",
    "TBLoss",
    "VarGradLoss",
    "db_loss",
    "set_debug",
    "subtb_loss",
    "tb_loss",
    "trajectory_log_ratio",
    "vargrad_log_z",
    "vargrad_loss",
]

from fastgfn.lm_logprobs import causal_lm_gfn_logprobs, lm_head_logprobs  # noqa: E402
from fastgfn.ops.logprobs import (  # noqa: E402
    LinearTokenLogProbs,
    TokenLogProbs,
    TokenLogProbsLayer,
    linear_token_logprobs,
    token_logprobs,
)

__all__ += [
    "causal_lm_gfn_logprobs",
    "lm_head_logprobs",
    "LinearTokenLogProbs",
    "TokenLogProbs",
    "TokenLogProbsLayer",
    "linear_token_logprobs",
    "token_logprobs",
]
