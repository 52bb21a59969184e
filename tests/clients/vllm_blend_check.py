"""tests/vllm.rs: materialize one blend of a server pool as the vLLM resolver would, load it with PEFT on
the pool's base model, and print the blend's name and the logits of the last position as JSON.

    python vllm_blend_check.py REPO MODEL_DIR POOL_DIR WEIGHTS_JSON IDS_JSON CACHE_DIR
"""
import json
import sys
from pathlib import Path

repo, model_dir, pool_dir, weights, ids, cache = sys.argv[1:7]
sys.path.insert(0, str(Path(repo) / "onnx-export"))
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from crayon_pool.vllm_blend import BlendCache, blend_name, parse_name  # noqa: E402

pool = json.loads((Path(pool_dir) / "pool.json").read_text())
name = blend_name(pool.get("paired_with") or pool["pool_id"], json.loads(weights))
folder = BlendCache([Path(pool_dir)], Path(cache)).folder(name)
config = json.loads((folder / "adapter_config.json").read_text())
base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, str(folder)).eval()
with torch.no_grad():
    logits = model(torch.tensor([json.loads(ids)])).logits[0, -1].tolist()
print(json.dumps({"name": name, "weights": parse_name(name)[1], "rank": config["r"], "logits": logits}))
