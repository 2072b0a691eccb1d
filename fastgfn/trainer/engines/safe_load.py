"""Loading DeepSpeed's checkpoint files without running code from them.

DeepSpeed 0.19.8 reads its ``*.pt`` files with ``torch.load(..., weights_only=False)`` (its
checkpoint engine, the ZeRO-3 and universal loaders, ``ds_to_universal``): a crafted
``mp_rank_00_model_states.pt`` would run arbitrary code on resume. Inside
``weights_only_loads()`` every ``torch.load`` call is made with ``weights_only=True``, and the
only classes besides tensors and plain containers it may build are ``SAFE_GLOBALS``: the
DeepSpeed records its own checkpoints hold (found by saving and loading ZeRO-2 and ZeRO-3
checkpoints and converting them to universal ones), none of which runs code when built. A
file that needs anything else is refused with a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import contextlib
import pickle
import threading

import torch

from fastgfn.trainer.errors import CheckpointError

_LOCK = threading.RLock()


def safe_globals() -> list:
    """The non-tensor classes DeepSpeed's own checkpoint files hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, ``torch.load`` always runs with ``weights_only=True`` (whatever its
    caller asked) and allows ``safe_globals()`` only."""
    with _LOCK:
        original = torch.load
        allowed = safe_globals()

        def load(f, *args, **kwargs):
            kwargs["weights_only"] = True
            kwargs.pop("pickle_module", None)
            try:
                with torch.serialization.safe_globals(allowed):
                    return original(f, *args, **kwargs)
            except pickle.UnpicklingError as exc:
                first = str(exc).strip().splitlines()
                detail = next((x for x in first if "GLOBAL" in x or "global" in x), first[0])
                raise CheckpointError(
                    f"{f}: refused: it holds pickled objects other than tensors and plain "
                    f"data ({detail.strip()}); fastgfn loads checkpoints with "
                    "weights_only=True and never runs code from them") from None

        torch.load = load
        try:
            yield
        finally:
            torch.load = original
