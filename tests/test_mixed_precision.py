"""``mixed_precision: bf16`` (fastgfn/trainer/model/precision.py): bf16 compute under
``torch.autocast`` with fp32 master weights. On the tiny model the step's loss and gradients
are close to fp32's (bf16 rounding, not a different objective), the trainer's matmuls see
bf16 while its parameters, gradients and optimizer stay fp32, and bad combinations are
refused at config load. Correctness only: on a CPU without native bf16 it is not faster."""

import pytest
import torch

from fastgfn.trainer import Trainer, load_config
from fastgfn.trainer.errors import ConfigError

TINY = [
    "model=tiny",
    "tiny_hidden=32",
    "batch_size=8",
    "max_new_tokens=3",
    "progress=false",
    "eval_samples=0",
    "tensorboard=false",
    "save_model=false",
    "loss=tb",
    "lr=1e-2",
    "warmup_steps=0",
]


def test_config_checks():
    assert load_config(None, ["model=tiny"]).model.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"mixed_precision: must be one of \('no', 'bf16'\)"):
        load_config(None, ["model=tiny", "mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="mixed_precision: 'bf16' .* needs dtype=float32"):
        load_config(None, ["model=tiny", "mixed_precision=bf16", "dtype=bfloat16"])
    with pytest.raises(ConfigError, match="mixed_precision: .*bf16 section"):
        load_config(None, ["model=tiny", "mixed_precision=bf16",
                           "deepspeed_config=configs/ds_zero2.json"])


def _loss_and_grads(model, prompt, tokens, term, lengths, log_r, autocast: bool):
    import fastgfn
    from fastgfn.trainer.scoring import gfn_logprobs

    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.enable_grad()
    with ctx:
        log_pf, log_pterm = gfn_logprobs(model, prompt, tokens, term)
        loss = fastgfn.subtb_loss(log_pf, log_pterm, log_r, lengths)
    assert log_pf.dtype == log_pterm.dtype == loss.dtype == torch.float32
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    return float(loss.detach()), grads


def test_step_loss_and_gradients_close_to_fp32():
    """One SubTB step on fixed tokens: bf16 autocast against fp32, the same fp32 weights."""
    from fastgfn.trainer.model.loading import load_model

    torch.manual_seed(0)
    model, _ = load_model(load_config(None, ["model=tiny", "tiny_hidden=64"]))
    B, T, V = 8, 6, model.config.vocab_size
    prompt = torch.randint(3, V, (5,))
    tokens = torch.randint(3, V, (B, T))
    lengths = torch.randint(1, T + 1, (B,))
    log_r = -5 * torch.rand(B, T + 1)
    args = (model, prompt, tokens, 2, lengths, log_r)
    loss32, g32 = _loss_and_grads(*args, autocast=False)
    loss16, g16 = _loss_and_grads(*args, autocast=True)
    assert loss16 != loss32  # bf16 did run
    assert abs(loss16 - loss32) <= 1e-3 * abs(loss32)
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.9999, float(cos)
    assert (g16 - g32).norm() <= 2e-2 * g32.norm()


def test_trainer_runs_bf16_matmuls_on_fp32_master_weights(tmp_path):
    cfg = load_config(None, TINY + ["steps=3", "mixed_precision=bf16", f"output_dir={tmp_path}"])
    tr = Trainer(cfg)
    model = tr.engine.module
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    tr.run()
    for h in hooks:
        h.remove()
    assert seen == {torch.bfloat16}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())
    state = tr.engine.optimizer.state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
