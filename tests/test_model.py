import math

import pytest
import torch

from widedeep.config import make_config
from widedeep.model import (
    MLP,
    WideDeep,
    build_model,
    count_parameters,
    cross_features,
    linear_layers,
)


def test_lecture_shape():
    model = build_model(make_config(preset="lecture"), 8, 2)
    shapes = [tuple(layer.weight.shape) for _, layer in linear_layers(model)]
    assert shapes == [(6, 8), (4, 6), (1, 4)]
    assert count_parameters(model) == 6 * 8 + 6 + 4 * 6 + 4 + 4 + 1


def test_multiclass_head_has_one_logit_per_class():
    model = build_model(make_config(widths=(5,)), 4, 3)
    assert model(torch.randn(2, 4)).shape == (2, 3)


def test_widedeep_output_is_wide_plus_deep_logit():
    torch.manual_seed(0)
    model = build_model(make_config(arch="widedeep", cross=True, widths=(5, 3)), 4, 2)
    assert isinstance(model, WideDeep)
    x = torch.randn(7, 4)
    expected = model.wide(torch.cat([x, cross_features(x)], dim=1)) + model.deep(x)
    assert torch.allclose(model(x), expected)
    assert torch.allclose(model(x), model.wide_logit(x) + model.deep_logit(x))
    assert model.wide.in_features == 4 + 6


def test_cross_features_are_pairwise_products():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert cross_features(x).tolist() == [[2.0, 3.0, 6.0]]


@pytest.mark.parametrize("init,std", [
    ("lecun", lambda fi, fo, g: 1 / math.sqrt(fi)),
    ("kaiming", lambda fi, fo, g: g / math.sqrt(fi)),
    ("xavier", lambda fi, fo, g: g * math.sqrt(2 / (fi + fo))),
])
def test_init_scales(init, std):
    torch.manual_seed(0)
    model = build_model(make_config(init=init, activation="relu", widths=(512, 512)), 512, 2)
    w = model.blocks[1].linear.weight
    assert w.std().item() == pytest.approx(std(512, 512, math.sqrt(2)), rel=0.02)
    assert model.blocks[1].linear.bias.abs().max() == 0


def test_residual_only_between_equal_widths():
    model = MLP(8, (6, 6, 4), 1, "relu", residual=True)
    assert [b.residual for b in model.blocks] == [False, True, False]


def test_selu_uses_alpha_dropout():
    model = build_model(make_config(activation="selu", dropout=0.1, widths=(4,)), 3, 2)
    assert isinstance(model.blocks[0].dropout, torch.nn.AlphaDropout)


@pytest.mark.parametrize(
    "norm,cls", [("batch", torch.nn.BatchNorm1d), ("layer", torch.nn.LayerNorm)]
)
def test_norm_layers(norm, cls):
    model = build_model(make_config(norm=norm, widths=(4, 4)), 3, 2)
    assert isinstance(model.blocks[1].norm, cls)
