"""Plot of the long-input benchmark (benches/longctx.rs): accuracy with 95% Wilson intervals per policy
against input length, one panel per task (passkey, multi-fact), and the KV cache each policy held.

    .venv/bin/python benches/longctx_plot.py docs/data/longctx.json docs/img/longctx.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLES = {"passkey": "passkey found", "multifact": "multi-fact: the asked number, no other"}


def main(src: str, out: str) -> None:
    doc = json.load(open(src))
    rows = [r for r in doc["rows"] if "accuracy" in r]
    for r in rows:
        r.setdefault("task", "passkey")  # files written before the multi-fact task
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.5 * (len(tasks) + 1), 4))
    mem = axes[-1]
    for ax, task in zip(axes, tasks):
        for i, p in enumerate(policies):
            rs = sorted((r for r in rows if r["policy"] == p and r["task"] == task), key=lambda r: r["tokens"])
            x = [r["tokens"] * (1 + 0.03 * (i - 2)) for r in rs]  # small offsets keep the bars apart
            y = [r["accuracy"] for r in rs]
            err = [[r["accuracy"] - r["ci95"][0] for r in rs], [r["ci95"][1] - r["accuracy"] for r in rs]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=p)
            if task == tasks[0]:
                mem.plot([r["tokens"] for r in rs], [r["kv_mb_max"] for r in rs], marker="o", label=p)
        ax.set_ylabel(f"{TITLES.get(task, task)}, % (95% CI)")
        ax.set_title(f"{task}: pot {doc['pot_tokens']} entries, {doc['samples']} prompts per point")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input tokens")
        ax.legend(fontsize=8)
    mem.set_ylabel("KV cache held, MB")
    mem.set_title("memory")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
