"""A device's blend as one PEFT adapter for vLLM (`[remote] kind = "vllm"`, docs/routing.md).

A device names its blend in the request's `model`: `crayon-blend.<device pool id>.<weights>`, the weights
normalized to sum 1 and written as 4 hex digits each (1/65535 steps). On the vLLM host, the resolver below
(a vLLM LoRA resolver plugin) turns such a name into a PEFT adapter the first time it is asked for: the
server pool paired with that device pool, concatenated exactly —

    A = [A_1; ...; A_K]   (rank R = sum r_k),   B = [c_1 B_1, ..., c_K B_K],   c_k = w_k * alpha_k / r_k,
    lora_alpha = R        (PEFT's scaling alpha / r = 1),

so that B A = sum_k w_k (alpha_k / r_k) B_k A_k, the delta a Crayon server merges. The adapter is written
once per blend into a cache folder named by its hash. vLLM needs `--enable-lora --max-lora-rank` of at least
R (32 for 8 adapters of rank 4) and runtime LoRA loading:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_PLUGINS=crayon_blend \\
    CRAYON_VLLM_POOLS=/srv/pools/qwen2.5-coder-0.5b-instruct CRAYON_VLLM_CACHE=/var/cache/crayon-vllm \\
    vllm serve Qwen/Qwen2.5-Coder-0.5B-Instruct --enable-lora --max-lora-rank 32

with `pip install --no-deps ./onnx-export` (onnx-export/pyproject.toml: the `crayon_blend` entry point of
the `vllm.general_plugins` group). Why a resolver and not `/v1/load_lora_adapter`: that endpoint takes a path on the
vLLM host, which a device in the field can neither write nor name; a resolver runs on the host, next to
the server pool.

    python -m crayon_pool vllm-adapter --pool ../pools/qwen2.5-coder-0.5b-instruct --weights 0.5,0.5,0,... --out DIR

materializes one blend by hand (what the resolver does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

PREFIX = "crayon-blend"
_NAME = re.compile(r"^crayon-blend\.(?P<pool>[A-Za-z0-9._-]+)\.(?P<weights>(?:[0-9a-f]{4})+)$")


def blend_name(device_pool_id: str, weights: list[float]) -> str:
    total = float(sum(weights))
    if not weights or total <= 0 or any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError("blend weights must be finite, non-negative, and not all zero")
    # floor(x + 0.5), not round(): the same digits as the device computes them (src/router/remote.rs)
    return f"{PREFIX}.{device_pool_id}." + "".join(f"{int(w / total * 65535 + 0.5):04x}" for w in weights)


def parse_name(name: str) -> tuple[str, list[float]] | None:
    """The device pool id and normalized weights a blend name carries; None for other names."""
    m = _NAME.match(name)
    if not m:
        return None
    hexes = m.group("weights")
    raw = [int(hexes[i:i + 4], 16) for i in range(0, len(hexes), 4)]
    total = sum(raw)
    if total == 0:
        return None
    return m.group("pool"), [r / total for r in raw]


def materialize(pool_dir: Path, weights: list[float], out: Path) -> Path:
    """Writes the blend of `pool_dir`'s adapters with `weights` (normalized here) as one PEFT adapter."""
    pool = json.loads((pool_dir / "pool.json").read_text())
    adapters = pool["adapters"]
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for a pool of {len(adapters)} adapters")
    total = float(sum(weights))
    if total <= 0 or any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError("blend weights must be finite, non-negative, and not all zero")
    tensors = [load_file(str(pool_dir / a["dir"] / "adapter_model.safetensors")) for a in adapters]
    configs = [json.loads((pool_dir / a["dir"] / "adapter_config.json").read_text()) for a in adapters]
    # Every adapted matrix any adapter touches, by its name before ".lora_A.weight".
    bases = sorted({k[: -len(".lora_A.weight")] for t in tensors for k in t if k.endswith(".lora_A.weight")})
    rank = sum(int(c["r"]) for c in configs)
    merged = {}
    for base in bases:
        shape_a = next(t[base + ".lora_A.weight"].shape for t in tensors if base + ".lora_A.weight" in t)
        shape_b = next(t[base + ".lora_B.weight"].shape for t in tensors if base + ".lora_B.weight" in t)
        a_parts, b_parts = [], []
        for w, t, c in zip(weights, tensors, configs):
            r = int(c["r"])
            a = t.get(base + ".lora_A.weight")
            b = t.get(base + ".lora_B.weight")
            if a is None:  # this adapter leaves the matrix alone: a zero block keeps the rank uniform
                a, b = np.zeros((r, shape_a[1]), np.float32), np.zeros((shape_b[0], r), np.float32)
            a_parts.append(a.astype(np.float32))
            b_parts.append(b.astype(np.float32) * np.float32(w / total * float(c["lora_alpha"]) / r))
        merged[base + ".lora_A.weight"] = np.ascontiguousarray(np.concatenate(a_parts, axis=0))
        merged[base + ".lora_B.weight"] = np.ascontiguousarray(np.concatenate(b_parts, axis=1))
    config = dict(configs[0])
    config.update({
        "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {},
        "target_modules": sorted({m for c in configs for m in c["target_modules"]}),
    })
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(merged, str(tmp))
    tmp.replace(out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return out


class BlendCache:
    """Blend names to adapter folders: each server pool answers for the device pool it is paired with
    (or its own id); each blend is materialized once, under its hash."""

    def __init__(self, pool_dirs: list[Path], cache_dir: Path):
        self.pools = {}
        for d in pool_dirs:
            p = json.loads((Path(d) / "pool.json").read_text())
            for pool_id in filter(None, [p.get("paired_with"), p["pool_id"]]):
                self.pools[pool_id] = Path(d)
        self.cache_dir = Path(cache_dir)

    def folder(self, name: str) -> Path | None:
        parsed = parse_name(name)
        if parsed is None or parsed[0] not in self.pools:
            return None
        out = self.cache_dir / hashlib.sha256(name.encode()).hexdigest()[:24]
        if not (out / "adapter_config.json").is_file():
            materialize(self.pools[parsed[0]], parsed[1], out)
        return out


def register():
    """vLLM general plugin entry point: registers the resolver (needs vLLM's LoRA resolver API)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    cache = BlendCache([Path(p) for p in os.environ.get("CRAYON_VLLM_POOLS", "").split(",") if p],
                       Path(os.environ.get("CRAYON_VLLM_CACHE", "/var/cache/crayon-vllm")))

    class CrayonBlendResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str):
            folder = cache.folder(lora_name)
            if folder is None:
                return None
            return LoRARequest(lora_name=lora_name, lora_path=str(folder),
                               lora_int_id=int(hashlib.sha256(lora_name.encode()).hexdigest()[:7], 16))

    LoRAResolverRegistry.register_resolver("crayon_blend", CrayonBlendResolver())


def main(args):
    weights = [float(w) for w in args.weights.split(",")]
    out = materialize(args.pool, weights, args.out)
    print(f"[crayon-pool] blend of {len(weights)} adapters -> {out}")
