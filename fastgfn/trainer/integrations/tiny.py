"""The engine's tiny random Llama (``model=tiny``) with a Hugging Face tokenizer, for tools that
need one (TRL calls ``tokenizer(text=...)``, ``batch_decode``, ``save_pretrained``): the same
character vocabulary and ids as ``fastgfn.trainer.model.loading.CharTokenizer``, built in memory
(a ``tokenizers`` WordLevel model that splits every character), so nothing is downloaded."""

from __future__ import annotations

from fastgfn.trainer.model.loading import CharTokenizer, build_tiny


def char_tokenizer_fast():
    """A ``PreTrainedTokenizerFast`` with ``CharTokenizer``'s ids (pad 0, eos 1)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = CharTokenizer()
    vocab = {t: i for i, t in enumerate(chars.vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=chars.pad_token,
                                   eos_token=chars.eos_token, unk_token="?")


def tiny_causal_lm(hidden: int = 32, layers: int = 2, seed: int = 0, dtype: str = "float32"):
    """(model, tokenizer): the weights equal the engine's ``model=tiny`` with the same
    ``tiny_hidden``, ``tiny_layers`` and ``seed``."""
    from fastgfn.trainer.config import Config

    cfg = Config(model="tiny", tiny_hidden=hidden, tiny_layers=layers, seed=seed, dtype=dtype)
    model, _ = build_tiny(cfg, attn_implementation="sdpa")
    return model, char_tokenizer_fast()
