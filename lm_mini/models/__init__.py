"""The model: ``encoders`` ``compressors`` ``projector`` ``prefusion`` ``llm`` and ``llava_mini`` that joins them.

``from lm_mini.models import LlavaMini`` imports the model lazily, so that the data pipeline
(which only needs ``encoders.image_preprocessing``) does not pay for importing transformers.
"""
__all__ = ["LlavaMini", "PreFusion"]


def __getattr__(name):
    if name == "LlavaMini":
        from lm_mini.models.llava_mini import LlavaMini

        return LlavaMini
    if name == "PreFusion":
        from lm_mini.models.prefusion import PreFusion

        return PreFusion
    raise AttributeError(f"module 'lm_mini.models' has no attribute '{name}'")
