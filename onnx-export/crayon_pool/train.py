"""Training one LoRA adapter per cluster with PEFT, and the blended-model reference for the Rust tests."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import Example

def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device())


def encode(tok, ex: Example, max_prompt_tokens: int, max_answer_tokens: int) -> tuple[list[int], int]:
    """(prompt + answer ids, prompt length). The prompt keeps its end (the question and "Answer:"; long
    BoolQ passages lose their start); the answer keeps its start."""
    ids = tok.encode(ex.prompt, add_special_tokens=False).ids[-max_prompt_tokens:]
    answer = tok.encode(ex.answer, add_special_tokens=False).ids[:max_answer_tokens]
    return ids + answer, len(ids)


def batch_tensors(items: list[tuple[list[int], int]]):
    """Right-padded batch; labels are the answer tokens only (-100 elsewhere)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, n_prompt) in enumerate(items):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, mask, labels


def answer_loss(model, items: list[tuple[list[int], int]]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the answer tokens given their prompts, and their count."""
    ids, mask, labels = (t.to(device()) for t in batch_tensors(items))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((target != -100).sum())


@torch.no_grad()
def heldout_loss(model, data: list[tuple[list[int], int]], batch: int = 16) -> float:
    """Mean per-token answer NLL over `data` (nan when empty)."""
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        loss, n = answer_loss(model, data[i:i + batch])
        total, count = total + float(loss), count + n
    return total / count if count else float("nan")


def train_adapter(model_dir: Path, tok, examples: list[Example], heldout: list[Example], out: Path, *, rank: int,
                  alpha: int, targets: list[str], steps: int, batch: int, lr: float, seed: int, label: str,
                  max_prompt_tokens: int, max_answer_tokens: int, checkpoint_every: int = 20) -> dict:
    """Trains one LoRA on `examples` (answer tokens only), resumable step by step from
    `out/checkpoint.pt`; reports the held-out answer loss of the base and of the adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = [encode(tok, e, max_prompt_tokens, max_answer_tokens) for e in examples]
    held = [encode(tok, e, max_prompt_tokens, max_answer_tokens) for e in heldout]
    model = get_peft_model(load_base(model_dir), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                             lora_dropout=0.0, bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))
    order: list[int] = []
    losses: list[float] = []
    start, seconds = 0, 0.0
    ckpt = out / "checkpoint.pt"
    base_heldout = None
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for p, v in zip(params, state["params"]):
            p.data.copy_(v)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        order, losses, start, seconds = state["order"], state["losses"], state["step"], state["seconds"]
        base_heldout = state["base_heldout"]
        print(f"[crayon-pool] {label}: resuming at step {start}/{steps}", flush=True)
    if base_heldout is None:
        with model.disable_adapter():
            base_heldout = heldout_loss(model, held)
    t0 = time.time() - seconds
    bar = tqdm(range(start, steps), desc=label, unit="step", leave=True, initial=start, total=steps)
    for step in bar:
        if len(order) < batch:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order += fresh
        picked = [data[order.pop()] for _ in range(min(batch, len(data)))]
        loss, n = answer_loss(model, picked)
        (loss / max(n, 1)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss) / max(n, 1))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                        "order": order, "losses": losses, "step": step + 1, "seconds": time.time() - t0,
                        "base_heldout": base_heldout}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    adapter_heldout = heldout_loss(model, held)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: nothing to say here
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = model_dir.name  # not this machine's absolute path
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    to_fp16(out / "adapter_model.safetensors")
    ckpt.unlink(missing_ok=True)
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1),
            "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
            "heldout_examples": len(held), "heldout_loss_base": round(base_heldout, 4),
            "heldout_loss_adapter": round(adapter_heldout, 4)}


def to_fp16(path: Path) -> None:
    """Adapters ship as float16: half the size, and the engine computes the deltas in float32 anyway."""
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


def blend_reference(model_dir: Path, pool_dir: Path, names: list[str], weights: list[float], ids: list[int]) -> np.ndarray:
    """Logits of the base model with `sum_k w_k * scale_k * B_k A_k` merged in, computed by PEFT itself
    (add_weighted_adapter with the exact "cat" combination, then merge_and_unload)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(model_dir), str(pool_dir / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(pool_dir / n), adapter_name=n)
    active = [n for n, w in zip(names, weights) if w != 0.0]
    if len(active) == 1 and weights[names.index(active[0])] == 1.0:
        model.set_adapter(active[0])  # one adapter at weight 1: PEFT's plain path, no blending code involved
    else:
        model.add_weighted_adapter(names, weights, "blend", combination_type="cat")
        model.set_adapter("blend")
    merged = model.merge_and_unload()
    with torch.no_grad():
        return merged(torch.tensor([ids], device=device())).logits[0].float().cpu().numpy()
