"""crayon-pool: build the base LoRA adapter pool (embed, cluster, train one LoRA per cluster)."""

POOL_FORMAT = "crayon-pool/1"
