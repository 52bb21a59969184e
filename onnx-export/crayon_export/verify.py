"""Self-check of an exported folder against an independent reference implementation.

The reference is Hugging Face transformers running on PyTorch (CPU):
- for a GGUF export, transformers dequantizes and un-permutes the GGUF *itself* (its own GGUF loader),
  so the check covers our dequantization, Q/K un-permutation, tied embeddings and the ONNX graph;
- for the tiny random model, transformers' LlamaForCausalLM is loaded from our safetensors, which covers
  the ONNX graph.
The ONNX model runs twice: one full pass, and a KV-cache pass (prefill, then one token at a time), and
both must match the reference logits within the tolerance. Failing checks raise VerificationError.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import save_file
from tokenizers import Tokenizer

ATOL = 1e-3  # max |logit difference|; logits of these models span roughly [-30, 30]
PROMPT_QUESTION = "What is the capital of France? Answer in one sentence."
TOKENIZER_PROBES = [
    "Hello world! 12345 naïve café — ünïcödé 😀",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, tabs\tand\nnewlines\n\nx = 3.14159 * y**2 + z_1;",
    "def f(x):\n    return x * 2  # comment",
]
# transformers' GGUF tokenizer converter omits SmolLM's digit pre-split (llama.cpp's "smollm" pre-type and
# the original tokenizer.json both split digits first), so whitespace directly before a digit
# ("\n\n3") tokenizes differently there; the probes avoid that one known divergence of the reference.
GREEDY_TOKENS = 24


class VerificationError(RuntimeError):
    pass


def chat_prompt(template: str, question: str) -> str:
    import jinja2

    env = jinja2.Environment()
    return env.from_string(template).render(messages=[{"role": "user", "content": question}], add_generation_prompt=True)


def ort_session(folder: Path, threads: int = 2, graph: str = "model.onnx") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(folder / graph), so, providers=["CPUExecutionProvider"])


def exact_variant(folder: Path) -> str:
    """A copy of a 4-bit folder's graph whose MatMulNBits compute in float32 (accuracy_level 0) instead of
    on int8-quantized activations: with the weights' blocks decoded exactly, it must match the float32
    reference as tightly as the float32 graph does. Written next to model.onnx (external data resolves
    against the folder); the caller deletes it."""
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    name = ".verify-exact.onnx"
    onnx.save_model(m, str(folder / name))
    return name


def ort_run(sess, cfg: dict, ids: np.ndarray, past: list | None, start: int, keep: int):
    """One forward pass: ids [S] appended after `start` cached positions; returns (logits [keep,V], present).
    The past is passed at its exact length, so each present is a new, longer tensor (the engine instead binds
    past and present to one buffer of fixed capacity: tests/kv_cache.rs checks that both agree)."""
    n_layers, nkv, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    S = len(ids)
    feeds = {
        "input_ids": ids[None, :].astype(np.int64),
        "seqlens_k": np.array([start + S - 1], np.int32),
        "total_sequence_length": np.array(start + S, np.int32),
        "num_logits_to_keep": np.array([keep], np.int64),
    }
    for i in range(n_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = past[2 * i + (kind == "value")] if past else np.zeros((1, nkv, 0, d), np.float32)
    out = sess.run(None, feeds)
    return out[0][0], out[1:]


# The shipped 4-bit graph quantizes activations to int8 per block (as llama.cpp does); its logits are held
# to top-token agreement with the reference instead of a tolerance.
MIN_TOP1_AGREEMENT = 0.9


def check_logits(name: str, got: np.ndarray, want: np.ndarray, atol: float | None = ATOL) -> tuple[float, float]:
    diff = float(np.max(np.abs(got - want)))
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    bound = f"tolerance {atol:.0e}" if atol is not None else f"top-1 agreement must be >= {MIN_TOP1_AGREEMENT:.0%}"
    print(f"  {name}: max |diff| = {diff:.2e} ({bound}), top-1 agreement {agree:.1%}")
    if not np.isfinite(diff) or (atol is not None and diff > atol):
        raise VerificationError(f"{name}: logits differ by {diff:.3e} > {atol:.0e}")
    if atol is None and agree < MIN_TOP1_AGREEMENT:
        raise VerificationError(f"{name}: top-1 agreement {agree:.1%} < {MIN_TOP1_AGREEMENT:.0%}")
    return diff, agree


def verify_graph(folder: Path, cfg: dict, ids: np.ndarray, ref_logits: np.ndarray, graph: str = "model.onnx",
                 atol: float | None = ATOL, label: str = "ONNX") -> dict:
    sess = ort_session(folder, graph=graph)
    S = len(ids)
    full, _ = ort_run(sess, cfg, ids, None, 0, S)
    diff, agree = check_logits(f"{label} full pass vs reference", full, ref_logits, atol)
    stats = {"full_pass_max_abs_diff": diff, "full_pass_top1_agreement": agree}
    split = max(1, S - 6)
    first, past = ort_run(sess, cfg, ids[:split], None, 0, 1)
    steps = [first[-1]]
    for t in range(split, S):
        logit, past = ort_run(sess, cfg, ids[t : t + 1], past, t, 1)
        steps.append(logit[-1])
    diff, agree = check_logits(f"{label} prefill+decode (KV cache) vs reference", np.stack(steps), ref_logits[split - 1 :], atol)
    stats.update(kv_cache_max_abs_diff=diff, kv_cache_top1_agreement=agree)
    return stats


def verify_quantized(folder: Path, cfg: dict, ids: np.ndarray, ref_logits: np.ndarray) -> dict:
    exact = exact_variant(folder)
    try:
        stats = {"exact_compute": verify_graph(folder, cfg, ids, ref_logits, exact, ATOL, "4-bit graph, float32 compute")}
    finally:
        (folder / exact).unlink(missing_ok=True)
    stats["int8_compute"] = verify_graph(folder, cfg, ids, ref_logits, "model.onnx", None, "4-bit graph as shipped")
    return stats


def torch_reference_from_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    print(f"  transformers loaded the GGUF itself in {time.time() - t0:.1f}s")
    return tok, model.eval()


def torch_reference_from_folder(folder: Path, precision: str = "f32"):
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import json

    cfg = LlamaConfig(**json.loads((folder / "config.json").read_text()))
    model = LlamaForCausalLM(cfg).to(torch.float32)
    state = load_file(str(folder / "model.safetensors"))
    if precision == "q4":  # the reference runs on the weights the 4-bit blocks decode to
        import torch

        from .quant import dequantize_tensors

        state = {k: torch.from_numpy(v) for k, v in dequantize_tensors({k: v.numpy() for k, v in state.items()}).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise VerificationError(f"reference could not load weights: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def verify(folder: Path, cfg: dict, chat_template: str, gguf: Path | None, precision: str = "f32") -> dict:
    import torch

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if gguf is not None:
        hf_tok, model = torch_reference_from_gguf(gguf)
        for s in TOKENIZER_PROBES:
            ours = tok.encode(s, add_special_tokens=False).ids
            theirs = hf_tok.encode(s, add_special_tokens=False)
            if ours != theirs:
                raise VerificationError(f"tokenizer mismatch on {s!r}: ours {ours[:12]}... vs transformers {theirs[:12]}...")
            if tok.decode(ours, skip_special_tokens=False) != s:
                raise VerificationError(f"tokenizer does not round-trip {s!r}")
        print(f"  tokenizer.json matches transformers' GGUF tokenizer on {len(TOKENIZER_PROBES)} probe strings")
    else:
        model = torch_reference_from_folder(folder, precision)

    prompt = chat_prompt(chat_template, PROMPT_QUESTION)
    ids = np.array(tok.encode(prompt, add_special_tokens=False).ids, dtype=np.int64)
    with torch.no_grad():
        ref_logits = model(torch.from_numpy(ids)[None, :]).logits[0].float().numpy()
        seq = torch.from_numpy(ids)[None, :]
        for _ in range(GREEDY_TOKENS):  # plain full-recompute greedy loop: no cache, no stopping rules
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    greedy = seq[0, len(ids):].numpy().astype(np.int64)
    stats = verify_quantized(folder, cfg, ids, ref_logits) if precision == "q4" else verify_graph(folder, cfg, ids, ref_logits)
    answer = tok.decode(greedy.tolist(), skip_special_tokens=False)
    print(f"  reference greedy continuation: {answer!r}")
    save_file({"input_ids": ids, "logits": ref_logits.astype(np.float32), "greedy_ids": greedy}, str(folder / "reference.safetensors"))
    (folder / "reference.safetensors").chmod(0o644)
    stats.update(prompt=prompt, greedy_text=answer, atol=ATOL, reference="transformers " + __import__("transformers").__version__)
    return stats
