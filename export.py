"""Export a checkpoint to ONNX, to run the model without PyTorch (onnxruntime, OpenCV DNN, TensorRT, ...).

    python export.py --model CKPT --output FILE.onnx [--check_dir DIR] [--bench]

(--resume is the original's name for --model and works too.)

The graph
- takes ``image``: RGB uint8 faces, NHWC (N, S, S, 3), aligned and cropped as for
  training (preprocessing/align.py, then geometry.aligned_crop with the
  metadata's img_size and expand). The normalisation (colour order, value
  range, mean, std) is inside the graph, so a deployer feeds crops as they are;
- gives ``age`` (N,), ``age_sd`` (N, the checkpoint's sd_scale applied, as
  estimator.calibrated_sd does) and ``distribution`` (N, 101 ages), and for a
  multitask model ``gender_prob`` (N, 2: male, female) and ``race_prob`` (N, 5, the
  ethnicity under the original's name: white, black, asian, indian, other). N, the batch, is dynamic;
- carries metadata, each a JSON value: format, arch, objective, img_size, expand,
  input (the normalisation), config (the training run's), outputs, input_layout,
  sd_scale (for onnxruntime's backend, which takes the sd from the distribution).

Before the file is written, onnxruntime and PyTorch (fp32) score every face found
in the photos of --check_dir and their mirror images; the export is refused
when they differ by more than 0.001 years. --bench then times the model in
PyTorch fp32, PyTorch with AMP, and onnxruntime, next to face detection.
"""
import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cli import add_model_argument
from defaults import MEGA, MS_PER_S, cfg_to_dict
from estimator import (ONNX_AGE_OUTPUTS, ONNX_FORMAT, ONNX_INPUT, SD_SCALE_KEY, AgeEstimator, OnnxBackend,
                       TorchBackend, calibrated_sd, load_model, load_model_file, make_backend)
from files import atomic_write, remove_stale_temp_files
from geometry import IMAGE_SUFFIXES, read_rgb
from model import ATTRIBUTE_HEADS
from normalize import normalize
from objectives import distribution_moments
from runtime import Runtime, cpu_has_native_bf16, resolve_amp

DEFAULT_CHECK_DIR = Path(__file__).parent / "samples"
# detection is timed on this photo: 512 x 512 with one face, about the pixels of a 640 x 480 webcam frame
BENCH_PHOTO = Path(__file__).parent / "samples" / "astronaut.jpg"
# photos of --check_dir looked at, in name order: enough faces to trust the comparison, quick to align
MAX_CHECK_IMAGES = 32
AGE_TOLERANCE_YEARS = 1e-3
EXAMPLE_BATCH = 2  # traced with 2 faces, so that the exporter keeps the batch axis symbolic
BENCH_BATCH = 64
BENCH_MIN_RUNS = 5
BENCH_MIN_SECONDS = 1.0
INPUT_LAYOUT = "RGB uint8, NHWC (N, img_size, img_size, 3), aligned as in training; normalised inside the graph"


class ExportError(SystemExit):
    """An export that cannot be made or does not match PyTorch; a SystemExit so that it prints without a traceback."""


class ExportGraph(torch.nn.Module):
    """The model with its input normalisation before it and the softmax, expected age and sd after it."""

    def __init__(self, model, settings, sd_scale):
        super().__init__()
        self.model = model
        self.settings = settings
        self.sd_scale = sd_scale

    def forward(self, image):
        outputs = self.model(normalize(image.permute(0, 3, 1, 2), self.settings))
        distribution = torch.softmax(outputs["age"].float(), 1)
        age, age_sd = distribution_moments(distribution)
        age_sd = calibrated_sd(age_sd, self.sd_scale)
        heads = [torch.softmax(outputs[name].float(), 1) for name in ATTRIBUTE_HEADS if name in outputs]
        return (age, age_sd, distribution, *heads)


def output_names(multitask):
    return list(ONNX_AGE_OUTPUTS) + (["gender_prob", "race_prob"] if multitask else [])


def export_metadata(model_file):
    values = {"format": ONNX_FORMAT, "arch": model_file.arch, "objective": model_file.objective,
              "img_size": model_file.img_size, "expand": model_file.expand, "input": model_file.input,
              "config": cfg_to_dict(model_file.cfg), "outputs": output_names(model_file.multitask),
              "input_layout": INPUT_LAYOUT, SD_SCALE_KEY: model_file.sd_scale}
    return {key: json.dumps(value) for key, value in values.items()}


def write_onnx(model, model_file, path):
    """Trace ``model`` (fp32, on the CPU) into an ONNX file at ``path`` with a dynamic batch axis and metadata."""
    size = model_file.img_size
    example = torch.zeros(EXAMPLE_BATCH, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals mean nothing to a user
        graph = ExportGraph(model, model_file.input, model_file.sd_scale).eval()
        program = torch.onnx.export(graph, (example,), dynamo=True,
                                    input_names=[ONNX_INPUT], output_names=output_names(model_file.multitask),
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    program.model.metadata_props.update(export_metadata(model_file))
    program.save(path)


def check_photos(folder):
    """The first MAX_CHECK_IMAGES image files of ``folder``, in name order."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:MAX_CHECK_IMAGES]


def check_crops(estimator, folder):
    """Aligned crops of the faces in the first photos of ``folder``, and their mirror images."""
    crops = []
    for path in check_photos(folder):
        rgb = read_rgb(path)
        if rgb is not None:
            crops.extend(estimator.crops(rgb, estimator.detect(rgb)))
    if not crops:
        raise ExportError(f"no face found in the photos of --check_dir {folder} to verify the export with; "
                          f"pass a folder of face photos")
    crops = np.stack(crops)
    return np.concatenate([crops, crops[:, :, ::-1]])


def largest_differences(reference, exported, crops):
    """Largest |difference| in age, sd and distribution between two estimators on the same crops."""
    expected, got = reference.predict_aligned(crops), exported.predict_aligned(crops)
    return {key: max(float(np.max(np.abs(np.asarray(a[key]) - np.asarray(b[key])))) for a, b in zip(expected, got))
            for key in ("age", "age_sd", "distribution")}


def verify(reference, path, crops):
    """Refuse an export whose onnxruntime ages differ from PyTorch's by more than the tolerance."""
    onnx_file = load_model_file(path)
    exported = AgeEstimator(OnnxBackend(onnx_file.session, torch.device("cpu"), onnx_file.sd_scale),
                            reference.img_size, reference.expand)
    differences = largest_differences(reference, exported, crops)
    if differences["age"] > AGE_TOLERANCE_YEARS:
        raise ExportError(f"onnxruntime and PyTorch disagree by up to {differences['age']:.5f} years on "
                          f"{len(crops)} faces (tolerance {AGE_TOLERANCE_YEARS}); the export was not written")
    return differences


def check_paths(args):
    source = Path(args.model).expanduser()
    output = Path(args.output).expanduser()
    if output.suffix.lower() != ".onnx":
        raise ExportError(f"--output {output} must end in .onnx")
    if output.is_dir():
        raise ExportError(f"--output {output} is a folder; name the file to write, e.g. {output / 'model.onnx'}")
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise ExportError(f"--output {output} is the checkpoint itself; choose another name")
    if not Path(args.check_dir).is_dir():
        raise ExportError(f"--check_dir {args.check_dir} is not a folder of face photos")
    return source, output


def export(source, output, check_dir):
    """Export, verify on the faces of ``check_dir``, and only then put the file in place. Returns the differences."""
    model_file = load_model_file(source)
    if model_file.kind != "torch":
        raise ExportError(f"--model {source} is already an ONNX export; pass the .pth it was made from")
    cfg = model_file.cfg.clone()
    cfg.MODEL.CHANNELS_LAST = False
    runtime = Runtime(device=torch.device("cpu"))
    model = load_model(model_file.state, runtime, cfg)
    reference = AgeEstimator(TorchBackend(model, runtime, model_file.input, channels_last=False, amp="off",
                                          sd_scale=model_file.sd_scale), model_file.img_size, model_file.expand)
    crops = check_crops(reference, check_dir)
    remove_stale_temp_files(output.parent, [output.name])
    differences = atomic_write(output, lambda partial: write_and_verify(model, model_file, partial, reference, crops))
    return {"faces": len(crops), **differences}


def write_and_verify(model, model_file, path, reference, crops):
    write_onnx(model, model_file, path)
    return verify(reference, path, crops)


def median_seconds(run):
    """Median time of ``run()`` after one warm-up call, over at least BENCH_MIN_RUNS calls and BENCH_MIN_SECONDS."""
    run()
    times = []
    started = time.perf_counter()
    while len(times) < BENCH_MIN_RUNS or time.perf_counter() - started < BENCH_MIN_SECONDS:
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def bench_backends(source, onnx_path):
    """Each way to run the model, by name: PyTorch fp32, PyTorch with AMP where the CPU computes it, onnxruntime."""
    model_file = load_model_file(source)
    runtime = Runtime(device=torch.device("cpu"))
    backends = {"torch fp32": make_backend(model_file, runtime, amp="off")}
    amp = resolve_amp("auto", runtime.device)
    if amp != "off":
        backends[f"torch {amp} (AMP)"] = make_backend(model_file, runtime, amp=amp)
    backends["onnxruntime fp32"] = OnnxBackend(load_model_file(onnx_path).session, runtime.device)
    return backends


def bench(source, onnx_path, check_dir):
    """Single-face latency and batch throughput of each backend, and detection time on BENCH_PHOTO."""
    estimator = AgeEstimator.from_checkpoint(source, device="cpu")
    crops = check_crops(estimator, check_dir)
    single = torch.from_numpy(crops[:1]).permute(0, 3, 1, 2)
    batch = torch.from_numpy(np.resize(crops, (BENCH_BATCH,) + crops.shape[1:])).permute(0, 3, 1, 2)
    rows = []
    for name, backend in bench_backends(source, onnx_path).items():
        latency = median_seconds(lambda backend=backend: backend.probabilities(single))
        throughput = BENCH_BATCH / median_seconds(lambda backend=backend: backend.probabilities(batch))
        rows.append({"backend": name, "single_face_ms": latency * MS_PER_S, "batch_faces_s": throughput})
    photo = BENCH_PHOTO
    rgb = read_rgb(photo)
    detect_ms = median_seconds(lambda: estimator.detect(rgb)) * MS_PER_S
    model = estimator.model_file
    return {"model": f"{model.path.name} ({model.arch}, {model.img_size} px)", "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
            "photo": f"{photo.name} ({rgb.shape[1]}x{rgb.shape[0]})", "detect_ms": detect_ms, "rows": rows}


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def format_bench(result):
    lines = [f"{result['model']} on {result['cpu']}; torch threads {result['threads']}; native bf16: {result['native_bf16']}",
             "", f"| backend | 1 face (ms) | batch {BENCH_BATCH} (faces/s) |", "| --- | ---: | ---: |"]
    lines += [f"| {row['backend']} | {row['single_face_ms']:.2f} | {row['batch_faces_s']:.0f} |" for row in result["rows"]]
    lines += ["", f"face detection and landmarks (dlib HOG, demo defaults) on {result['photo']}: "
                  f"{result['detect_ms']:.0f} ms per frame"]
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser, "checkpoint to export (a .pth written by the training scripts)", required=True,
                       metavar="CKPT")
    parser.add_argument("--output", required=True, help="the ONNX file to write, e.g. model.onnx")
    parser.add_argument("--check_dir", default=str(DEFAULT_CHECK_DIR),
                        help=f"face photos on which onnxruntime must agree with PyTorch within {AGE_TOLERANCE_YEARS} "
                             f"years (the first {MAX_CHECK_IMAGES}; default: %(default)s)")
    parser.add_argument("--bench", action="store_true",
                        help="then time PyTorch fp32, PyTorch AMP and onnxruntime on one face and on a batch of "
                             f"{BENCH_BATCH}, and face detection on {BENCH_PHOTO.name}")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    source, output = check_paths(args)
    result = export(source, output, args.check_dir)
    print(f"wrote {output} ({output.stat().st_size / MEGA:.2f} MB); onnxruntime matches PyTorch on {result['faces']} "
          f"faces within {result['age']:.2e} years (age) and {result['distribution']:.2e} (distribution)")
    if args.bench:
        result["bench"] = bench(source, output, args.check_dir)
        print(format_bench(result["bench"]))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
