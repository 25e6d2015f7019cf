"""Token-id conventions shared by data and model (same as the official LLaVA code)."""

IGNORE_INDEX = -100  # label value that carries no loss
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids where a sample's media tokens go (one per sample)
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
# model.attn_implementation: names in transformers' attention registry (xformers registered by lm_mini.models.attention)
ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attention_2", "xformers")
CUDA_ONLY_ATTENTION = ("flash_attention_2", "xformers")
