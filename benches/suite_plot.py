"""Plot of the customization benchmark (benches/suite.rs): accuracy per method with 95% bootstrap
intervals, and the hybrid curve (accuracy against share offloaded).

    .venv/bin/python benches/suite_plot.py results.json plot.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def pooled(results, name, rng=None):
    per_task = [np.array(r["methods"][name]["right"], dtype=float) for r in results if name in r["methods"]]
    if rng is None:
        return 100 * np.concatenate(per_task).mean()
    return 100 * np.concatenate([t[rng.integers(0, len(t), len(t))] for t in per_task]).mean()


def main(src: str, dst: str) -> None:
    results = json.load(open(src))
    names = [n for n in results[0]["methods"] if not n.startswith(("sweep", "single adapter"))]
    rng = np.random.default_rng(0)
    acc = [pooled(results, n) for n in names]
    boot = [[pooled(results, n, rng) for _ in range(1000)] for n in names]
    lo = [a - np.percentile(b, 2.5) for a, b in zip(acc, boot)]
    hi = [np.percentile(b, 97.5) - a for a, b in zip(acc, boot)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    order = np.argsort(acc)
    ax1.barh([names[i] for i in order], [acc[i] for i in order], xerr=[[lo[i] for i in order], [hi[i] for i in order]],
             color=["#d95f02" if "Crayon" in names[i] else "#7570b3" for i in order])
    ax1.set_xlabel("accuracy % (95% bootstrap CI)")
    ax1.set_title(f"{len(results)} tasks, {sum(len(r['methods'][names[0]]['right']) for r in results)} questions")
    for server, label in [("server + Crayon blend", "unsure → server + blend"),
                          ("server plain model", "unsure → server plain model")]:
        if not all(server in r["methods"] for r in results):
            continue
        xs, ys = [], []
        for t in np.linspace(0, 1.01, 41):
            right, off, n = 0, 0, 0
            for r in results:
                d, s = r["methods"]["Crayon blend"], r["methods"][server]
                # The routing confidence (consensus by default), or the margin in older files.
                conf = d.get("confidence") or d["margin"]
                for mg, dr, sr in zip(conf, d["right"], s["right"]):
                    n += 1
                    if mg < t:
                        off += 1
                        right += sr
                    else:
                        right += dr
            xs.append(100 * off / n)
            ys.append(100 * right / n)
        ax2.plot(xs, ys, marker=".", label=label)
    ax2.axhline(pooled(results, "Crayon blend"), color="#d95f02", ls=":", lw=1, label="device Crayon blend alone")
    ax2.set_xlabel("share of questions offloaded to the server %")
    ax2.set_ylabel("accuracy %")
    ax2.set_title("hybrid: device Crayon blend; unsure → server")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"plot -> {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
