"""A pool's adapters as GGUF LoRA files for llama.cpp's server (`[remote] kind = "llama-server"`).

    python -m crayon_pool gguf-lora --pool ../pools/qwen2.5-coder-0.5b-instruct \
        --base ../models/qwen2.5-coder-0.5b-instruct --out ../models/llama-server/lora/qwen2.5-coder-0.5b-instruct

Each PEFT adapter of the pool is converted by llama.cpp's own `convert_lora_to_gguf.py` (from the llama.cpp
sources of the pinned llama-cpp-python sdist, `--llama-cpp` or $CRAYON_LLAMA_CPP_SRC; scripts/build-llama-server
fetches them), float32, keeping its alpha, so that llama.cpp applies `scale * alpha/rank * B A x` — with
`scale` the device's normalized blend weight, exactly the delta a Crayon server merges.

The file names say which blend they serve: `<device pool id>.<index>.<adapter>.gguf`, where the device pool
id is the one a device sends with its blend (the pool this one is paired with, or the pool itself). A device
reads them from the server's `GET /lora-adapters` and maps its weights by index; the order of `--lora`
arguments does not matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def log(msg: str):
    print(f"[crayon-pool] {msg}", flush=True)


def file_name(device_pool_id: str, index: int, adapter: str) -> str:
    if "." in adapter or "/" in adapter:
        raise ValueError(f"adapter name {adapter!r} must not contain '.' or '/'")
    return f"{device_pool_id}.{index:02d}.{adapter}.gguf"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def convert_pool(pool_dir: Path, base: Path, out: Path, llama_cpp: Path):
    converter = llama_cpp / "convert_lora_to_gguf.py"
    if not converter.is_file():
        sys.exit(f"[crayon-pool] error: {converter} not found: give --llama-cpp (the llama.cpp source folder; "
                 "scripts/build-llama-server fetches it)")
    if not (base / "config.json").is_file():
        sys.exit(f"[crayon-pool] error: {base} has no config.json (a model folder written by crayon-export)")
    pool = json.loads((pool_dir / "pool.json").read_text())
    device_pool_id = pool.get("paired_with") or pool["pool_id"]
    out.mkdir(parents=True, exist_ok=True)
    stamps_path = out / "sources.json"
    stamps = json.loads(stamps_path.read_text()) if stamps_path.is_file() else {}
    wanted = set()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp / "gguf-py"), str(llama_cpp)]))
    for i, a in enumerate(pool["adapters"]):
        name = file_name(device_pool_id, i, a["name"])
        wanted.add(name)
        src = pool_dir / a["dir"]
        source = digest(src / "adapter_model.safetensors") + "/" + digest(src / "adapter_config.json")
        if (out / name).is_file() and stamps.get(name) == source:
            continue
        log(f"converting {src} -> {out / name}")
        tmp = out / (name + ".tmp")
        r = subprocess.run([sys.executable, str(converter), "--base", str(base), "--outtype", "f32",
                            "--outfile", str(tmp), str(src)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            sys.exit(f"[crayon-pool] error: convert_lora_to_gguf.py failed on {src}:\n{r.stderr[-3000:]}")
        tmp.replace(out / name)
        stamps[name] = source
    # Adapters of an earlier build of the pool would be loaded too: a stale file is a wrong blend.
    for old in out.glob("*.gguf"):
        if old.name not in wanted:
            old.unlink()
            stamps.pop(old.name, None)
    stamps_path.write_text(json.dumps(stamps, indent=1, sort_keys=True) + "\n")
    log(f"{len(wanted)} GGUF LoRA adapters for blends of pool '{device_pool_id}' in {out}")


def main(args):
    llama_cpp = args.llama_cpp or os.environ.get("CRAYON_LLAMA_CPP_SRC")
    if not llama_cpp:
        sys.exit("[crayon-pool] error: give --llama-cpp or set CRAYON_LLAMA_CPP_SRC (llama.cpp source folder)")
    convert_pool(args.pool, args.base, args.out, Path(llama_cpp))
