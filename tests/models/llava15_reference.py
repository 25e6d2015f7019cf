"""transformers' ``LlavaForConditionalGeneration`` carrying one of our models' weights: the LLaVA-1.5
reference that our identity compressor without pre-fusion must reproduce exactly."""
from transformers import LlavaConfig, LlavaForConditionalGeneration


def llava15_twin(model, image_token_id: int, select_strategy: str) -> LlavaForConditionalGeneration:
    """HF LLaVA with ``model``'s encoder, 2-layer MLP projector and LLM weights, in eval mode.

    select_strategy: HF's ``vision_feature_select_strategy``: ``default`` drops CLS (our ``patch``),
    ``full`` keeps it (our ``cls_patch``).
    """
    hf = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=model.encoder.model.config, text_config=model.llm.config, image_token_id=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy=select_strategy, projector_hidden_act="gelu")).eval()
    hf.model.vision_tower.load_state_dict(model.encoder.model.state_dict())
    hf.model.multi_modal_projector.linear_1.load_state_dict(model.projector[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(model.projector[2].state_dict())
    hf.model.language_model.load_state_dict(model.llm.model.state_dict())
    hf.lm_head.load_state_dict(model.llm.lm_head.state_dict())
    return hf
