"""Summarize an ONNX Runtime profile (written with runtime.profile / `cargo bench --bench engine -- --profile P`):
share of kernel time per operator type, split into prefill runs (many tokens) and decode runs (one token).

    python benches/profile_summary.py PROFILE.json
"""

import collections
import json
import sys


def main(path: str) -> None:
    events = json.load(open(path))
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    # A run is "prefill" when it is much longer than the median run (the decode steps dominate in count).
    durs = sorted(r["dur"] for r in runs)
    median = durs[len(durs) // 2] if durs else 0
    spans = [(r["ts"], r["ts"] + r["dur"], "prefill" if r["dur"] > 4 * median else "decode") for r in runs]
    per = {"prefill": collections.Counter(), "decode": collections.Counter()}
    n_runs = collections.Counter(kind for _, _, kind in spans)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        kind = next((k for a, b, k in spans if a <= e["ts"] <= b), None)
        if kind:
            per[kind][e["args"].get("op_name", "?")] += e["dur"]
    for kind, counter in per.items():
        total = sum(counter.values())
        if not total:
            continue
        print(f"\n{kind}: {n_runs[kind]} runs, {total / n_runs[kind] / 1000:.2f} ms of kernel time per run")
        print("| op | share |\n|---|---|")
        for op, t in counter.most_common(10):
            print(f"| {op} | {t / total:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1])
