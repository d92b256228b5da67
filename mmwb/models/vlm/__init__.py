"""mmwb's vision-language models: the model (tower -> projector -> language model, image features spliced at the
prompt's placeholders), its prompt format, its own checkpoint folder, and the import of LLaVA and Kimi-VL
checkpoints."""

from mmwb.models.vlm.checkpoint import load_any_vlm, load_vlm
from mmwb.models.vlm.model import VisionLanguageModel, VLMConfig, VLMOutput

__all__ = ["VLMConfig", "VLMOutput", "VisionLanguageModel", "load_any_vlm", "load_vlm"]
