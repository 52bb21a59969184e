"""Build a llama decoder as an ONNX graph (opset 17 plus ONNX Runtime's com.microsoft ops) with a KV cache.

Design choices, each measured or argued in docs/engine.md:
- Linear layers are `Gemm(x, W, transB=1)` on the Hugging Face [out, in] layout, so the weights in the
  graph are byte-for-byte the tensors in `model.safetensors`. The initializers are stored as ONNX
  external data that points *into* `model.safetensors` (offset + length): one copy of the weights on
  disk, and every adapter target (`model.layers.N.self_attn.q_proj.weight`, ...) is an initializer with
  its Hugging Face name, which ONNX Runtime lets the engine replace at session creation.
- The residual stream stays 2-D [batch*seq, hidden] so each Gemm needs no reshape.
- Attention is ONNX Runtime's `GroupQueryAttention`: rotary embedding inside the kernel (positions follow
  from `seqlens_k`), grouped KV heads without copies, and a cache of fixed capacity that the engine binds
  as both `past_key_values.N.*` and `present.N.*`, so each step writes its new keys and values in place
  instead of concatenating the whole cache (decode 1.4x at 400 positions, docs/engine.md).
- Residual adds are fused into the RMS norms (`SkipSimplifiedLayerNormalization`).
- `num_logits_to_keep` (int64 [1]) slices the last N positions before the LM head: prefill computes
  logits for one position instead of all (the LM head is ~20% of the model's per-token FLOPs).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .gguf_source import LlamaConfig
from .quant import FUSED, Q4_SUFFIXES, accuracy_level

OPSET = 17
I64_MAX = np.iinfo(np.int64).max


class _G:
    """Tiny graph-building helper: unique names, constants, node list."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None, outputs=None, **attrs):
        self._n += 1
        base = name or f"{op_type.lower()}_{self._n}"
        outs = outputs or ([base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n_{base}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.inits.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]


_DTYPES = {"F32": TensorProto.FLOAT, "U8": TensorProto.UINT8}


def _external(name: str, shape, location: str, offset: int, length: int, dtype: str = "F32") -> onnx.TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = _DTYPES[dtype]
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def safetensors_layout(path: Path) -> dict[str, tuple[list[int], int, int, str]]:
    """name -> (shape, absolute byte offset, byte length, dtype) of every tensor in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{name}: dtype {meta['dtype']} (expected one of {', '.join(_DTYPES)})")
        b, e = meta["data_offsets"]
        out[name] = (meta["shape"], base + b, e - b, meta["dtype"])
    return out


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def write_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None):
    """A safetensors file with the tensors in `tensors`' order (the `safetensors` package sorts them by dtype
    and name): fused projections rely on their members being adjacent (quant.FUSED)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        n = t.nbytes
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


def layout_in_out(cfg: LlamaConfig, lora_input: str) -> tuple[int, int]:
    """(in, out) features of the module a `<module>.lora_a|b` input belongs to."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    module = lora_input.rsplit(".", 1)[0]
    for suffix, dims in ((".q_proj", (h, q)), (".k_proj", (h, kv)), (".v_proj", (h, kv)), (".o_proj", (q, h)),
                         (".gate_proj", (h, f)), (".up_proj", (h, f)), (".down_proj", (f, h))):
        if module.endswith(suffix):
            return dims
    raise ValueError(f"no adapter target for {lora_input}")


def build_decoder(cfg: LlamaConfig, weights_file: Path, quant: dict | None = None, lora: bool = False) -> onnx.ModelProto:
    """`quant`: None for float32 weights, else the quantization info of a 4-bit folder (see quant.py).
    `lora`: every adapter-targetable matrix also adds `((x @ A^T) * scale) @ B^T`, a blend's low-rank delta
    kept out of the quantized weights, from graph inputs `<module>.lora_a` [rank, in], `<module>.lora_b`
    [out, rank] (PEFT's layouts, the adapters' factors concatenated along the rank) and
    `<module>.lora_scale` [rank] (blend weight times alpha/r per rank): the engine builds A and B once per
    pool and a blend is only its scales. Rank may be 0."""
    layout = safetensors_layout(weights_file)
    location = weights_file.name
    g = _G()
    used: set[str] = set()

    def w(name: str) -> str:
        used.add(name)
        return name

    H, d = cfg.hidden_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    rep = nh // nkv
    f32, i64 = np.float32, np.int64

    # ---- shared: embeddings, rotary tables ----
    block = quant["block_size"] if quant else 0
    # MatMulNBits accuracy_level: 4 quantizes activations to int8 per block (fast, as llama.cpp does),
    # 1 computes in float32. See COMPUTE in quant.py for which matrices get which.
    compute = quant.get("compute", "mixed") if quant else None
    if quant:
        # 8-bit lookup on the same bytes the tied LM head reads; the scales need a trailing unit axis here.
        e_scales = g.op("Reshape", [w("model.embed_tokens.weight.scales"), g.const([0, 0, 1], i64)], name="embed_scales")
        x = g.op("GatherBlockQuantized", [w("model.embed_tokens.weight.q8"), "input_ids", e_scales], name="embed",
                 domain="com.microsoft", bits=8, block_size=block, gather_axis=0, quantize_axis=2)  # [B,S,nb,blk]
    else:
        x = g.op("Gather", [w("model.embed_tokens.weight"), "input_ids"], name="embed")  # [B,S,H]
    x = g.op("Reshape", [x, g.const([-1, H], i64)], name="embed_2d")  # [B*S,H]

    ids_shape = g.op("Shape", ["input_ids"], name="ids_shape")
    batch = g.op("Gather", [ids_shape, g.const([0], i64)], name="batch", axis=0)  # [1]

    # Rotary tables for GroupQueryAttention, which rotates q and k itself at positions past..total-1.
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(np.arange(cfg.max_position_embeddings, dtype=np.float64), inv_freq)  # [P, d/2]
    cos_cache, sin_cache = g.const(np.cos(angles), f32), g.const(np.sin(angles), f32)

    eps = g.const(cfg.rms_norm_eps, f32)
    two = g.const(2.0, f32)

    def rms_norm(t: str, weight: str, nm: str) -> str:
        var = g.op("ReduceMean", [g.op("Pow", [t, two], name=f"{nm}_sq")], name=f"{nm}_mean", axes=[-1], keepdims=1)
        den = g.op("Sqrt", [g.op("Add", [var, eps], name=f"{nm}_eps")], name=f"{nm}_sqrt")
        return g.op("Mul", [g.op("Div", [t, den], name=f"{nm}_div"), w(weight)], name=nm)

    blocksums: dict[str, str] = {}

    def blocksum(t: str, k: int) -> str:  # [..., k] -> [..., k/block]: the input summed over each block
        # One MatMul with a 0/1 matrix instead of Reshape + ReduceSum: every node costs a few microseconds
        # of dispatch, which at ~1000 nodes per token is a large part of a decode step.
        if t not in blocksums:
            ones = g.const(np.kron(np.eye(k // block), np.ones((block, 1))), f32)  # [k, k/block]
            blocksums[t] = g.op("MatMul", [t, ones], name=f"{t}_blksum")
        return blocksums[t]

    lora_inputs: list[str] = []

    def linear(t: str, weight: str, nm: str, bias: str | None = None) -> str:
        y = dense(t, weight, nm, w(bias) if bias else None)
        if lora and weight.startswith("model.layers."):
            y = g.op("Add", [y, low_rank(t, weight, nm)], name=f"{nm}_lora")
        return y

    def low_rank(t: str, weight: str, nm: str) -> str:  # ((t @ A^T) * scale) @ B^T from the inputs of `weight`
        module = weight[: -len(".weight")]
        a, b, scale = f"{module}.lora_a", f"{module}.lora_b", f"{module}.lora_scale"
        lora_inputs.extend([a, b, scale])
        xa = g.op("Mul", [g.op("Gemm", [t, a], name=f"{nm}_lora_a", transB=1), scale], name=f"{nm}_lora_scale")
        return g.op("Gemm", [xa, b], name=f"{nm}_lora_b", transB=1)

    def dense(t: str, weight: str, nm: str, bias: str | None = None) -> str:
        if not quant:
            return g.op("Gemm", [t, w(weight)] + ([bias] if bias else []), name=nm, transB=1)
        # scale * (q - 8) by MatMulNBits (its default zero point), plus the per-block offsets (see quant.py).
        n, nb = layout[weight + ".scales"][0]
        k = nb * block
        y = g.op("MatMulNBits", [t, w(weight + ".q4"), w(weight + ".scales")], name=nm, domain="com.microsoft",
                 K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level(compute, weight))
        # blocksum(x) @ offsets^T + y in one Gemm
        y = g.op("Gemm", [blocksum(t, k), w(weight + ".offsets"), y], name=f"{nm}_q4_1", transB=1)
        return g.op("Add", [y, bias], name=f"{nm}_bias") if bias else y

    def fused_linear(t: str, layer: str, fused: str, nm: str, biases: list[str] | None = None) -> str:
        """The projections of FUSED[fused] as one 4-bit product, [rows, sum of their outputs]: the fused
        tensors are byte ranges over the members' adjacent tensors in the weights file (quant.fused_order)."""
        members = [f"{layer}{m}.weight" for m in FUSED[fused]]
        weight = f"{layer}{fused}.weight"
        for suffix in Q4_SUFFIXES:
            parts = [layout[m + suffix] for m in members]
            for (_, off, length, _), (_, nxt, _, _) in zip(parts, parts[1:]):
                if off + length != nxt:
                    raise ValueError(f"{members}: {suffix} tensors are not adjacent in {location}")
            shape = [sum(p[0][0] for p in parts)] + parts[0][0][1:]
            layout[weight + suffix] = (shape, parts[0][1], sum(p[2] for p in parts), parts[0][3])
        bias = g.op("Concat", [w(b) for b in biases], name=f"{nm}_bias_cat", axis=0) if biases else None
        y = dense(t, weight, nm, bias)
        if lora:  # each member's low-rank delta, side by side like the members' rows
            lows = [low_rank(t, m, f"{nm}_{j}") for j, m in enumerate(members)]
            y = g.op("Add", [y, g.op("Concat", lows, name=f"{nm}_lora_cat", axis=-1)], name=f"{nm}_lora")
        return y

    def proj_bias(p: str, which: str) -> str | None:
        return p + f"self_attn.{which}_proj.bias" if cfg.attention_bias else None

    seq3_shapes: dict[int, str] = {}

    def seq3(t: str, n: int, nm: str) -> str:  # [B*S, n] -> [B, S, n], the layout GroupQueryAttention takes
        if n not in seq3_shapes:
            seq3_shapes[n] = g.op("Concat", [batch, g.const([-1, n], i64)], name=f"seq3_shape_{n}", axis=0)
        return g.op("Reshape", [t, seq3_shapes[n]], name=nm)

    def skip_norm(t: str, skip: str, weight: str, nm: str) -> tuple[str, str]:
        """(rms_norm(t + skip), t + skip) in one fused kernel."""
        y, _, _, total = g.op("SkipSimplifiedLayerNormalization", [t, skip, w(weight)], n_out=4, name=nm,
                              domain="com.microsoft", epsilon=cfg.rms_norm_eps)
        return y, total

    inputs, outputs, queries = [], [], []
    pending = None  # the last block's output, added to the residual stream by the next fused norm
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        ok, ov = f"present.{i}.key", f"present.{i}.value"
        inputs += [pk, pv]
        outputs += [ok, ov]
        queries.append((f"attn_query.{i}", (nh + 2 * nkv) * d if quant else nh * d))

        if pending is None:
            h = rms_norm(x, p + "input_layernorm.weight", f"l{i}_ln1")
        else:
            h, x = skip_norm(x, pending, p + "input_layernorm.weight", f"l{i}_ln1")
        if quant:  # one product for q, k and v; GroupQueryAttention takes them packed
            biases = [proj_bias(p, x_) for x_ in "qkv"] if cfg.attention_bias else None
            q = seq3(fused_linear(h, p, "self_attn.qkv_proj", f"l{i}_qkv", biases), (nh + 2 * nkv) * d, f"attn_query.{i}")
            k = v = ""
        else:
            q = seq3(linear(h, p + "self_attn.q_proj.weight", f"l{i}_q", proj_bias(p, "q")), nh * d, f"attn_query.{i}")
            k = seq3(linear(h, p + "self_attn.k_proj.weight", f"l{i}_k", proj_bias(p, "k")), nkv * d, f"l{i}_k3")
            v = seq3(linear(h, p + "self_attn.v_proj.weight", f"l{i}_v", proj_bias(p, "v")), nkv * d, f"l{i}_v3")
        # The cache is [B, kv_heads, capacity, d]: with past and present bound to one buffer (the engine
        # does), the kernel writes the new positions in place; an empty past gives a present of `total`.
        ctx = g.op("GroupQueryAttention", [q, k, v, pk, pv, "seqlens_k", "total_sequence_length", cos_cache, sin_cache],
                   outputs=[f"l{i}_ctx", ok, ov], name=f"l{i}_attn", domain="com.microsoft", num_heads=nh,
                   kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0, scale=float(1.0 / np.sqrt(d)))
        ctx = g.op("Reshape", [ctx, g.const([-1, nh * d], i64)], name=f"l{i}_ctx2")
        attn = linear(ctx, p + "self_attn.o_proj.weight", f"l{i}_o")

        h, x = skip_norm(x, attn, p + "post_attention_layernorm.weight", f"l{i}_ln2")
        if quant:
            ff = cfg.intermediate_size
            gate, up = g.op("Split", [fused_linear(h, p, "mlp.gate_up_proj", f"l{i}_gate_up"), g.const([ff, ff], i64)],
                            n_out=2, name=f"l{i}_gate_up_split", axis=-1)
        else:
            gate = linear(h, p + "mlp.gate_proj.weight", f"l{i}_gate")
            up = linear(h, p + "mlp.up_proj.weight", f"l{i}_up")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"l{i}_sig")], name=f"l{i}_silu"), up], name=f"l{i}_act")
        pending = linear(act, p + "mlp.down_proj.weight", f"l{i}_down")

    x, _ = skip_norm(x, pending, "model.norm.weight", "final_norm")
    x = g.op("Reshape", [x, g.op("Concat", [batch, g.const([-1, H], i64)], name="final_shape", axis=0)], name="final_3d")
    start = g.op("Neg", ["num_logits_to_keep"], name="keep_start")
    x = g.op("Slice", [x, start, g.const([I64_MAX], i64), g.const([1], i64)], name="keep_last")
    x = g.op("Reshape", [x, g.const([-1, H], i64)], name="keep_2d")
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if quant:
        logits = g.op("MatMulNBits", [x, w(head + ".q8"), w(head + ".scales")], name="lm_head", domain="com.microsoft",
                      K=H, N=cfg.vocab_size, bits=8, block_size=block, accuracy_level=accuracy_level(compute, head))
    else:
        logits = g.op("Gemm", [x, w(head)], name="lm_head", transB=1)
    g.op("Reshape", [logits, g.op("Concat", [batch, g.const([-1, cfg.vocab_size], i64)], name="logits_shape", axis=0)],
         outputs=["logits"], name="logits_3d")

    for name in sorted(used):
        shape, off, length, dtype = layout[name]
        g.inits.append(_external(name, shape, location, off, length, dtype))

    kv_shape = ["batch", nkv, "kv_capacity", d]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        # Per sequence: positions held after this run minus one (GroupQueryAttention's convention).
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        # Positions held after this run (a scalar).
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [1]),
    ] + [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in inputs]
    for n in lora_inputs:  # A [rank, in], B [out, rank], scale [rank]
        k, o = layout_in_out(cfg, n)
        shape = {"_a": ["lora_rank", k], "_b": [o, "lora_rank"], "_scale": ["lora_rank"]}["_" + n.rsplit("_", 1)[1]]
        graph_inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, shape))
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept_sequence", cfg.vocab_size])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", nkv, "present_capacity", d]) for n in outputs
    ] + [
        # Each layer's queries before rotation (packed with keys and values in a 4-bit graph: the first
        # num_heads * head_dim columns). Context compression (InfiniPot) scores the cache with them; a run
        # that does not bind them pays nothing but their buffers (~2 MB per layer for 512 positions).
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence", width]) for n, width in queries
    ]
    graph = helper.make_graph(g.nodes, "crayon_llama_decoder", graph_inputs, graph_outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)], producer_name="crayon-export")
    model.ir_version = 9

    return model
