import pytest
import torch

from normalize import normalize
from defaults import NUM_AGES, NUM_ETHNICITIES, NUM_GENDERS
from model import (build_model, check_input_size, count_parameters, input_settings, load_pretrained_backbone, min_input_size,
                   random_init_warning)


@pytest.mark.parametrize("arch, millions", [("thinage", 3.71), ("tinyage", 0.90)])
@pytest.mark.parametrize("size", [64, 112, 224])
def test_age_nets_any_size(arch, millions, size):
    model = build_model(arch).eval()
    assert count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.01)
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size))
    assert out["age"].shape == (2, NUM_AGES)


@pytest.mark.parametrize("arch", ["tinyage", "resnet18"])
def test_multitask_heads(arch):
    model = build_model(arch, multitask=True).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 96, 96))
    assert out["age"].shape == (2, NUM_AGES)
    assert out["gender"].shape == (2, NUM_GENDERS)
    assert out["race"].shape == (2, NUM_ETHNICITIES)


def test_pretrainedmodels_arch_with_new_last_layer_at_any_size():
    model = build_model("se_resnext50_32x4d").eval()
    assert model.last_linear.out_features == NUM_AGES
    with torch.no_grad():
        for size in (96, 160):
            assert model(torch.zeros(1, 3, size, size))["age"].shape == (1, NUM_AGES)


def test_unknown_arch_lists_the_choices():
    with pytest.raises(SystemExit, match="unknown MODEL.ARCH 'resnet9000'.*thinage"):
        build_model("resnet9000")


def test_pretrained_weights_from_a_local_file(tmp_path):
    source = build_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.backbone.state_dict(), path)
    target = build_model("resnet18")
    loaded = load_pretrained_backbone(target, str(path))
    assert loaded == len(source.backbone.state_dict())
    assert torch.equal(target.backbone.conv1.weight, source.backbone.conv1.weight)
    assert not torch.equal(target.last_linear.weight, source.last_linear.weight), "the age head stays new"


def test_pretrained_weights_missing_or_unverified(tmp_path):
    with pytest.raises(SystemExit, match="cannot be downloaded offline"):
        load_pretrained_backbone(build_model("resnet18"), str(tmp_path / "none.pth"))
    with pytest.raises(SystemExit, match="needs its sha256"):
        load_pretrained_backbone(build_model("resnet18"), "https://example.invalid/w.pth")
    path = tmp_path / "w.pth"
    torch.save({}, path)
    with pytest.raises(SystemExit, match="sha256 does not match"):
        load_pretrained_backbone(build_model("resnet18"), str(path), "0" * 64)


def test_width_scales_the_age_nets_channels_and_only_theirs():
    wide = build_model("tinyage", width=1.5).eval()
    assert [stage[-1][-3].out_channels for stage in wide.stages] == [24, 48, 96, 192, 192]
    with torch.no_grad():
        assert wide(torch.zeros(1, 3, 64, 64))["age"].shape == (1, NUM_AGES)
    with pytest.raises(SystemExit, match="MODEL.WIDTH scales thinage and tinyage only"):
        build_model("resnet18", width=1.5)


@pytest.mark.parametrize("arch, settings", [
    ("bninception", {"space": "BGR", "range": 255.0, "mean": (104.0, 117.0, 128.0), "std": (1.0, 1.0, 1.0)}),
    ("xception", {"space": "RGB", "range": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}),
    ("tinyage", {"space": "RGB", "range": 1.0, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
])
def test_each_architecture_gets_the_input_its_weights_were_trained_on(arch, settings):
    assert input_settings(arch) == settings
    rgb = torch.tensor([[[[10]], [[100]], [[200]]]], dtype=torch.uint8)  # one pixel, NCHW
    channels = rgb.flip(1) if settings["space"] == "BGR" else rgb
    scaled = channels.float() * settings["range"] / 255
    expected = (scaled - torch.tensor(settings["mean"]).view(1, 3, 1, 1)) / torch.tensor(settings["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(rgb, settings), expected)


def test_bninception_and_xception_inputs_by_hand():
    rgb = torch.tensor([[[[10]], [[100]], [[200]]]], dtype=torch.uint8)
    assert normalize(rgb, input_settings("bninception")).flatten().tolist() == [200 - 104, 100 - 117, 10 - 128]
    torch.testing.assert_close(normalize(rgb, input_settings("xception")).flatten(),
                               torch.tensor([10, 100, 200]) / 127.5 - 1)


def test_random_init_warning_names_the_imagenet_weights_and_the_key():
    text = random_init_warning("resnet18")
    assert "resnet18 starts from random weights" in text and "MODEL.PRETRAINED" in text
    assert "https://download.pytorch.org/models/resnet18-5c106cde.pth" in text
    assert random_init_warning("tinyage") is None, "AgeNets have no ImageNet weights to miss"


@pytest.mark.parametrize("arch", ["tinyage", "thinage"])
def test_smallest_age_net_input_is_two_to_the_number_of_pools(arch):
    """Four 2x2 max-pools, each rounding down: 16 px leave a 1x1 map for the last block, 15 px leave none."""
    assert min_input_size(arch) == 16
    model = build_model(arch).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 16, 16))["age"].shape == (1, NUM_AGES)
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, 15, 15))
    for size in (0, 7, 15):
        with pytest.raises(SystemExit, match=f"MODEL.IMG_SIZE {size} is too small for {arch}: the smallest crop it takes is 16 px"):
            check_input_size(arch, size)
    check_input_size(arch, 16)


def test_smallest_pretrainedmodels_input_is_probed():
    """bninception keeps a fixed 7x7 average pool: below 223 px its last map is smaller than the pool."""
    assert min_input_size("bninception") == 223
    with pytest.raises(SystemExit, match="smallest crop it takes is 223 px"):
        check_input_size("bninception", 200)
    model = build_model("bninception").eval()
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, 222, 222))
