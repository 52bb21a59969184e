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


def encode(tok, ex: Example, max_prompt_tokens: int) -> tuple[list[int], int]:
    # Keep the end: the question, the options and "Answer:" (long BoolQ passages lose their start).
    ids = tok.encode(ex.prompt, add_special_tokens=False).ids[-max_prompt_tokens:]
    answer = tok.encode(ex.answer, add_special_tokens=False).ids
    return ids, answer[0]


def batch_tensors(items: list[tuple[list[int], int]]):
    """Left-padded batch: the answer is predicted at the last position of every row."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (seq, _) in enumerate(items):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    target = torch.tensor([t for _, t in items])
    return ids, mask, pos, target


def train_adapter(model_dir: Path, tok, examples: list[Example], out: Path, *, rank: int, alpha: int,
                  targets: list[str], steps: int, batch: int, lr: float, seed: int, label: str,
                  max_prompt_tokens: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = [encode(tok, e, max_prompt_tokens) for e in examples]
    model = get_peft_model(load_base(model_dir), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                             lora_dropout=0.0, bias="none"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * (1 - s / steps))
    order: list[int] = []
    losses = []
    t0 = time.time()
    bar = tqdm(range(steps), desc=label, unit="step", leave=True)
    for _ in bar:
        if len(order) < batch:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order += fresh
        picked = [data[order.pop()] for _ in range(min(batch, len(data)))]
        ids, mask, pos, target = (t.to(device()) for t in batch_tensors(picked))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: nothing to say here
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = model_dir.name  # not this machine's absolute path
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    to_fp16(out / "adapter_model.safetensors")
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1),
            "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:]))}


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
