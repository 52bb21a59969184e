"""Build a llama decoder as an ONNX graph (standard ops, opset 17) with a KV cache.

Design choices, each measured or argued in docs/engine.md:
- Linear layers are `Gemm(x, W, transB=1)` on the Hugging Face [out, in] layout, so the weights in the
  graph are byte-for-byte the tensors in `model.safetensors`. The initializers are stored as ONNX
  external data that points *into* `model.safetensors` (offset + length): one copy of the weights on
  disk, and every adapter target (`model.layers.N.self_attn.q_proj.weight`, ...) is an initializer with
  its Hugging Face name, which ONNX Runtime lets the engine replace at session creation.
- The residual stream stays 2-D [batch*seq, hidden] so each Gemm needs no reshape.
- Grouped-query attention without copying K/V per head: queries are viewed as
  [batch, kv_heads, group, seq, head_dim] and broadcast against [batch, kv_heads, 1, total, head_dim].
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
from .quant import accuracy_level

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
    `lora`: every adapter-targetable matrix also adds `(x @ A^T) @ B^T`, a blend's low-rank delta kept
    out of the quantized weights, from graph inputs `<module>.lora_a` [rank, in] and `<module>.lora_b`
    [out, rank] (PEFT's layouts, the adapters' factors concatenated along the rank with the blend weights
    and alpha/r folded into B); rank may be 0."""
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

    # ---- shared: embeddings, rotary tables, attention bias ----
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
    seq = g.op("Gather", [ids_shape, g.const([1], i64)], name="seq", axis=0)  # [1]
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], name="mask_shape"), g.const([1], i64)], name="total", axis=0)
    past = g.op("Sub", [total, seq], name="past_len")

    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    pos = g.op("Cast", ["position_ids"], name="pos_f", to=TensorProto.FLOAT)  # [B,S]
    freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([2], i64)], name="pos_u"), g.const(inv_freq, f32)], name="freqs")
    emb = g.op("Concat", [freqs, freqs], name="rope_emb", axis=-1)  # [B,S,d]
    cos = g.op("Unsqueeze", [g.op("Cos", [emb], name="cos_raw"), g.const([1], i64)], name="cos")  # [B,1,S,d]
    sin = g.op("Unsqueeze", [g.op("Sin", [emb], name="sin_raw"), g.const([1], i64)], name="sin")

    scalar = lambda t, nm: g.op("Squeeze", [t, g.const([0], i64)], name=nm)
    q_pos = g.op("Range", [scalar(past, "past_s"), scalar(total, "total_s"), g.const(1, i64)], name="q_pos")  # [S]
    k_pos = g.op("Range", [g.const(0, i64), scalar(total, "total_s2"), g.const(1, i64)], name="k_pos")  # [T]
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const([0], i64)], name="k_pos_u"),
                                  g.op("Unsqueeze", [q_pos, g.const([1], i64)], name="q_pos_u")], name="causal")  # [S,T]
    keep = g.op("Cast", ["attention_mask"], name="mask_b", to=TensorProto.BOOL)
    keep = g.op("Unsqueeze", [keep, g.const([1, 2, 3], i64)], name="mask_u")  # [B,1,1,1,T]
    allowed = g.op("And", [causal, keep], name="allowed")  # [B,1,1,S,T]
    bias = g.op("Where", [allowed, g.const(0.0, f32), g.const(np.finfo(np.float32).min, f32)], name="attn_bias")

    eps = g.const(cfg.rms_norm_eps, f32)
    two = g.const(2.0, f32)

    def rms_norm(t: str, weight: str, nm: str) -> str:
        var = g.op("ReduceMean", [g.op("Pow", [t, two], name=f"{nm}_sq")], name=f"{nm}_mean", axes=[-1], keepdims=1)
        den = g.op("Sqrt", [g.op("Add", [var, eps], name=f"{nm}_eps")], name=f"{nm}_sqrt")
        return g.op("Mul", [g.op("Div", [t, den], name=f"{nm}_div"), w(weight)], name=nm)

    blocksums: dict[str, str] = {}

    def blocksum(t: str, k: int) -> str:  # [rows, k] -> [rows, k/block]: the input summed over each block
        if t not in blocksums:
            r = g.op("Reshape", [t, g.const([0, k // block, block], i64)], name=f"{t}_blk")
            blocksums[t] = g.op("ReduceSum", [r, g.const([-1], i64)], name=f"{t}_blksum", keepdims=0)
        return blocksums[t]

    lora_inputs: list[str] = []

    def linear(t: str, weight: str, nm: str, bias: str | None = None) -> str:
        y = dense(t, weight, nm, bias)
        if lora and weight.startswith("model.layers."):
            module = weight[: -len(".weight")]
            a, b = f"{module}.lora_a", f"{module}.lora_b"
            lora_inputs.extend([a, b])
            low = g.op("Gemm", [g.op("Gemm", [t, a], name=f"{nm}_lora_a", transB=1), b], name=f"{nm}_lora_b", transB=1)
            y = g.op("Add", [y, low], name=f"{nm}_lora")
        return y

    def dense(t: str, weight: str, nm: str, bias: str | None = None) -> str:
        if not quant:
            return g.op("Gemm", [t, w(weight)] + ([w(bias)] if bias else []), name=nm, transB=1)
        # scale * (q - 8) by MatMulNBits (its default zero point), plus the per-block offsets (see quant.py).
        n, k = layout[weight + ".scales"][0][0], layout[weight + ".offsets"][0][0] * block
        y = g.op("MatMulNBits", [t, w(weight + ".q4"), w(weight + ".scales")], name=nm, domain="com.microsoft",
                 K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level(compute, weight))
        y = g.op("Add", [y, g.op("MatMul", [blocksum(t, k), w(weight + ".offsets")], name=f"{nm}_off")], name=f"{nm}_q4_1")
        return g.op("Add", [y, w(bias)], name=f"{nm}_bias") if bias else y

    def proj_bias(p: str, which: str) -> str | None:
        return p + f"self_attn.{which}_proj.bias" if cfg.attention_bias else None

    half = g.const([d // 2, d // 2], i64)

    def rope(t: str, nm: str) -> str:
        a, b = g.op("Split", [t, half], n_out=2, name=f"{nm}_split", axis=-1)
        rot = g.op("Concat", [g.op("Neg", [b], name=f"{nm}_neg"), a], name=f"{nm}_rot", axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos], name=f"{nm}_c"), g.op("Mul", [rot, sin], name=f"{nm}_s")], name=nm)

    def heads(t: str, n: int, nm: str) -> str:  # [B*S, n*d] -> [B, n, S, d]
        t = g.op("Reshape", [t, g.op("Concat", [batch, g.const([-1, n, d], i64)], name=f"{nm}_shape", axis=0)], name=f"{nm}_4d")
        return g.op("Transpose", [t], name=f"{nm}_t", perm=[0, 2, 1, 3])

    inputs, outputs = [], []
    scale = g.const(1.0 / np.sqrt(d), f32)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        ok, ov = f"present.{i}.key", f"present.{i}.value"
        inputs += [pk, pv]
        outputs += [ok, ov]

        h = rms_norm(x, p + "input_layernorm.weight", f"l{i}_ln1")
        q = rope(heads(linear(h, p + "self_attn.q_proj.weight", f"l{i}_q", proj_bias(p, "q")), nh, f"l{i}_qh"), f"l{i}_qr")
        k = rope(heads(linear(h, p + "self_attn.k_proj.weight", f"l{i}_k", proj_bias(p, "k")), nkv, f"l{i}_kh"), f"l{i}_kr")
        v = heads(linear(h, p + "self_attn.v_proj.weight", f"l{i}_v", proj_bias(p, "v")), nkv, f"l{i}_vh")
        k_all = g.op("Concat", [pk, k], outputs=[ok], name=f"l{i}_kcat", axis=2)  # [B,nkv,T,d]
        v_all = g.op("Concat", [pv, v], outputs=[ov], name=f"l{i}_vcat", axis=2)

        q5 = g.op("Reshape", [g.op("Mul", [q, scale], name=f"l{i}_qs"), g.const([0, nkv, rep, -1, d], i64)], name=f"l{i}_q5")
        k5 = g.op("Unsqueeze", [k_all, g.const([2], i64)], name=f"l{i}_k5")  # [B,nkv,1,T,d]
        v5 = g.op("Unsqueeze", [v_all, g.const([2], i64)], name=f"l{i}_v5")
        kt = g.op("Transpose", [k5], name=f"l{i}_kt", perm=[0, 1, 2, 4, 3])
        scores = g.op("Add", [g.op("MatMul", [q5, kt], name=f"l{i}_qk"), bias], name=f"l{i}_scores")
        probs = g.op("Softmax", [scores], name=f"l{i}_probs", axis=-1)
        ctx = g.op("MatMul", [probs, v5], name=f"l{i}_ctx")  # [B,nkv,rep,S,d]
        ctx = g.op("Reshape", [ctx, g.const([0, nh, -1, d], i64)], name=f"l{i}_ctx4")
        ctx = g.op("Transpose", [ctx], name=f"l{i}_ctxt", perm=[0, 2, 1, 3])  # [B,S,nh,d]
        ctx = g.op("Reshape", [ctx, g.const([-1, nh * d], i64)], name=f"l{i}_ctx2")
        x = g.op("Add", [x, linear(ctx, p + "self_attn.o_proj.weight", f"l{i}_o")], name=f"l{i}_res1")

        h = rms_norm(x, p + "post_attention_layernorm.weight", f"l{i}_ln2")
        gate = linear(h, p + "mlp.gate_proj.weight", f"l{i}_gate")
        up = linear(h, p + "mlp.up_proj.weight", f"l{i}_up")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"l{i}_sig")], name=f"l{i}_silu"), up], name=f"l{i}_act")
        x = g.op("Add", [x, linear(act, p + "mlp.down_proj.weight", f"l{i}_down")], name=f"l{i}_res2")

    x = rms_norm(x, "model.norm.weight", "final_norm")
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

    kv_shape = ["batch", nkv, "past_sequence", d]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, [1]),
    ] + [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in inputs]
    for n in lora_inputs:  # A [rank, in], B [out, rank]
        k, o = layout_in_out(cfg, n)
        shape = ["lora_rank", k] if n.endswith("_a") else [o, "lora_rank"]
        graph_inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, shape))
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept_sequence", cfg.vocab_size])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", nkv, "total_sequence", d]) for n in outputs
    ]
    graph = helper.make_graph(g.nodes, "crayon_llama_decoder", graph_inputs, graph_outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if quant else []), producer_name="crayon-export")
    model.ir_version = 9

    return model
