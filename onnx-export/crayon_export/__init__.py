"""Crayon export tool: GGUF -> (safetensors, tokenizer.json, chat template, ONNX decoder with KV cache).

Every output folder is self-describing: `config.json` (Hugging Face llama config, so transformers and
other tools can read the folder too), `tokenizer.json`, `tokenizer_config.json` (chat template, special
tokens), `model.safetensors` (float32 weights, Hugging Face names and [out, in] layout), `model.onnx`
(graph only; its initializers point into `model.safetensors`, so the weights exist once on disk) and
`crayon_model.json` (the manifest the Rust engine validates: names, shapes, weight hash).
"""

EXPORTER_VERSION = "0.1.0"
