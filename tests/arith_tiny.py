"""A tiny character-level model taught the arithmetic rationale format in a few seconds, so
that tests see the calculator act (a random tiny model never writes "a op b ="): its state
dict, and a patch that makes ``model=tiny`` build it (tests in-process, tests/ds_worker.py
under the DeepSpeed launcher)."""

import random

import torch

from fastgfn.trainer.tools.calculator import complete_rationale


def arithmetic_text(rng: random.Random, compact: bool = False) -> str:
    """A worked problem in the data's format: "Question: 3 + 5 - 2 = ? Answer: 3 + 5 = 8,
    8 - 2 = 6." (the results filled in by the calculator); ``compact``: 2 to 4 operands and
    no spaces but the calculator's, "Question: 3+5-2=? Answer: 3+5= 8,8-2= 6."."""
    n = rng.randint(2, 4) if compact else rng.randint(3, 4)
    xs = [rng.randint(0, 9) for _ in range(n)]
    ops = [rng.choice("+-") for _ in range(n - 1)]
    sp, sep = ("", ",") if compact else (" ", ", ")
    question = sp.join([str(xs[0])] + [f"{o}{sp}{x}" for o, x in zip(ops, xs[1:])])
    steps, v = [], xs[0]
    for o, x in zip(ops, xs[1:]):
        steps.append(f"{v}{sp}{o}{sp}{x}{sp}=")
        v = v + x if o == "+" else v - x
    return (f"Question: {question}{sp}={sp}? Answer:{sp}"
            + complete_rationale(sep.join(steps)) + ".")


def pretrained_state(hidden: int = 32, steps: int = 300, seed: int = 0,
                     compact: bool = False) -> dict:
    """The tiny model (``tiny_hidden=hidden``, seed ``seed``) after ``steps`` AdamW steps of
    next-token training on worked problems (``arithmetic_text``, ``compact`` or not)."""
    from fastgfn.trainer import load_config
    from fastgfn.trainer.model.loading import build_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a busy machine
    try:
        model, tok = build_tiny(load_config(None, ["model=tiny", f"tiny_hidden={hidden}"]),
                                seed=seed)
        rng = random.Random(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            ids = [tok.encode(arithmetic_text(rng, compact)) for _ in range(16)]
            L = max(map(len, ids))
            x = torch.tensor([i + [0] * (L - len(i)) for i in ids])
            keep = torch.tensor([[1.0] * (len(i) - 1) + [0.0] * (L - len(i)) for i in ids])
            logits = model(input_ids=x).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:],
                                                    reduction="none")
            loss = (nll * keep).sum() / keep.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def patch_build_tiny(state: dict, setattr_=setattr) -> None:
    """Make ``model=tiny`` build the model with ``state`` (``setattr_``: pytest's
    ``monkeypatch.setattr`` in tests, plain ``setattr`` in a worker process)."""
    from fastgfn.trainer.model import loading as models

    original = models.build_tiny

    def build(cfg, seed=None, attn_implementation=None):
        model, tok = original(cfg, seed=seed, attn_implementation=attn_implementation)
        model.load_state_dict(state)
        return model, tok

    setattr_(models, "build_tiny", build)
