"""Token-id conventions shared by data and model (same as the official LLaVA code)."""

IGNORE_INDEX = -100  # label value that carries no loss
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids where a sample's media tokens go (one per sample)
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
