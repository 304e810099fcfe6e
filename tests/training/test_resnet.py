import pytest
import torch

from cutmix_pl.resnet import ResNet, resnet_n


@pytest.mark.parametrize("depth,n", [(8, 1), (20, 3), (32, 5), (44, 7), (56, 9), (110, 18)])
def test_depth_rule_accepts_6n_plus_2(depth, n):
    assert resnet_n(depth) == n
    blocks = sum(len(stage) for stage in ResNet(depth).stages)
    assert blocks == 3 * n
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in ResNet(depth).modules())
    assert convs + 1 == depth  # stem + 2 per block, plus the linear head


@pytest.mark.parametrize("depth", [0, 2, 7, 18, 19, 21, 100, -4, 20.0, True])
def test_depth_rule_rejects_others(depth):
    with pytest.raises(ValueError, match=r"6n\+2"):
        ResNet(depth)


def test_resnet20_has_the_published_parameter_count():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (option A shortcuts add none).
    params = sum(p.numel() for p in ResNet(20).parameters())
    assert params == 269_722
    assert round(params / 1e6, 2) == 0.27
    assert sum(p.numel() for p in ResNet(110).parameters()) == pytest.approx(1.7e6, rel=0.02)


def test_shortcut_b_adds_projections_only_where_shapes_change():
    a = sum(p.numel() for p in ResNet(20, shortcut="A").parameters())
    b = sum(p.numel() for p in ResNet(20, shortcut="B").parameters())
    # two 1x1 projections with BN: 16->32 and 32->64
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_output_shape_and_features(shortcut):
    net = ResNet(20, num_classes=7, shortcut=shortcut).eval()
    x = torch.randn(3, 3, 32, 32)
    assert net(x).shape == (3, 7)
    assert net.features(x).shape == (3, 64, 8, 8)


def test_option_a_shortcut_is_zero_padded_identity():
    block = ResNet(20).stages[1][0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("kwargs,match", [({"shortcut": "C"}, "shortcut"), ({"num_classes": 1}, "num_classes")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet(20, **kwargs)
