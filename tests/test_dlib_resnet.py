"""dlib's face-recognition ResNet, read from its .dat file: the same network as dlib's C++, and a useful start."""
import random

import cv2
import dlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dlib_resnet
import optimization
import train
from conftest import ROOT, utkface_files
from normalize import normalize
from defaults import NUM_AGES, get_cfg_defaults, merge_opts
from geometry import read_rgb
from model import (DLIB_RESNET, backbone_lr_scale, build_model, check_input_size, input_settings, load_pretrained_backbone,
                   min_input_size)
from dlib_models import models_dir
from runtime import Runtime

CHIP_SIDE = dlib_resnet.NATIVE_SIZE
CHIP_PADDING = 0.25  # dlib.get_face_chip's default, what the network was trained on
UTKFACE_CHIPS = 20
TOLERANCE = 1e-5
RIDGE_SEED, RIDGE_SIZE, RIDGE_FIT, RIDGE_SCORED, RIDGE_PENALTY = 3, 112, 800, 400, 10.0


@pytest.fixture(scope="module")
def weights_file():
    return dlib_resnet.default_weights_file()


@pytest.fixture(scope="module")
def network(weights_file):
    net = dlib_resnet.DlibResNet(NUM_AGES).eval()
    net.load_dlib_weights(weights_file)
    return net


@pytest.fixture(scope="module")
def chips_and_descriptors(weights_file):
    """dlib's own 150 px chips of real faces (20 UTKFace photos and the sample photo) and dlib's descriptors of them."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models_dir() / "shape_predictor_5_face_landmarks.dat"))
    recognizer = dlib.face_recognition_model_v1(str(weights_file))
    files = [path for path, *_ in utkface_files()[::997][:UTKFACE_CHIPS]] + [ROOT / "samples" / "astronaut.jpg"]
    chips = []
    for path in files:
        image = read_rgb(path)
        found = detector(image, 1)
        box = found[0] if found else dlib.rectangle(0, 0, image.shape[1] - 1, image.shape[0] - 1)
        chips.append(dlib.get_face_chip(image, predictor(image, box), size=CHIP_SIDE, padding=CHIP_PADDING))
    descriptors = np.array([np.array(recognizer.compute_face_descriptor(chip)) for chip in chips])
    return np.stack(chips), descriptors


def descriptors_of(network, chips, settings):
    images = torch.from_numpy(chips).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return network.descriptor(normalize(images, settings)).double().numpy()


def test_descriptor_equals_dlibs_on_real_chips(network, chips_and_descriptors):
    """The 128-d output, through the project's own input normalisation, is dlib's compute_face_descriptor."""
    chips, expected = chips_and_descriptors
    assert len(chips) >= UTKFACE_CHIPS + 1
    ours = descriptors_of(network, chips, input_settings(DLIB_RESNET))
    assert np.abs(ours - expected).max() < TOLERANCE


def test_the_descriptor_check_catches_swapped_colours_a_wrong_divisor_and_misplaced_padding(
        network, chips_and_descriptors, monkeypatch):
    """Each plausible mistake in reading dlib's network moves the descriptor well past the tolerance."""
    chips, expected = chips_and_descriptors
    settings = input_settings(DLIB_RESNET)
    mistakes = {"BGR": {**settings, "space": "BGR", "mean": settings["mean"][::-1]},
                "divided by 255": {**settings, "std": (255.0,) * 3}}
    for name, wrong in mistakes.items():
        assert np.abs(descriptors_of(network, chips, wrong) - expected).max() > 10 * TOLERANCE, name

    def padded_at_the_start(a, b):
        shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

        def padded(t):
            channels, rows, cols = (want - have for want, have in zip(shape, t.shape[1:]))
            return F.pad(t, (cols, 0, rows, 0, channels, 0))

        return padded(a) + padded(b)

    monkeypatch.setattr(dlib_resnet, "add_zero_padded", padded_at_the_start)
    assert np.abs(descriptors_of(network, chips, settings) - expected).max() > 10 * TOLERANCE


def test_file_layers_follow_the_network_of_dlibs_example(weights_file):
    means, layers = dlib_resnet.read_dlib_resnet(weights_file)
    assert [name for name, _ in layers] == list(dlib_resnet.LAYER_SEQUENCE)
    assert sum(name == "con_4" for name, _ in layers) == 29
    assert all(0 < mean < 255 for mean in means)
    assert input_settings(DLIB_RESNET) == {"space": "RGB", "range": 255.0, "mean": means, "std": (256.0,) * 3}


@pytest.mark.parametrize("name", ["shape_predictor_5_face_landmarks.dat", "mmod_human_face_detector.dat"])
def test_another_dlib_file_is_refused_with_a_clear_message(name):
    with pytest.raises(SystemExit, match=f"{name} is not dlib's face-recognition ResNet"):
        load_pretrained_backbone(build_model(DLIB_RESNET), str(models_dir() / name))


def test_a_truncated_or_foreign_file_is_refused(tmp_path, weights_file):
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(weights_file.read_bytes()[:1_000_000])
    text = tmp_path / "notes.dat"
    text.write_text("not a network\n")
    for path, reason in ((truncated, "the file ends"), (text, "")):
        with pytest.raises(SystemExit, match=f"{path.name} is not dlib's face-recognition ResNet.*{reason}"):
            load_pretrained_backbone(build_model(DLIB_RESNET), str(path))


@pytest.mark.parametrize("size", [11, 32, 48, 97, 112, 150, 224])
def test_runs_at_any_size_from_11(size):
    model = build_model(DLIB_RESNET).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, size, size))["age"].shape == (2, NUM_AGES)


def test_smallest_input_is_probed_and_smaller_ones_refused():
    smallest = min_input_size(DLIB_RESNET)
    assert smallest == 11
    check_input_size(DLIB_RESNET, smallest)
    with pytest.raises(SystemExit, match=f"smallest crop it takes is {smallest} px"):
        check_input_size(DLIB_RESNET, smallest - 1)


def test_padding_changes_nothing_where_dlibs_network_runs(network):
    """pad_to_kernel only acts on maps smaller than a kernel, which a crop of 103 px or more never makes."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 103, 103)
    with torch.no_grad():
        padded = network.features(images)
        dlib_resnet.pad_to_kernel, original = (lambda x, kernel=3: x), dlib_resnet.pad_to_kernel
        try:
            plain = network.features(images)
        finally:
            dlib_resnet.pad_to_kernel = original
    assert torch.equal(padded, plain)


def config(*opts):
    return merge_opts(get_cfg_defaults(), ["MODEL.ARCH", DLIB_RESNET, *opts])


def test_starts_from_dlibs_weights_unless_told_none(network):
    runtime = Runtime(device=torch.device("cpu"))
    objective = train.OBJECTIVES["ldl"](config())
    started = train.prepare_model(config(), objective, runtime)
    assert torch.equal(started.units[5].conv1.weight, network.units[5].conv1.weight)
    fresh = train.prepare_model(config("MODEL.PRETRAINED", "none"), objective, runtime)
    assert not torch.equal(fresh.units[5].conv1.weight, network.units[5].conv1.weight)


def test_backbone_learns_at_a_fraction_of_the_heads_rate_when_pretrained():
    """The age layer at TRAIN.LR, first (history logs its rate); dlib's layers at 3% of it; random init: one rate."""
    runtime = Runtime(device=torch.device("cpu"))
    for opts, scale in (((), 0.03), (("MODEL.PRETRAINED", "none"), 1.0), (("TRAIN.BACKBONE_LR", "0.1"), 0.1)):
        cfg = config("TRAIN.LR", "0.002", *opts)
        assert backbone_lr_scale(cfg.MODEL.ARCH, cfg.MODEL.PRETRAINED, cfg.TRAIN.BACKBONE_LR) == scale
        model = train.prepare_model(cfg, train.OBJECTIVES["ldl"](cfg), runtime)
        groups = optimization.build_optimizer(model, cfg).param_groups
        assert groups[0]["lr"] == 0.002
        assert [p for g in groups for p in g["params"]].__len__() == len(list(model.parameters()))
        if scale == 1.0:
            assert len(groups) == 1
        else:
            assert groups[0]["params"] == list(model.last_linear.parameters())
            assert groups[1]["lr"] == pytest.approx(0.002 * scale)


def test_pretrained_features_carry_age_where_random_ones_do_not():
    """A ridge fit on frozen pooled features of real faces: dlib's weights know age before any training.

    800 UTKFace faces to fit, 400 others to score, at 112 px: about 8.8 years of MAE against 12.6 for the same
    network at random init (the data set's spread around its mean age is about 15).
    """
    rows = utkface_files()
    random.Random(RIDGE_SEED).shuffle(rows)
    faces = np.stack([cv2.resize(read_rgb(path), (RIDGE_SIZE, RIDGE_SIZE), interpolation=cv2.INTER_AREA)
                      for path, *_ in rows[:RIDGE_FIT + RIDGE_SCORED]])
    images = normalize(torch.from_numpy(faces).permute(0, 3, 1, 2).contiguous(), input_settings(DLIB_RESNET))
    ages = np.array([age for _, age, *_ in rows[:RIDGE_FIT + RIDGE_SCORED]], dtype=np.float64)

    def ridge_mae(model):
        with torch.no_grad():
            features = model.features(images).double().numpy()
        fit, scored = features[:RIDGE_FIT], features[RIDGE_FIT:]
        mean, std = fit.mean(0), fit.std(0) + 1e-6
        design = np.c_[(fit - mean) / std, np.ones(len(fit))]
        weights = np.linalg.solve(design.T @ design + RIDGE_PENALTY * np.eye(design.shape[1]), design.T @ ages[:RIDGE_FIT])
        predicted = np.c_[(scored - mean) / std, np.ones(len(scored))] @ weights
        return np.abs(predicted - ages[RIDGE_FIT:]).mean()

    torch.manual_seed(0)
    pretrained, random_init = build_model(DLIB_RESNET).eval(), build_model(DLIB_RESNET).eval()
    pretrained.load_dlib_weights(dlib_resnet.default_weights_file())
    assert ridge_mae(pretrained) < ridge_mae(random_init) - 2
