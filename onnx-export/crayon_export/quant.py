"""Block-quantized weights for ONNX Runtime's `MatMulNBits` / `GatherBlockQuantized`, taken from the GGUF's
own blocks where the format allows (no second rounding).

Layouts (all per output row, blocks of `block` values along the input dimension):
- 4-bit linear weights ("q4_1", llama.cpp's Q4_1): `w = scale * q + min`, q in 0..15, written as
  `w = scale * (q - 8) + offset` with `offset = min + 8 * scale`.
  Stored as `<name>.q4` uint8 [out, blocks, block/2] (two values per byte, the even one in the low nibble:
  MatMulNBits' layout), `<name>.scales` f32 [out, blocks] and `<name>.offsets` f32 [out, blocks].
  MatMulNBits computes `x @ (scale * (q - 8))^T` (8 is its default 4-bit zero point); the graph adds
  `blocksum(x) @ offsets^T`, where blocksum(x) [rows, blocks] sums x over each block. Centering on 8 matters:
  MatMulNBits quantizes x to int8 per block, and that error scales with the magnitude of the weights it
  multiplies; `scale * q` (all positive) doubled it, and top-token agreement fell from 97% to 92%.
- 8-bit embedding / tied LM head ("q8_0", llama.cpp's Q8_0): `w = scale * (u - 128)`, u in 0..255.
  Stored as `<name>.q8` uint8 [rows, blocks, block] and `<name>.scales` f32 [rows, blocks]; MatMulNBits'
  default 8-bit zero point is 128, and GatherBlockQuantized reads the same bytes for the lookup.

GGUF Q4_1 block (20 bytes): f16 d, f16 m, 16 bytes where byte j holds value j (low nibble) and value j+16
(high nibble). GGUF Q8_0 block (34 bytes): f16 d, 32 int8 values.
"""

from __future__ import annotations

import numpy as np

Q4_1_BYTES, Q8_0_BYTES = 20, 34

# How MatMulNBits computes (its accuracy_level: 4 = activations quantized to int8 per block, as llama.cpp
# does; 1 = float32). "mixed", the default, keeps float32 for the FFN down projection only: its input
# (SwiGLU output) carries the largest activation outliers (LLM.int8(), Dettmers et al. 2022), and int8
# there cost the most top-token agreement with the float32 reference of all matrix kinds (measured on
# SmolLM2, docs/benchmarks.md). The 8-bit LM head stays int8: float32 on 8-bit blocks has no fast kernel.
COMPUTE = ("int8", "mixed", "float")


def accuracy_level(compute: str, weight: str) -> int:
    if weight.endswith(("embed_tokens.weight", "lm_head.weight")):
        return 4
    if compute == "float" or (compute == "mixed" and weight.endswith("mlp.down_proj.weight")):
        return 1
    return 4


def pick_block(in_features: list[int]) -> int:
    """32 (GGUF's block) when every input dimension is a multiple of it, else 16 (the tiny test model)."""
    return 32 if all(k % 32 == 0 for k in in_features) else 16


# ---- 4-bit: scale * q + min ----

def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q uint8 [..., block] with values 0..15 -> [..., block/2], value 2i in the low nibble of byte i."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(p: np.ndarray) -> np.ndarray:
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def q4_1_from_gguf(raw: np.ndarray, rows: int, cols: int):
    """GGUF Q4_1 bytes [rows, cols/32*20] -> (q uint8 [rows, blocks, 32], scales f32, mins f32 [rows, blocks])."""
    nb = cols // 32
    b = np.ascontiguousarray(raw).reshape(rows, nb, Q4_1_BYTES)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # values 0..15 then 16..31
    return q, d, m


def q4_1_quantize(w: np.ndarray, block: int):
    """llama.cpp's Q4_1 quantization of float weights [rows, cols] (used when the source is not Q4_1)."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // block, block).astype(np.float32)
    lo, hi = x.min(-1), x.max(-1)
    d = (hi - lo) / 15.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.floor((x - lo[..., None]) * inv[..., None] + 0.5), 0, 15).astype(np.uint8)
    return q, d.astype(np.float32), lo.astype(np.float32)


def q4_dequantize(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_1 decoding from (q, scale, min), as gguf and llama.cpp do it."""
    rows = q.shape[0]
    return (q.astype(np.float32) * d[..., None] + m[..., None]).reshape(rows, -1)


def q4_decode_stored(q: np.ndarray, d: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Decoding from the stored form (q, scale, offset = min + 8 scale), as the graph computes it."""
    rows = q.shape[0]
    return ((q.astype(np.float32) - 8.0) * d[..., None] + offset[..., None]).reshape(rows, -1)


def q4_offsets(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return (m + np.float32(8.0) * d).astype(np.float32)


def q4_tensors(name: str, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
    return {
        f"{name}.q4": np.ascontiguousarray(pack_nibbles(q)),
        f"{name}.scales": np.ascontiguousarray(d, dtype=np.float32),
        f"{name}.offsets": np.ascontiguousarray(q4_offsets(d, m)),
    }


# ---- 8-bit: scale * (u - 128) ----

def q8_0_from_gguf(raw: np.ndarray, rows: int, cols: int):
    """GGUF Q8_0 bytes -> (u uint8 [rows, blocks, 32] = q + 128, scales f32 [rows, blocks])."""
    nb = cols // 32
    b = np.ascontiguousarray(raw).reshape(rows, nb, Q8_0_BYTES)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = b[..., 2:].copy().view(np.int8)
    return (q.astype(np.int16) + 128).astype(np.uint8), d


def q8_0_quantize(w: np.ndarray, block: int):
    """llama.cpp's Q8_0 quantization (symmetric, scale = absmax / 127)."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // block, block).astype(np.float32)
    d = np.abs(x).max(-1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.round(x * inv[..., None]), -127, 127).astype(np.int16)
    return (q + 128).astype(np.uint8), d.astype(np.float32)


def q8_dequantize(u: np.ndarray, d: np.ndarray) -> np.ndarray:
    rows = u.shape[0]
    return ((u.astype(np.float32) - 128.0) * d[..., None]).reshape(rows, -1)


def q8_tensors(name: str, u: np.ndarray, d: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{name}.q8": np.ascontiguousarray(u), f"{name}.scales": np.ascontiguousarray(d, dtype=np.float32)}


def permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleaving on any per-row array (see gguf_source.unpermute_qk)."""
    rows = a.shape[0]
    rest = a.shape[1:]
    return np.ascontiguousarray(a.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest))


def quantize_model(cfg, weights: dict[str, np.ndarray], raw: dict[str, tuple[str, np.ndarray]], block: int,
                   targets: list[str], compute: str = "mixed") -> tuple[dict[str, np.ndarray], dict]:
    """The tensors of a 4-bit model folder: norms stay f32; adapter-targetable matrices 4-bit; the embedding
    (and an untied LM head) 8-bit. `weights`: the f32 tensors (Hugging Face names, un-permuted);
    `raw`: name -> (GGUF type, raw bytes) where the GGUF had them, or ("q4_1_blocks", (q, scale, min)) /
    ("q8_0_blocks", (u, scale)) for weights made on the grid (the tiny model). Blocks are copied when the
    GGUF type matches the layout and `block` is 32; every copied GGUF block is checked to decode to
    exactly `weights`."""
    out: dict[str, np.ndarray] = {}
    copied = requantized = 0
    for name, w in weights.items():
        kind, data = raw.get(name, (None, None))
        is_target = any(name.endswith(f".{t}.weight") for t in targets)
        if w.ndim == 1:
            out[name] = w
        elif is_target:
            if kind == "Q4_1" and block == 32:
                q, d, m = q4_1_from_gguf(data, *w.shape)
                if cfg.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
                    q, d, m = (permute_rows(a, heads) for a in (q, d, m))
                if not np.array_equal(q4_dequantize(q, d, m), w):
                    raise ValueError(f"{name}: Q4_1 blocks do not decode to the float32 export")
                copied += 1
            elif kind == "q4_1_blocks":  # blocks the float32 weights were made from (the tiny model)
                q, d, m = data
                copied += 1
            else:
                q, d, m = q4_1_quantize(w, block)
                requantized += 1
            # The offset form rounds min + 8 scale once in float32: at most an ulp of the weights.
            exact = q4_dequantize(q, d, m)
            worst = float(np.max(np.abs(q4_decode_stored(q, d, q4_offsets(d, m)) - exact)))
            if worst > 1e-6 * max(float(np.max(np.abs(exact))), 1e-30):
                raise ValueError(f"{name}: 4-bit offsets decode {worst:.2e} away from the blocks' values")
            out.update(q4_tensors(name, q, d, m))
        else:  # embedding / LM head
            if kind == "Q8_0" and block == 32:
                u, d = q8_0_from_gguf(data, *w.shape)
                if not np.array_equal(q8_dequantize(u, d), w):
                    raise ValueError(f"{name}: Q8_0 blocks do not decode to the float32 export")
                copied += 1
            elif kind == "q8_0_blocks":
                u, d = data
                copied += 1
            else:
                u, d = q8_0_quantize(w, block)
                requantized += 1
            out.update(q8_tensors(name, u, d))
    info = {"block_size": block, "linear": "q4_1", "embedding": "q8_0", "compute": compute, "blocks_copied_from_gguf": copied,
            "tensors_quantized_here": requantized}
    return out, info


# Projections that read the same input run as one 4-bit matrix product: their rows are concatenated in
# this order (the fused weight is named after the key). The folder stores each member under its own name,
# adjacent in model.safetensors, so the fused tensors are byte ranges of the file (no second copy) and
# every per-module reader (merges, task embeddings) keeps working.
FUSED = {
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
}
Q4_SUFFIXES = (".q4", ".scales", ".offsets")


def fused_order(tensors: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """`tensors` reordered so that, per layer, fused group and suffix, the members are adjacent in FUSED's
    order (safetensors writes in this order, see write_safetensors)."""
    out: dict[str, np.ndarray] = {}
    for i in range(layers):
        for members in FUSED.values():
            for suffix in Q4_SUFFIXES:
                for m in members:
                    name = f"model.layers.{i}.{m}.weight{suffix}"
                    out[name] = tensors[name]
    return {**{k: v for k, v in tensors.items() if k not in out}, **out}


def dequantize_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 weights (Hugging Face names) a 4-bit folder's tensors decode to: the reference it is checked against."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".q4"):
            base = name[: -len(".q4")]
            out[base] = q4_decode_stored(unpack_nibbles(t), tensors[base + ".scales"], tensors[base + ".offsets"])
        elif name.endswith(".q8"):
            base = name[: -len(".q8")]
            out[base] = q8_dequantize(t, tensors[base + ".scales"])
        elif not name.endswith((".scales", ".offsets")):
            out[name] = t
    return out


def snap_to_grid(weights: dict[str, np.ndarray], block: int, targets: list[str]) -> dict[str, tuple]:
    """Rounds generated float weights onto the 4-bit / 8-bit grids in place and returns their blocks (as
    `raw` for quantize_model): the float32 and 4-bit exports of the tiny model then hold the same model,
    and one pool serves both, as it does for the GGUF exports."""
    blocks = {}
    for name, w in weights.items():
        if w.ndim != 2:
            continue
        if any(name.endswith(f".{t}.weight") for t in targets):
            q, d, m = q4_1_quantize(w, block)
            weights[name] = q4_dequantize(q, d, m)
            blocks[name] = ("q4_1_blocks", (q, d, m))
        else:
            u, d = q8_0_quantize(w, block)
            weights[name] = q8_dequantize(u, d)
            blocks[name] = ("q8_0_blocks", (u, d))
    return blocks
