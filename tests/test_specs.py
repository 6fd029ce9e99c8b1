"""with_polycom rewrites Megatron specs without touching anything but the MLP."""

import pytest
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from polycom_megatron import PolyComConfig, compat, get_gpt_layer_spec, with_polycom
from polycom_megatron.layers import PolyComActivation, PolyComMLP
from polycom_megatron.layers.norm import LocalNorm


def test_local_layer_spec_gets_polycom_mlp_and_keeps_the_rest():
    base = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    polycom = PolyComConfig(activation="polyrelu", order=2)
    spec = with_polycom(base, polycom)
    # A ModuleSpec up to 0.17, a partial(PolyComMLP.as_mlp_submodule, ...) from 0.18.
    module, submodules, _ = compat.mlp_spec_parts(spec.submodules.mlp)
    base_module, base_submodules, _ = compat.mlp_spec_parts(base.submodules.mlp)
    assert type(spec.submodules.mlp) is type(base.submodules.mlp)
    assert module is PolyComMLP
    assert submodules.linear_fc1 is base_submodules.linear_fc1
    assert submodules.activation_func.func is PolyComActivation
    assert submodules.activation_func.keywords == {"polycom": polycom}
    assert spec.submodules.self_attention is base.submodules.self_attention
    assert base_module is MLP, "Megatron's shared spec must not be mutated"
    assert base_submodules.activation_func is None


def test_local_builder_uses_sequence_parallel_capable_norms():
    spec = get_gpt_layer_spec(PolyComConfig(), use_te=False)
    assert spec.submodules.input_layernorm is LocalNorm
    assert spec.submodules.pre_mlp_layernorm is LocalNorm
    assert WrappedTorchNorm is not LocalNorm


def test_te_op_fuser_mlp_is_refused():
    te = pytest.importorskip("transformer_engine", reason="needs Transformer Engine (CUDA)")
    assert te
    base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(use_te_op_fuser=True)
    with pytest.raises(ValueError, match="--use-te-op-fuser"):
        with_polycom(base, PolyComConfig())


def test_te_spec_keeps_te_linears():
    pytest.importorskip("transformer_engine", reason="needs Transformer Engine (CUDA)")
    base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = with_polycom(base, PolyComConfig())
    module, submodules, _ = compat.mlp_spec_parts(spec.submodules.mlp)
    assert module is PolyComMLP
    assert submodules.linear_fc1 is compat.mlp_spec_parts(base.submodules.mlp)[1].linear_fc1
