import pytest
import torch

from linearize.architectures import FEATURE_MAPS, MIXERS, resolve
from linearize.architectures.feature_maps import FEATURE_MAP_CLASSES, T2R, EluPlusOne, Hedgehog, Relu
from linearize.architectures.mixers import MIXER_CLASSES


def test_hedgehog_is_lolcats_two_softmaxes_with_identity_init():
    fm = Hedgehog(num_heads=2, head_dim=4)
    x = torch.randn(1, 3, 2, 4)
    out = fm(x)
    assert out.shape == (1, 3, 2, 8)
    # identity init: [softmax(x), softmax(-x)], each half sums to 1 (fla's variant has one softmax over both)
    assert torch.allclose(out, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1), atol=1e-6)
    assert torch.allclose(out[..., :4].sum(-1), torch.ones(1, 3, 2))


def test_t2r_and_elu():
    x = torch.randn(2, 5, 3, 4)
    assert torch.equal(T2R(3, 4)(x), torch.relu(x))
    assert torch.allclose(EluPlusOne(3, 4)(x), torch.nn.functional.elu(x) + 1)
    assert (EluPlusOne(3, 4)(x) > 0).all()
    assert torch.equal(Relu(3, 4)(x), torch.relu(x)) and not list(Relu(3, 4).parameters())


def test_registries_agree_with_the_classes():
    assert set(FEATURE_MAPS) == set(FEATURE_MAP_CLASSES) and set(MIXERS) == set(MIXER_CLASSES)
    for name in FEATURE_MAPS:
        assert resolve(FEATURE_MAPS, name, "feature map") is FEATURE_MAP_CLASSES[name]
    for name in MIXERS:
        assert resolve(MIXERS, name, "mixer") is MIXER_CLASSES[name]
    with pytest.raises(KeyError, match="unknown feature map 'nope'; known: elu, hedgehog, relu, t2r"):
        resolve(FEATURE_MAPS, "nope", "feature map")
