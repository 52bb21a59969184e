"""Plot of the long-input benchmark (benches/longctx.rs): passkey accuracy with 95% Wilson intervals
per policy against input length, and the KV cache each held.

    .venv/bin/python benches/longctx_plot.py docs/data/longctx.json docs/img/longctx.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str) -> None:
    doc = json.load(open(src))
    rows = [r for r in doc["rows"] if "accuracy" in r]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, (acc, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for i, p in enumerate(policies):
        rs = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["tokens"])
        x = [r["tokens"] * (1 + 0.03 * (i - 2)) for r in rs]  # small offsets keep the bars apart
        y = [r["accuracy"] for r in rs]
        err = [[r["accuracy"] - r["ci95"][0] for r in rs], [r["ci95"][1] - r["accuracy"] for r in rs]]
        acc.errorbar(x, y, yerr=err, marker="o", capsize=3, label=p)
        mem.plot([r["tokens"] for r in rs], [r["kv_mb_max"] for r in rs], marker="o", label=p)
    for ax in (acc, mem):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input tokens")
        ax.legend(fontsize=8)
    acc.set_ylabel("passkey found, % (95% CI)")
    acc.set_title(f"pot {doc['pot_tokens']} entries, {doc['samples']} prompts per point")
    mem.set_ylabel("KV cache held, MB")
    mem.set_title("memory")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
