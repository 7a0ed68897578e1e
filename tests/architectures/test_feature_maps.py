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


def test_wider_maps_start_from_distinct_identity_and_hadamard_blocks():
    """feature_dim > head_dim: the first block is still the identity (the default map's behaviour), the
    others are distinct bases and temperatures (equal copies would get equal gradients forever)."""
    from linearize.architectures.feature_maps import hadamard

    fm = Hedgehog(num_heads=2, head_dim=4, width=16, bias=True)
    x = torch.randn(1, 3, 2, 4)
    assert fm(x).shape == (1, 3, 2, 32) and Hedgehog.feature_dim(4, 16) == 32
    w = fm.weight[0]
    assert torch.equal(w[:, :4], torch.eye(4)) and torch.allclose(w[:, 4:8], hadamard(4))
    assert torch.allclose(w[:, 8:12], 2 * torch.eye(4)) and torch.allclose(w[:, 12:16], 2 * hadamard(4))
    assert torch.allclose(hadamard(4) @ hadamard(4).T, torch.eye(4), atol=1e-6)
    assert fm.bias.shape == (2, 16) and not fm.bias.any()
    assert Hedgehog(2, 4).bias is None  # LoLCATs' default: no bias
    assert T2R(2, 4, width=6).weight.shape == (2, 4, 6) and T2R(2, 4, width=6).bias.shape == (2, 6)


def test_maps_without_a_projection_refuse_a_width():
    with pytest.raises(ValueError, match="EluPlusOne has no learned projection"):
        EluPlusOne(2, 4, width=8)


def test_learned_feature_map_list_agrees_with_the_classes():
    from linearize.architectures import LEARNED_FEATURE_MAPS

    assert set(LEARNED_FEATURE_MAPS) == {n for n, c in FEATURE_MAP_CLASSES.items() if c.learned}
