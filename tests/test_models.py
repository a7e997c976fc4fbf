import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.vgg import cfgs, make_layers

from ssd_lightning.anchors import DefaultBoxes
from ssd_lightning.models import (
    SSD,
    SSD300VGG16,
    SSD512VGG16,
    L2Norm,
    SSD300ResNet50,
    copy_from_torchvision_ssd300,
)

NARROW = 0.25  # width_mult of the fast test networks
SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD512_MAPS = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tv_vgg16_features(batch_norm: bool = False) -> nn.Sequential:
    """torchvision's ``vgg16().features`` (``vgg16_bn`` with BN), without vgg16's classifier."""
    return make_layers(cfgs["D"], batch_norm=batch_norm)


def random_tv_ssd300(num_classes: int) -> nn.Module:
    """torchvision's ssd300_vgg16 with random weights, biases and L2Norm scales (fast init)."""
    with torch.device("meta"):  # skips building and initialising vgg16's classifier
        tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)
    tv = tv.to_empty(device="cpu")
    for name, p in tv.named_parameters():
        if p.dim() == 4:
            nn.init.kaiming_normal_(p, nonlinearity="relu")
        elif name == "backbone.scale_weight":
            nn.init.uniform_(p, 10.0, 30.0)
        else:
            nn.init.uniform_(p, -0.1, 0.1)
    return tv


@pytest.mark.parametrize(("num_classes", "expected"), [(21, 26_285_486), (91, 35_641_826)])
def test_ssd300_vgg16_parameter_count_equals_torchvision(num_classes, expected):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = SSD300VGG16(num_classes)
        theirs = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)
    assert num_params(ours) == num_params(theirs) == expected


@pytest.mark.parametrize(
    ("model_cls", "maps", "anchors"),
    [
        (SSD300VGG16, SSD300_MAPS, 8732),
        (SSD512VGG16, SSD512_MAPS, 24564),
        (SSD300ResNet50, SSD300_MAPS, 8732),
    ],
)
def test_full_width_feature_maps_and_anchor_count(model_cls, maps, anchors):
    with torch.device("meta"):
        model = model_cls(21)
    assert model.feature_map_sizes() == maps
    assert model.feature_map_sizes(model_cls.image_size) == maps
    boxes = DefaultBoxes.for_network(model, model_cls.image_size)  # the paper rule, any maps
    assert len(boxes) == anchors and boxes.boxes_per_location == model.num_boxes


@pytest.mark.parametrize(
    ("model_cls", "anchors"), [(SSD300VGG16, 8732), (SSD512VGG16, 24564), (SSD300ResNet50, 8732)]
)
def test_narrow_forward_shapes(model_cls, anchors):
    torch.manual_seed(0)
    model = model_cls(5, width_mult=NARROW).eval()
    size = model_cls.image_size
    with torch.no_grad():
        loc, cls = model(torch.randn(2, 3, size, size))
    assert loc.shape == (2, anchors, 4)
    assert cls.shape == (2, anchors, 5)
    assert torch.isfinite(loc).all() and torch.isfinite(cls).all()


@pytest.mark.parametrize("model_cls", [SSD300VGG16, SSD300ResNet50])
def test_feature_map_sizes_match_real_forward_on_non_square_input(model_cls):
    model = model_cls(3, width_mult=NARROW).eval()
    with torch.no_grad():
        maps = model.backbone(torch.zeros(1, 3, 320, 416))
    measured = model.feature_map_sizes((320, 416))
    assert measured == [tuple(m.shape[-2:]) for m in maps]
    assert measured[0] == (40, 52)
    loc, _ = model(torch.zeros(1, 3, 320, 416))
    assert loc.shape[1] == len(DefaultBoxes.for_network(model, (320, 416)))


def test_feature_map_sizes_leaves_model_untouched():
    model = SSD300VGG16(3, width_mult=NARROW, batch_norm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.feature_map_sizes()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(t.device.type == "cpu" for t in after.values())


def test_num_boxes_from_a_function_of_the_number_of_maps():
    seen = []
    model = SSD300VGG16(3, num_boxes=lambda m: seen.append(m) or [4] * m, width_mult=NARROW)
    assert seen == [6] and model.num_boxes == [4] * 6


def test_num_boxes_sets_head_channels_and_anchor_count():
    model = SSD300VGG16(7, num_boxes=(6, 6, 6, 6, 6, 6), width_mult=NARROW)
    assert [conv.out_channels for conv in model.head.loc] == [24] * 6
    assert [conv.out_channels for conv in model.head.cls] == [42] * 6
    expected = 6 * sum(h * w for h, w in SSD300_MAPS)  # 11640
    boxes = DefaultBoxes.for_network(model, 300, aspect_ratios=[2, 3])
    assert len(boxes) == expected == 11640
    loc, cls = model(torch.zeros(1, 3, 300, 300))
    assert loc.shape == (1, expected, 4) and cls.shape == (1, expected, 7)


def test_num_boxes_length_must_match_the_maps():
    with pytest.raises(ValueError, match="num_boxes"):
        SSD300VGG16(21, num_boxes=(4, 6, 6, 6, 4), width_mult=NARROW)


def test_width_mult_shrinks_parameters_keeps_topology():
    with torch.device("meta"):
        full, narrow = SSD300VGG16(21), SSD300VGG16(21, width_mult=NARROW)
    assert num_params(narrow) < num_params(full) / 8
    assert narrow.feature_map_sizes() == full.feature_map_sizes()
    assert narrow.backbone.out_channels == [128, 256, 128, 64, 64, 64]
    # Every channel count stays a multiple of 8, at least 8.
    with torch.device("meta"):
        tiny = SSD300ResNet50(21, width_mult=0.01)
    convs = [m for m in tiny.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert min(m.out_channels for m in convs) == 8
    assert all(m.out_channels % 8 == 0 for m in convs)


def test_batch_norm_variant_trains():
    torch.manual_seed(0)
    model = SSD300VGG16(4, width_mult=NARROW, batch_norm=True).train()
    backbone = model.backbone
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    # 13 VGG convs + conv6 + conv7 + 8 extra convs, each followed by BatchNorm.
    assert len(norms) == 23
    loc, cls = model(torch.randn(2, 3, 300, 300))
    assert loc.shape == (2, 8732, 4) and cls.shape == (2, 8732, 4)
    (loc.square().mean() + cls.logsumexp(-1).mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert norms[0].num_batches_tracked.item() == 1


def test_resnet_variant_rejects_batch_norm_false():
    with pytest.raises(ValueError, match="BatchNorm"):
        SSD300ResNet50(21, batch_norm=False)


def test_l2norm_starts_at_scale_20_and_normalises_channels():
    torch.manual_seed(0)
    norm = L2Norm(16)
    assert torch.equal(norm.weight, torch.full((16,), 20.0))
    x = torch.randn(2, 16, 5, 7) * 37.0
    y = norm(x)
    torch.testing.assert_close(y.norm(dim=1), torch.full((2, 5, 7), 20.0))
    # Direction kept: y is a positive multiple of x at every position.
    torch.testing.assert_close(y / y.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True))


def test_vgg_source_is_l2_normalised_conv4_3():
    model = SSD300VGG16(3, width_mult=NARROW).eval()
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        conv4_3 = model.backbone.conv4_3(x)
        first = model.backbone(x)[0]
    expected = 20.0 * conv4_3 / conv4_3.norm(dim=1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(first, expected)


def test_new_layers_xavier_uniform_zero_bias():
    torch.manual_seed(0)
    model = SSD300VGG16(21)
    backbone = model.backbone
    new_convs = [backbone.conv7[8], backbone.conv7[10]]  # conv6, conv7
    new_convs += [m for m in backbone.extras.modules() if isinstance(m, nn.Conv2d)]
    new_convs += [*model.head.loc, *model.head.cls]
    for conv in new_convs:
        fan_in = conv.weight[0].numel()
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight = conv.weight.detach()
        assert weight.abs().max() <= bound
        assert weight.abs().max() > 0.9 * bound
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert backbone.conv7[8].dilation == (6, 6) and backbone.conv7[8].padding == (6, 6)
    assert backbone.conv4_3[16].ceil_mode  # pool3
    pool5 = backbone.conv7[7]
    assert (pool5.kernel_size, pool5.stride, pool5.padding) == (3, 1, 1)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_backbone_weights_from_local_file(tmp_path, batch_norm):
    torch.manual_seed(0)
    features = tv_vgg16_features(batch_norm)
    path = tmp_path / "vgg16_features.pth"
    torch.save(features.state_dict(), path)
    model = SSD300VGG16(21, batch_norm=batch_norm, backbone_weights=path)
    ours = model.backbone.conv4_3 + model.backbone.conv7[: model.backbone._num_conv5]
    theirs = features[:-1]  # torchvision's features end with pool5 2x2 (no weights)
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state)


def test_vgg_backbone_weights_accept_full_state_dict_and_reject_mismatch(tmp_path):
    features = tv_vgg16_features().state_dict()
    full = {f"features.{k}": v for k, v in features.items()}
    full["classifier.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "vgg16.pth"
    torch.save(full, path)
    model = SSD300VGG16(21, backbone_weights=path)
    assert torch.equal(model.backbone.conv7[5].weight, features["28.weight"])  # conv5_3
    # A BatchNorm (vgg16_bn) layout does not fit the plain network.
    with pytest.raises((ValueError, RuntimeError)):
        model.backbone.load_vgg16(tv_vgg16_features(batch_norm=True).state_dict())
    with pytest.raises(ValueError, match="width_mult"):
        SSD300VGG16(21, width_mult=0.5, backbone_weights=path)


def test_resnet_backbone_weights_match_nvidia_trunk(tmp_path):
    torch.manual_seed(0)
    reference = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = SSD300ResNet50(21, backbone_weights=path).eval()
    # NVIDIA SSD300 v1.1 trunk: resnet50 children up to layer3, stride 1 in layer3's block 0.
    trunk = nn.Sequential(*list(reference.children())[:7]).eval()
    block = trunk[-1][0]
    block.conv1.stride = block.conv2.stride = block.downsample[0].stride = (1, 1)
    assert num_params(model.backbone.trunk) == num_params(trunk)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.trunk(x), trunk(x))


def test_outputs_equal_torchvision_ssd300_with_copied_weights():
    torch.manual_seed(0)
    tv = random_tv_ssd300(21).eval()
    ours = SSD300VGG16(21).eval()
    copy_from_torchvision_ssd300(ours, tv.state_dict())
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        expected = tv.head(list(tv.backbone(x).values()))
        loc, cls = ours(x)
    assert loc.shape == (1, 8732, 4) and cls.shape == (1, 8732, 21)
    torch.testing.assert_close(loc, expected["bbox_regression"])
    torch.testing.assert_close(cls, expected["cls_logits"])


def test_copy_from_torchvision_rejects_other_layouts():
    with torch.device("meta"):
        tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)
        other = SSD300VGG16(91)
    with pytest.raises(RuntimeError, match="size mismatch"):
        copy_from_torchvision_ssd300(other, tv.state_dict())


def test_class_attributes_describe_the_input():
    assert SSD300VGG16.image_size == SSD300ResNet50.image_size == 300
    assert SSD512VGG16.image_size == 512
    for model_cls in (SSD300VGG16, SSD512VGG16, SSD300ResNet50):
        assert issubclass(model_cls, SSD)
        assert model_cls.mean == (0.485, 0.456, 0.406)
        assert model_cls.std == (0.229, 0.224, 0.225)
