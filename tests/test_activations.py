import pytest
import torch

from widedeep.activations import (
    ActivationSpec,
    create_activation,
    get_activation,
    list_activations,
    max_slope,
    register_activation,
    saturated,
    slope,
)
from widedeep.config import make_config
from widedeep.errors import UserError
from widedeep.model import activation_modules, build_model
from widedeep.train import criterion_for

LECTURE_LIST = [
    "relu", "relu6", "elu", "selu", "prelu", "leakyrelu", "threshold", "hardtanh", "sigmoid",
    "tanh", "logsigmoid", "softplus", "softshrink", "softsign", "tanhshrink", "softmin",
    "softmax", "logsoftmax",
]
MODERN = ["gelu", "silu", "mish", "hardswish", "hardsigmoid", "celu", "rrelu"]


def test_registry_covers_the_lecture_list_and_modern_additions():
    assert set(LECTURE_LIST + MODERN) <= set(list_activations())


def test_unknown_activation_names_the_value_and_the_known_ones():
    with pytest.raises(UserError, match=r"unknown activation 'swishy'.*relu"):
        get_activation("swishy")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_activation(ActivationSpec(name="relu", factory=torch.nn.ReLU,
                                           nonlinearity="relu"))


def test_each_call_creates_a_fresh_module():
    assert create_activation("prelu") is not create_activation("prelu")


def test_softmax_family_acts_over_the_feature_dimension():
    x = torch.randn(5, 7)
    assert torch.allclose(create_activation("softmax")(x).sum(dim=1), torch.ones(5))
    assert torch.allclose(create_activation("softmin")(x), torch.softmax(-x, dim=1))


@pytest.mark.parametrize("name", list_activations())
def test_slope_matches_autograd_of_the_module(name):
    spec = get_activation(name)
    module = spec.create().double().eval()
    z = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    if spec.elementwise:
        (expected,) = torch.autograd.grad(module(z).sum(), z)
    else:  # diagonal of the Jacobian, one sample at a time
        expected = torch.stack([
            torch.autograd.functional.jacobian(module, z[i]).diagonal() for i in range(16)
        ])
    assert torch.allclose(slope(spec, module, z.detach()), expected.abs(), atol=1e-6)


def test_saturation_definition_on_known_points():
    sig = get_activation("sigmoid")
    assert max_slope(sig) == pytest.approx(0.25, abs=1e-4)
    z = torch.tensor([[0.0, 3.0, 8.0, -8.0]])
    assert saturated(sig, sig.create(), z).tolist() == [[False, False, True, True]]
    relu = get_activation("relu")
    z = torch.tensor([[-1.0, 0.5]])
    assert saturated(relu, relu.create(), z).tolist() == [[True, False]]


@pytest.mark.parametrize("name", list_activations())
def test_every_activation_trains_a_step_at_depths_1_to_12(name):
    for depth in range(1, 13):
        torch.manual_seed(depth)
        model = build_model(make_config(activation=name, depth=depth, width=6), 8, 2)
        names = [n for n, _ in activation_modules(model)]
        assert names == [f"blocks.{i}.activation" for i in range(depth)]
        modules = [m for _, m in activation_modules(model)]
        assert len({id(m) for m in modules}) == depth  # one instance per layer
        X, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = criterion_for(2)(model(X), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), (name, depth)
        assert all(torch.isfinite(p).all() for p in model.parameters()), (name, depth)
