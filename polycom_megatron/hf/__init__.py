"""Hugging Face transformers export and import of PolyCom GPTs.

Importing this package registers ``PolyComGPTConfig`` and the models with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(exported_dir)`` works here without
``trust_remote_code`` (elsewhere the copies of ``configuration.py`` / ``modeling.py`` in
the exported directory serve). Needs the ``hf`` extra: transformers and safetensors.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from polycom_megatron.hf.configuration import PolyComGPTConfig
from polycom_megatron.hf.modeling import PolyComGPTForCausalLM, PolyComGPTModel

AutoConfig.register(PolyComGPTConfig.model_type, PolyComGPTConfig, exist_ok=True)
AutoModel.register(PolyComGPTConfig, PolyComGPTModel, exist_ok=True)
AutoModelForCausalLM.register(PolyComGPTConfig, PolyComGPTForCausalLM, exist_ok=True)

__all__ = ["PolyComGPTConfig", "PolyComGPTForCausalLM", "PolyComGPTModel"]
