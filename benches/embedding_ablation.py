"""Task-embedding ablation (issue #11): how well does each candidate embedding of an app's 5 examples
pick the adapter of the examples' own dataset, in a pool with one adapter per training dataset
(`crayon_pool build --cluster-by task`)? That is the routing accuracy LoRAuter and ARIADNE report; it
needs no model passes, so every variant is measured on hundreds of example sets.

    .venv/bin/python benches/embedding_ablation.py [--sets 60] [--out docs/data/embedding-ablation.json]

Centroids come from the pool's own training mixture (1000 documents per dataset, seed 0, as
scripts/build-pool); the example sets (5 documents each) from the same datasets' *other* training
documents, so no set overlaps a centroid's data. Variants (all on layer 0, all cheap enough for the
device, which embeds in well under a millisecond per example today):

* `q_proj mean, input` — the product today (src/pool/embed.rs): mean over the input's tokens of
  layer 0's query projection of the RMS-normalized token embeddings, centered, L2-normalized;
* `q_proj mean, input + output` — the same over the example's input followed by its output;
* `idf-weighted q_proj mean` — tokens weighted by log(N / document frequency) over the training
  prompts (rare, content-bearing tokens count more: the "semantic token reweighting" idea);
* `token embedding mean` — without the query projection.

Reported: top-1 accuracy (the own dataset's adapter has the highest similarity) with a 95% Wilson
interval, and the mean weight the product's blend (softmax, temperature 0.1) puts on the own adapter.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "onnx-export"))

from crayon_pool.data import TASKS, balanced_mixture, load_task  # noqa: E402
from crayon_pool.embed import Embedder, normalize  # noqa: E402


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    z, p = 1.96, k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


class Variants:
    """Per-token layer-0 features, reduced to one vector per text in each variant's way."""

    def __init__(self, model: Path, idf: np.ndarray | None = None):
        self.e = Embedder(model)
        self.idf = idf

    def tokens(self, text: str) -> list[int]:
        return self.e.tok.encode(text, add_special_tokens=False).ids or [0]

    def normed(self, ids: list[int]) -> np.ndarray:
        x = self.e.emb[ids].astype(np.float64)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.e.eps) * self.e.norm

    def embed(self, variant: str, inp: str, out: str) -> np.ndarray:
        ids = self.tokens(inp + out if variant == "q_proj mean, input + output" else inp)
        x = self.normed(ids)
        if variant == "token embedding mean":
            return x.mean(axis=0)
        if variant == "idf-weighted q_proj mean":
            w = self.idf[ids]
            x = (x * w[:, None]).sum(axis=0) / max(w.sum(), 1e-9)
        else:
            x = x.mean(axis=0)
        return x @ self.e.wq.T.astype(np.float64)


VARIANTS = ["q_proj mean, input", "q_proj mean, input + output", "idf-weighted q_proj mean", "token embedding mean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    ap.add_argument("--sets", type=int, default=60, help="example sets per dataset")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    train = balanced_mixture(1000, 0)
    used = {e.id for e in train}
    rng = random.Random(0)
    sets = {}
    for t in TASKS:
        rest = [e for e in load_task(t) if e.id not in used]
        rng.shuffle(rest)
        sets[t] = [rest[i * args.shots:(i + 1) * args.shots] for i in range(min(args.sets, len(rest) // args.shots))]

    v = Variants(args.model)
    vocab = v.e.emb.shape[0]
    df = np.zeros(vocab)
    for e in train:
        df[list(set(v.tokens(e.prompt)))] += 1
    v.idf = np.log((len(train) + 1) / (df + 1))

    report = {}
    for name in VARIANTS:
        raw = np.stack([v.embed(name, e.prompt, e.answer) for e in train])
        center = raw.mean(axis=0)
        x = normalize(raw - center)
        labels = np.array([TASKS.index(e.task) for e in train])
        cent = normalize(np.stack([x[labels == c].mean(axis=0) for c in range(len(TASKS))]))
        hits, n, own_w, per_task = 0, 0, [], {}
        for ti, t in enumerate(TASKS):
            th = 0
            for s in sets[t]:
                embs = normalize(np.stack([v.embed(name, e.prompt, e.answer) for e in s]) - center)
                sims = (embs @ cent.T).mean(axis=0)  # the product's mean cosine
                w = np.exp((sims - sims.max()) / args.temperature)
                w /= w.sum()
                own_w.append(w[ti])
                th += int(np.argmax(sims) == ti)
            per_task[t] = th / max(len(sets[t]), 1)
            hits += th
            n += len(sets[t])
        lo, hi = wilson(hits, n)
        report[name] = {"top1": hits / n, "top1_ci95": [lo, hi], "own_weight_mean": float(np.mean(own_w)),
                        "sets": n, "per_dataset_top1": per_task}
        print(f"{name:32s} top-1 {100 * hits / n:5.1f}% ({100 * lo:.1f}-{100 * hi:.1f}), "
              f"own-adapter weight {np.mean(own_w):.2f}  per dataset: "
              + " ".join(f"{t}:{100 * a:.0f}" for t, a in per_task.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"shots": args.shots, "temperature": args.temperature, "variants": report},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
