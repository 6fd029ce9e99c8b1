"""PolyCom experts for Megatron's MoE layer (work in progress in this session)."""

from megatron.core.transformer.spec_utils import ModuleSpec

from polycom_megatron.config import PolyComConfig


def polycom_moe_spec(moe_spec: ModuleSpec, polycom: PolyComConfig) -> ModuleSpec:
    raise ValueError("PolyCom experts for MoE layers are not available in this build")
