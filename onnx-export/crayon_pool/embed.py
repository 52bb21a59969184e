"""Task embedding, mirrored exactly by the Rust engine (src/pool/embed.rs):
mean over the prompt's tokens of layer 0's attention query projection of the RMS-normalized token
embeddings, minus the pool's center (mean over the training set), L2-normalized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

METHOD = "q_proj_mean"


class Embedder:
    def __init__(self, model_dir: Path):
        cfg = json.loads((model_dir / "config.json").read_text())
        self.eps = float(cfg["rms_norm_eps"])
        with safe_open(str(model_dir / "model.safetensors"), "np") as f:
            self.emb = f.get_tensor("model.embed_tokens.weight")
            self.norm = f.get_tensor("model.layers.0.input_layernorm.weight")
            self.wq = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def raw(self, text: str) -> np.ndarray:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError("cannot embed an empty text")
        x = self.emb[ids].astype(np.float64)
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.norm
        return (x @ self.wq.T.astype(np.float64)).mean(axis=0)


# Prompts the Rust side must embed exactly as this module does (tests/pool.rs compares): plain
# English, an olmes-style question, digits and symbols, code, non-ASCII text and a single token.
PARITY_PROMPTS = [
    "What is the capital of France?",
    "Question: Which gas do plants take in from the air?\nAnswer:",
    "Compute 17 * 23 - (4 + 5) = ?",
    "def add(a, b):\n    return a + b  # sum",
    "Ünïcödé: naïve café, 東京, emoji 🙂",
    "yes",
]


def write_parity_reference(embedder: "Embedder", center: np.ndarray, out: Path) -> None:
    """Writes `embedding-reference.json` beside a pool's reference logits: for each parity prompt its
    token ids, raw embedding and pool embedding (centered by `center`, L2-normalized), so the Rust
    engine's task embedding can be checked against this implementation without Python."""
    rows = []
    for text in PARITY_PROMPTS:
        ids = embedder.tok.encode(text, add_special_tokens=False).ids
        raw = embedder.raw(text)
        rows.append({"text": text, "ids": ids, "raw": [float(v) for v in raw],
                     "embedding": [float(v) for v in normalize(raw - center)]})
    out.write_text(json.dumps({"method": METHOD, "prompts": rows}) + "\n")
    out.chmod(0o644)


def normalize(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine) with k-means++ seeding. x: unit rows. Returns (centroids, labels)."""
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(1.0 - x @ np.stack(centroids).T, axis=1).clip(min=0)
        centroids.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    c = np.stack(centroids)
    labels = np.zeros(len(x), dtype=np.int64)
    for it in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            c[j] = normalize(members.mean(axis=0)) if len(members) else x[rng.integers(len(x))]
    return c, labels
