"""Read a llama-architecture GGUF into float32 arrays with Hugging Face names and layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    model_type: str = "llama"
    attention_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    def hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            rope_scaling=None,
            torch_dtype="float32",
        )
        return d


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class GgufError(RuntimeError):
    pass


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GgufError(f"GGUF metadata key '{key}' is missing")
        return default
    return f.contents()


def read_config(reader: GGUFReader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise GgufError(f"architecture '{arch}' is not supported (supported: {', '.join(_ARCHITECTURES)})")
    p = arch + "."
    n_head = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    if reader.fields.get(p + "rope.scaling.type") is not None:
        raise GgufError("rope scaling is not supported by this exporter")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return LlamaConfig(
        vocab_size=len(tokens.data),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, p + "block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, p + "attention.head_count_kv", n_head)),
        head_dim=int(_field(reader, p + "rope.dimension_count", hidden // n_head)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        # GGUF stores eps as float32 (9.9999997e-06); round to the decimal the model was trained with.
        rms_norm_eps=float(np.format_float_positional(np.float32(_field(reader, p + "attention.layer_norm_rms_epsilon")), precision=6)),
        max_position_embeddings=int(_field(reader, p + "context_length")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        model_type=arch,
        attention_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", -1)),
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary halves in Q/K rows (convert_hf_to_gguf's permute)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_MAP:
        return f"model.layers.{int(parts[1])}.{_LAYER_MAP[parts[2]]}.{parts[3]}"
    raise GgufError(f"unexpected tensor '{gguf_name}' in GGUF")


def read_weights(reader: GGUFReader, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor"):
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_name(t.name)
        # Only llama GGUFs carry llama.cpp's rotary row permutation (qwen2 is stored as trained).
        if cfg.model_type == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        out[name] = np.ascontiguousarray(w)
    check_shapes(out, cfg)
    return out


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def check_shapes(weights: dict[str, np.ndarray], cfg: LlamaConfig) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise GgufError(f"tensor set mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise GgufError(f"tensor '{name}' has shape {weights[name].shape}, expected {shape}")


def open_gguf(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GgufError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueErrors/IndexErrors on corrupt files
        raise GgufError(f"cannot read GGUF file {path}: {e}") from e
