import pytest

from polycom_megatron import variants as V
from polycom_megatron.config import PolyComConfig


def test_widths_match_swiglu_parameters():
    # fc1 + fc2 weights per hidden unit: gated 3 x width, plain 2 x width.
    for name in V.NAMES:
        width = V.ffn_width(name, 1024)
        matrices = 3 if name in V.GATED else 2
        assert matrices * width == 3 * 1024, name


def test_polycom_settings_and_flags():
    assert V.polycom_config("swiglu") is None and V.polycom_config("gelu") is None
    assert V.polycom_config("polynorm-glu", kernel="torch") == PolyComConfig(
        activation="polynorm", gated=True, kernel="torch"
    )
    assert V.activation_flags("polyrelu-glu") == ["--polycom-activation", "polyrelu", "--polycom-gated"]
    assert V.activation_flags("swiglu")[-1] == "--swiglu"
    with pytest.raises(ValueError, match="choose from swiglu, gelu"):
        V.ffn_width("geglu", 8)
