import pytest
import torch

from defaults import NUM_AGES, NUM_GENDERS, NUM_RACES
from model import build_model, count_parameters, load_pretrained_backbone


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
    assert out["race"].shape == (2, NUM_RACES)


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
