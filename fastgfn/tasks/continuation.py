"""Sentence continuation (Hu et al. 2024, section 4.1).

Prompts: one per line of a text file (the paper's OpenWebText prompts). The policy samples a
continuation that ends with the termination token (default "."); the reward of every prefix
is the frozen reward LM's likelihood of that prefix followed by the termination token,
``log R(s_t STOP) = log p_LM(s_t STOP | X)`` (divided by the reward temperature by the
trainer). The reward LM is a frozen copy of the initial policy, or with LoRA the same model
with its adapters disabled.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from fastgfn.replay import ReplayBuffer
from fastgfn.scoring import frozen_prefix_logrewards


class ContinuationTask:
    name = "continuation"

    def __init__(
        self,
        tokenizer,
        prompts: list[str],
        reward_model,
        *,
        termination: str = ".",
        adapters_off: bool = False,
        use_fused: bool = True,
    ):
        if not prompts:
            raise ValueError("data_path: the prompts file holds no prompts")
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.reward_model = reward_model
        self.adapters_off = adapters_off
        self.use_fused = use_fused
        ids = tokenizer.encode(termination, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"termination: {termination!r} must be a single token, got {ids}")
        self.termination_token_id = int(ids[0])
        self._ids = {}

    @classmethod
    def from_config(cls, cfg, tokenizer, reward_model=None, adapters_off=False):
        path = Path(cfg.data_path)
        if not path.is_file():
            raise FileNotFoundError(f"data_path: no such prompts file {str(path)!r}")
        prompts = [x.strip() for x in path.read_text().splitlines() if x.strip()]
        return cls(
            tokenizer,
            prompts,
            reward_model,
            termination=cfg.termination,
            adapters_off=adapters_off,
            use_fused=cfg.use_fused_logprobs,
        )

    def num_prompts(self) -> int:
        return len(self.prompts)

    def prompt_tokens(self, index: int) -> torch.Tensor:
        if index not in self._ids:
            self._ids[index] = torch.tensor(
                self.tokenizer.encode(self.prompts[index] + " ", add_special_tokens=False)
            )
        return self._ids[index]

    def text(self, row: list[int]) -> str:
        return self.tokenizer.decode(row)

    @torch.no_grad()
    def log_rewards(self, prompt_index: int, rows: list[list[int]], T: int) -> torch.Tensor:
        pad = self.tokenizer.pad_token_id or 0
        tokens, _ = ReplayBuffer.to_tensors(rows, pad)
        if tokens.shape[1] < T:
            tokens = torch.cat([tokens, tokens.new_full((len(rows), T - tokens.shape[1]), pad)], 1)
        model = self.reward_model
        dev = next(model.parameters()).device
        ctx = model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        was = model.training
        model.eval()
        with ctx:
            out = frozen_prefix_logrewards(
                model,
                self.prompt_tokens(prompt_index).to(dev),
                tokens[:, :T].to(dev),
                self.termination_token_id,
                use_fused=self.use_fused,
            )
        model.train(was)
        return out.float().cpu()

    def evaluate(self, texts: list[str], terminated: list[bool]) -> dict:
        n = max(1, len(texts))
        return {
            "samples": len(texts),
            "terminated_fraction": sum(terminated) / n,
            "distinct": len(set(texts)),
            "mean_chars": sum(len(t) for t in texts) / n,
        }
