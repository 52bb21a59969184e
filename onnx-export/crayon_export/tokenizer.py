"""Rebuild a Hugging Face `tokenizer.json` (GPT-2 byte-level BPE) from the vocabulary inside a GGUF."""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .gguf_source import GgufError

# Qwen2's pre-tokenizer regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2, Qwen2's tokenizer.json).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TYPES = {3, 4}


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    model = reader.fields["tokenizer.ggml.model"].contents()
    pre = reader.fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in reader.fields else "default"
    if model != "gpt2":
        raise GgufError(f"tokenizer model '{model}' is not supported (only byte-level BPE 'gpt2')")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM splits every digit on its own before the GPT-2 regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM).
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise GgufError(f"pre-tokenizer '{pre}' is not supported by this exporter")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in _SPECIAL_TYPES]
    tok.add_special_tokens(specials)
    return tok


def tokenizer_config(reader: GGUFReader, tok: Tokenizer) -> dict:
    """The Hugging Face tokenizer_config.json subset the engine reads: chat template and special tokens."""
    f = reader.fields
    def tok_str(key):
        return tok.id_to_token(int(f[key].contents())) if key in f else None
    template = f["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in f else None
    if template is None:
        raise GgufError("GGUF has no tokenizer.chat_template")
    return {
        "chat_template": template,
        "bos_token": tok_str("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_str("tokenizer.ggml.eos_token_id"),
        "pad_token": tok_str("tokenizer.ggml.padding_token_id"),
        "unk_token": tok_str("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(f["tokenizer.ggml.add_bos_token"].contents()) if "tokenizer.ggml.add_bos_token" in f else False,
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 8192,
    }


def write_tokenizer(out: Path, tok: Tokenizer, cfg: dict) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
