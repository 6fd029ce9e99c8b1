"""Building a Megatron GPTModel with PolyCom MLPs: the model provider shared by the
launcher, the CPU training loop, the benchmarks and the tests."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer.transformer_config import TransformerConfig

from polycom_megatron.config import PolyComConfig
from polycom_megatron.specs import get_gpt_block_spec, with_local_norms


def build_gpt_model(
    config: TransformerConfig,
    polycom: Optional[PolyComConfig],
    vocab_size: int,
    max_sequence_length: int,
    use_te: bool = False,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    share_embeddings_and_output_weights: bool = False,
    position_embedding_type: str = "rope",
) -> GPTModel:
    """A GPTModel for this pipeline stage; ``polycom=None`` builds Megatron's stock MLP
    (the SwiGLU/GELU baseline), so both arms of a comparison share this code."""
    if polycom is None:
        spec = gpt_layer_specs.get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=use_te,
            normalization=config.normalization,
            vp_stage=vp_stage,
        )
        if not use_te:
            spec = with_local_norms(spec)
    else:
        spec = get_gpt_block_spec(config, polycom, use_te=use_te, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        vp_stage=vp_stage,
    )
