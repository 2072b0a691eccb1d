"""The SFT baseline (``fastgfn.trainer.baselines.sft``, TRL's SFTTrainer) on a tiny random Llama:
the labels TRL trains on are the prompt and the masked tokens left out, its loss on a batch is
the masked cross-entropy computed by hand, masked tokens get exactly no gradient, a short run
learns its completions and saves a loadable model, and bad examples are named."""

import math

import pytest
import torch

pytest.importorskip("trl")  # the optional [trl] extra

from fastgfn.trainer.baselines.sft import (  # noqa: E402
    IGNORE,
    SFTExample,
    encode_example,
    sft_config,
    sft_trainer,
    train_sft,
)
from fastgfn.trainer.integrations.tiny import tiny_causal_lm  # noqa: E402


def _examples(tok):
    c = tok.encode(" 3+4=7.")
    return [
        SFTExample("q: ", "ab."),
        SFTExample(tok.encode("sum "), c, loss_mask=[1, 1, 1, 1, 1, 0, 1]),  # "7" masked
        SFTExample("long prompt: ", torch.tensor(tok.encode("xyz.")), loss_mask=[0, 1, 1, 1]),
    ]


def test_labels_leave_out_the_prompt_and_masked_tokens():
    _, tok = tiny_causal_lm()
    enc = encode_example(tok, _examples(tok)[1])
    p, c = tok.encode("sum "), tok.encode(" 3+4=7.")
    assert enc["input_ids"] == p + c
    assert enc["labels"] == [IGNORE] * len(p) + c[:5] + [IGNORE] + c[6:]


def _batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.data_collator(rows)


def _hand_loss(model, batch):
    """Mean over label tokens of -log p(token | prefix), from the full logits, in float64."""
    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return -(picked * keep).sum() / keep.sum()


def test_loss_is_the_masked_cross_entropy_and_masked_tokens_get_no_gradient(tmp_path):
    model, tok = tiny_causal_lm()
    tr = sft_trainer(model, tok, _examples(tok), sft_config(tmp_path, max_steps=1))
    # TRL kept our labels as they are
    for i, ex in enumerate(_examples(tok)):
        assert tr.train_dataset[i]["labels"] == encode_example(tok, ex, i)["labels"]
    batch = _batch(tr)
    hidden = {}

    def keep_hidden(module, args, out):  # the final hidden states: one lm_head input per position
        out.retain_grad()
        hidden["h"] = out

    handle = tr.model.model.norm.register_forward_hook(keep_hidden)
    loss = tr.compute_loss(tr.model, dict(batch))
    handle.remove()
    expected = _hand_loss(tr.model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    # position t predicts token t + 1: with that label ignored, its state gets no gradient
    grad = hidden["h"].grad.abs().sum(-1)
    target = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE)],
                       1)
    assert torch.all(grad[target == IGNORE] == 0)
    assert torch.all(grad[target != IGNORE] > 0)
    # the masked "7" of example 1 in particular
    row = batch["input_ids"][1].tolist()
    seven = len(tok.encode("sum ")) + 5
    assert row[seven] == tok.encode("7")[0] and grad[1, seven - 1] == 0


def test_short_run_learns_the_completions_and_saves_a_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_causal_lm()
    examples = [SFTExample("q: ", "ab."), SFTExample("r: ", "cd.")]
    tr = train_sft(model, tok, examples, tmp_path, max_steps=30, learning_rate=3e-2,
                   per_device_train_batch_size=2, lr_scheduler_type="constant")
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.1 * losses[0]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.tensor([tok.encode("q: ")])
    out = saved.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:].tolist()) == "ab."


@pytest.mark.parametrize("example, match", [
    (SFTExample("p", ""), r"examples\[0\]\.completion: has no tokens"),
    (SFTExample("p", "ab", loss_mask=[1]), r"examples\[0\]\.loss_mask: needs one entry"),
    (SFTExample("p", "ab", loss_mask=[0, 0]), r"examples\[0\]\.loss_mask: masks every"),
    (SFTExample("p", "ab", loss_mask=[2, 1]), r"examples\[0\]\.loss_mask: entries must be 0 or 1"),
    (SFTExample([10**6], "ab"), r"examples\[0\]: token id 1000000 is not in"),
])
def test_bad_examples_are_named(example, match):
    _, tok = tiny_causal_lm()
    with pytest.raises(ValueError, match=match):
        encode_example(tok, example)


def test_bad_types_are_named(tmp_path):
    model, tok = tiny_causal_lm()
    with pytest.raises(TypeError, match=r"examples\[0\]\.prompt: must be text or a sequence"):
        encode_example(tok, SFTExample(3.5, "ab"))
    with pytest.raises(TypeError, match=r"examples\[1\]: must be an SFTExample"):
        sft_trainer(model, tok, [SFTExample("p", "a"), ("p", "a")], sft_config(tmp_path))
    with pytest.raises(ValueError, match="examples: need at least one"):
        sft_trainer(model, tok, [], sft_config(tmp_path))
