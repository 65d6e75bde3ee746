"""A local web page that estimates the age of every face in a photo.

    python app.py                                   # http://127.0.0.1:7860
    python app.py --port 8080 --model checkpoint/best.pth --tta   # or --model model.onnx

A photo comes by upload (click or drag and drop), from the browser's webcam,
or from the examples in samples/. Each one is decoded by the project's own
reader (geometry.decode_rgb, as demo.py reads files) and scored by
estimator.AgeEstimator, the one inference path, with the model and detection
options demo.py takes too (cli.py); the page shows the photo drawn as demo.py
draws it (drawing.annotate), a
table with one row per face (largest first), the selected face's 101-way age
distribution and a status line.

Nothing goes over the network: Gradio's analytics are off, there is no share
link, and the page loads no font or script from outside. Gradio receives an
upload as a file: here it lands in a private folder (mode 700; in /dev/shm,
which is memory, where that has room for UPLOAD_BUDGET_BYTES, else on disk),
is read into memory once and deleted when the request that read it ends, or
after UNCLAIMED_S when no request reads it (an upload sent to Gradio's route
alone, a client gone); the folder goes when the server stops. What is held is
bounded: a file by MAX_UPLOAD_BYTES, the folder by UPLOAD_BUDGET_BYTES (an
upload that would pass it is refused before it is stored), the requests by
CONCURRENT_REQUESTS scored and QUEUE_SIZE waiting. The page states these
limits. The annotated photo and the plot go back inside the page as data URIs,
never as files.

Element ids that browser checks rely on (docs/design.md): ``upload``
holds an ``input[type=file]`` and a file put there is scored at once;
``faces`` holds the table; ``message`` holds errors and the status.
"""
import argparse
import base64
import html
import io
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure

import drawing
from cli import NO_FACE_NOTE, UNCROPPED_NOTE, add_estimator_arguments, chosen_model_path, load_estimator, sigterm_as_ctrl_c
from defaults import MEGA, MS_PER_S, NUM_AGES, PERCENT
from upload_folder import UNCLAIMED_S, UPLOAD_BUDGET_BYTES, UploadBudget, UploadFolder
from geometry import IMAGE_SUFFIXES, CropError, decode_rgb, image_header, open_image
from model import ATTRIBUTE_HEADS
from runtime import resolve_device

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by Gradio at import and at launch
import gradio as gr  # noqa: E402  (after the variable above)
from starlette.middleware import Middleware  # noqa: E402

ROOT = Path(__file__).resolve().parent
SAMPLES_DIR = ROOT / "samples"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Photos over this are decoded at 1/2, 1/4 or 1/8 of each side: a phone's full-resolution mode (8160 x 6120)
# still fits, so those photos get demo.py's numbers exactly, and a decoded photo never exceeds 150 MB.
MAX_PIXELS = 50_000_000
REDUCTIONS = (2, 4, 8)
# only JPEG is scaled while it is decoded; any other format over MAX_PIXELS would exist whole first
REDUCIBLE_FORMATS = ("JPEG", "MPO")
MAX_UPLOAD_BYTES = 200_000_000
# requests scored at once (four users never wait for each other), and requests that may wait for a turn; more are
# refused with "queue is full", so that waiting requests never pin their uploads without bound
CONCURRENT_REQUESTS = 8
QUEUE_SIZE = 16
# how often the main thread looks whether the server still runs (Ctrl-C and SIGTERM arrive in between)
SERVE_POLL_S = 0.2
# the page shows the annotated photo at most this large (it is drawn at this size, as drawing.annotate draws)
DISPLAY_MAX_SIDE = 1600
DISPLAY_JPEG_QUALITY = 90
PLOT_SIZE_IN = (6.0, 2.6)
EXAMPLES_HEIGHT_PX = 200
PLOT_DPI = 100
AGES = np.arange(NUM_AGES)
SECONDS_PER_MINUTE = 60
# the table's mark for a gender or ethnicity label left out for its low probability
LEFT_OUT = "–"
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "Consolas", "monospace")
NOT_AN_IMAGE = ("is not an image this page reads ({formats}); a phone's HEIC photo must be saved as JPEG first")
HELLO = "Drop a photo on the box, click it to choose one, use the webcam, or pick an example."
CSS = """
#faces table { border-collapse: collapse; width: 100%; }
#faces th, #faces td { border-bottom: 1px solid #ccc; padding: 4px 8px; text-align: right; }
#annotated img { max-width: 100%; max-height: 560px; width: auto; height: auto; }
#distribution img { max-width: 100%; height: auto; }
#message { font-size: 1.05em; }
#message .error { color: #b00020; font-weight: 600; }
"""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to serve on; 0.0.0.0 opens the page to your network (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to serve on (default: %(default)s)")
    add_estimator_arguments(parser)
    return parser


# Reading a photo ----------------------------------------------------------------


class PhotoError(Exception):
    """A photo the page cannot score; the message is shown as it is."""


@dataclass
class Photo:
    """A decoded photo: ``rgb`` upright, ``scale`` the decoded size over the stored one (1 unless reduced)."""

    name: str
    rgb: np.ndarray
    size: tuple
    scale: float = 1.0


def reduction(width, height, fmt, name):
    """1, or the factor a photo over MAX_PIXELS is decoded down by; a photo that cannot be is refused."""
    if width * height <= MAX_PIXELS:
        return 1
    limit = f"{width} × {height} is {width * height / MEGA:.0f} megapixels, over this page's limit of {MAX_PIXELS / MEGA:.0f}"
    if fmt not in REDUCIBLE_FORMATS:
        raise PhotoError(f"{name}: {limit} for {fmt} photos (only JPEG is scaled down while it is decoded). "
                         f"Save it as JPEG or scale it down.")
    for factor in REDUCTIONS:
        if width * height <= MAX_PIXELS * factor * factor:
            return factor
    raise PhotoError(f"{name}: {limit}, even at 1/{REDUCTIONS[-1]} of each side. Scale it down first.")


def check_whole_jpeg(data, name, fmt):
    """A truncated JPEG decodes with its missing part grey; PIL notices, at 1/8 scale, so the photo is refused."""
    if fmt not in REDUCIBLE_FORMATS:
        return
    with open_image(io.BytesIO(data)) as image:
        image.draft("RGB", (image.width // REDUCTIONS[-1], image.height // REDUCTIONS[-1]))
        try:
            image.load()
        except OSError as error:
            raise PhotoError(f"{name} is damaged or truncated ({error}); upload the whole file") from None


def decode_photo(data, name):
    """The photo in ``data``, decoded as demo.py decodes files; PhotoError says why it cannot be."""
    if not data:
        raise PhotoError(f"{name} is empty (0 bytes)")
    try:
        fmt, width, height = image_header(io.BytesIO(data))
    except OSError:
        raise PhotoError(f"{name} " + NOT_AN_IMAGE.format(formats=", ".join(sorted(IMAGE_SUFFIXES)))) from None
    factor = reduction(width, height, fmt, name)
    check_whole_jpeg(data, name, fmt)
    rgb = decode_rgb(data, factor)
    if rgb is None:
        raise PhotoError(f"{name}: a {fmt} file that OpenCV cannot decode (damaged, or a variant it does not read)")
    return Photo(name, rgb, (width, height), rgb.shape[1] / width)


# Scoring ---------------------------------------------------------------------------


@dataclass
class Result:
    """What the page shows for one photo: the status or error, the faces, and the annotated photo."""

    message: str
    faces: list = field(default_factory=list)
    annotated: np.ndarray = None
    error: bool = False


class Scorer:
    """Photo bytes in, a `Result` out; safe from many threads at once (the estimator lends each its own detector)."""

    def __init__(self, estimator, weights, uploads):
        self.estimator = estimator
        self.weights = Path(weights)
        self.uploads = uploads

    def score_upload(self, path, name):
        """Score a file Gradio received; it is deleted once read (see `UploadFolder`)."""
        try:
            with self.uploads.reading(path) as data:
                return self.score_bytes(data, name)
        except FileNotFoundError:
            return Result(f"{name}: the upload is gone (an upload no request reads within {UNCLAIMED_S} s is "
                          f"deleted); upload it again", error=True)

    def score_file(self, path):
        """Score one of the page's own files (the examples)."""
        return self.score_bytes(Path(path).read_bytes(), Path(path).name)

    def score_bytes(self, data, name):
        try:
            photo = decode_photo(data, name)
        except PhotoError as error:
            return Result(str(error), error=True)
        try:
            return self.score_photo(photo)
        except CropError as error:  # bad geometry, not a bug: the page says which face, the log needs no traceback
            return Result(f"{name}: {error}; {UNCROPPED_NOTE}", error=True)
        except Exception as error:  # the page says so and keeps serving; the traceback goes to the server's log
            traceback.print_exc()
            return Result(f"{name} could not be scored ({type(error).__name__}: {error})", error=True)

    def score_photo(self, photo):
        start = time.perf_counter()
        faces = self.estimator.predict(photo.rgb)
        seconds = time.perf_counter() - start
        faces = [dict(face, box=tuple(v / photo.scale for v in face["box"])) for face in faces]
        return Result(self.status(photo, faces, seconds), faces, annotate_for_display(photo, faces))

    def status(self, photo, faces, seconds):
        model = self.estimator.model_file
        count = f"{len(faces)} face{'s' if len(faces) != 1 else ''}" if faces else NO_FACE_NOTE
        scaled = ""
        if photo.scale != 1:
            height, width = photo.rgb.shape[:2]
            scaled = (f" · scaled to {width} × {height} before detection ({photo.size[0]} × {photo.size[1]} is over "
                      f"{MAX_PIXELS / MEGA:.0f} megapixels); boxes are in the original's pixels")
        return (f"{photo.name}: {count}{scaled} · {self.weights.name} ({model.arch}, {model.img_size} px"
                f"{', TTA' if self.estimator.tta else ''}) · {self.estimator.backend.name} · "
                f"{seconds * MS_PER_S:.0f} ms")


def annotate_for_display(photo, faces):
    """The photo as drawing.annotate draws it, drawn at no more than DISPLAY_MAX_SIDE (labels scale with the image)."""
    rgb = photo.rgb
    scale = min(1.0, DISPLAY_MAX_SIDE / max(rgb.shape[:2]))
    if scale < 1.0:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    shown = scale * photo.scale
    return drawing.annotate(rgb, [dict(face, box=tuple(v * shown for v in face["box"])) for face in faces])


# What the page shows ------------------------------------------------------------------


def img_tag(encoded, mime, alt):
    """An image inside the page, as a data URI: nothing is written to disk or served as a file."""
    return f'<img src="data:{mime};base64,{base64.b64encode(encoded).decode("ascii")}" alt="{html.escape(alt)}">'


def image_html(rgb, alt):
    if rgb is None:
        return ""
    _, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                              [cv2.IMWRITE_JPEG_QUALITY, DISPLAY_JPEG_QUALITY])
    return img_tag(encoded.tobytes(), "image/jpeg", alt)


def attribute_cells(face):
    """Gender and ethnicity with their probabilities, for a multitask model's face; a label below the threshold
    (estimator.DEFAULT_MIN_ATTRIBUTE_PROB, or --min_attribute_prob) is left out, its probability shown."""
    return [f"{face[head] or LEFT_OUT} ({PERCENT * face[f'{head}_prob']:.0f}%)" for head in ATTRIBUTE_HEADS
            if f"{head}_prob" in face]


def faces_html(faces):
    """One table row per face, largest first; the header names the columns a browser check reads."""
    multitask = bool(faces) and all(f"{head}_prob" in faces[0] for head in ATTRIBUTE_HEADS)
    header = ["face", "x1", "y1", "x2", "y2", "age", "sd"] + (["gender", "ethnicity"] if multitask else [])
    rows = []
    for index, face in enumerate(faces):
        cells = [str(index + 1), *(str(int(round(v))) for v in face["box"]), f"{face['age']:.1f}",
                 f"{face['age_sd']:.1f}", *attribute_cells(face)]
        rows.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{name}</th>" for name in header) + "</tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def distribution_png(face, number):
    """The face's predicted age distribution, its mean and ± sd, as PNG bytes."""
    figure = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.bar(AGES, face["distribution"], width=1.0, color="#4c8c4a")
    axes.axvline(face["age"], color="black")
    axes.axvspan(face["age"] - face["age_sd"], face["age"] + face["age_sd"], color="grey", alpha=0.2)
    axes.set_xlim(AGES[0], AGES[-1])
    axes.set_xlabel("age (years)")
    axes.set_ylabel("probability")
    axes.set_title(f"face {number}: {face['age']:.1f} ± {face['age_sd']:.1f} years")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def distribution_html(faces, choice):
    if not faces:
        return ""
    number = int(choice) if choice else 1
    return img_tag(distribution_png(faces[number - 1], number), "image/png", f"age distribution of face {number}")


def message_html(result):
    css_class = "error" if result.error else "status"
    return f'<p class="{css_class}">{html.escape(result.message)}</p>'


def page_outputs(result):
    """The values of the page's outputs for a result, in `Page.outputs` order."""
    choices = [str(number) for number in range(1, len(result.faces) + 1)]
    table = faces_html(result.faces) if not result.error else ""
    return (None, None, message_html(result), image_html(result.annotated, "the photo with each face's age"), table,
            gr.update(choices=choices, value=choices[0] if choices else None),
            distribution_html(result.faces, choices[0] if choices else None), result.faces)


# The page --------------------------------------------------------------------------


LIMITS = (f"Up to {MAX_UPLOAD_BYTES / MEGA:.0f} MB and {MAX_PIXELS / MEGA:.0f} megapixels a photo (larger JPEGs "
          f"are scaled down). {CONCURRENT_REQUESTS} photos are scored at once and {QUEUE_SIZE} more may wait; the page "
          f"holds at most {UPLOAD_BUDGET_BYTES / MEGA:,.0f} MB of uploads. An upload is deleted once scored, or "
          f"{UNCLAIMED_S / SECONDS_PER_MINUTE:.0f} minutes after it arrived if it was never scored.")


def attributes_note(estimator):
    """What the page says about gender and ethnicity, when it shows them."""
    if not (estimator.model_file.multitask and estimator.attributes):
        return ""
    return (f"\n\nGender and ethnicity are the model's guesses from the photo's appearance, not facts about anyone; "
            f"each is shown with its probability, and one under {PERCENT * estimator.min_attribute_prob:.0f}% is "
            f"left out ({LEFT_OUT}). `app.py --no_attributes` turns them off.")


def upload_name(record):
    """The name of the user's file (a webcam picture has none of its own)."""
    record = record or {}
    return record.get("orig_name") or Path(record.get("path") or "the photo").name


def sample_photos():
    return sorted(path for path in SAMPLES_DIR.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


class Page:
    """The Gradio Blocks and their events, around one `Scorer`."""

    def __init__(self, scorer, intro):
        self.scorer = scorer
        self.samples = sample_photos()
        gr.set_static_paths([str(SAMPLES_DIR)])  # examples are served from samples/, never copied
        with gr.Blocks(title="Age estimation", analytics_enabled=False) as self.blocks:
            self.layout(intro)
            self.wire()

    def layout(self, intro):
        gr.Markdown("# Age estimation\nEvery face in a photo, with its age, the spread of the estimate and its "
                    "age distribution. Photos stay on this computer." + attributes_note(self.scorer.estimator))
        self.message = gr.HTML(f'<p class="status">{html.escape(intro)}</p>', elem_id="message")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Photo"):
                    self.upload = gr.File(label="Photo: drop it here or click to choose; it is scored at once",
                                          elem_id="upload", type="filepath")
                    gr.Markdown(LIMITS, elem_id="limits")
                with gr.Tab("Webcam"):
                    self.webcam = gr.Image(label="Webcam: take a picture to score it", sources=["webcam"],
                                           type="filepath", image_mode=None, elem_id="webcam")
                self.examples = gr.Gallery([str(path) for path in self.samples], label="Examples: click one",
                                           columns=3, height=EXAMPLES_HEIGHT_PX, allow_preview=False, elem_id="examples")
            with gr.Column(scale=2):
                self.annotated = gr.HTML(elem_id="annotated")
                self.faces = gr.HTML(elem_id="faces")
                self.choice = gr.Radio(label="Face shown in the plot", choices=[], elem_id="face-choice")
                self.plot = gr.HTML(elem_id="distribution")
        self.state = gr.State([])
        self.outputs = [self.upload, self.webcam, self.message, self.annotated, self.faces, self.choice, self.plot,
                        self.state]

    def wire(self):
        cleared = [self.message, self.annotated, self.faces, self.plot]
        # preprocess=False: the handlers take Gradio's file record (path and the user's file name) as it is;
        # gr.File's own preprocessing leaves an empty temporary file behind at every call
        scoring = {"concurrency_id": "score", "concurrency_limit": CONCURRENT_REQUESTS}
        for source, event, name in ((self.upload, self.upload.upload, "score_upload"),
                                    (self.webcam, self.webcam.input, "score_webcam")):
            event(self.clear, inputs=source, outputs=cleared, queue=False, preprocess=False,
                  api_visibility="private").then(
                self.score_upload, inputs=source, outputs=self.outputs, preprocess=False, api_name=name, **scoring)
        self.examples.select(self.score_example, outputs=self.outputs, api_name="score_example", **scoring)
        self.choice.input(distribution_html, inputs=[self.state, self.choice], outputs=self.plot, api_name="plot_face")

    @staticmethod
    def clear(record):
        """At once, before scoring: a result on the page is never the previous photo's."""
        return f'<p class="status">scoring {html.escape(upload_name(record))} …</p>', "", "", ""

    def score_upload(self, record):
        if not record or not record.get("path"):
            return page_outputs(Result(HELLO))
        return page_outputs(self.scorer.score_upload(record["path"], upload_name(record)))

    def score_example(self, selected: gr.SelectData):
        path = self.samples[selected.index]
        return page_outputs(self.scorer.score_file(path))

    def launch(self, host, port):
        """Serve in Gradio's threads and return once the page is up. Gradio prints nothing (quiet): its launch
        notes offer a public share link, which this page never makes."""
        theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)
        self.blocks.queue(max_size=QUEUE_SIZE)
        uploads = self.scorer.uploads
        self.blocks.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
                           max_file_size=MAX_UPLOAD_BYTES, footer_links=[], run_history=False, ssr_mode=False,
                           mcp_server=False, pwa=False, enable_monitoring=False, theme=theme, css=CSS, quiet=True,
                           app_kwargs={"middleware": [Middleware(UploadBudget, folder=uploads)]})
        uploads.start_sweeping()

    def serve_until_stopped(self):
        """Block until Ctrl-C or SIGTERM (see cli.sigterm_as_ctrl_c), then stop the server without a word."""
        try:
            while self.blocks.is_running:
                time.sleep(SERVE_POLL_S)
        except KeyboardInterrupt:
            pass
        finally:
            self.blocks.close(verbose=False)


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)  # before any download
    weights = chosen_model_path(args)
    estimator = load_estimator(weights, args, device)
    uploads = UploadFolder()
    try:
        with sigterm_as_ctrl_c():
            page = Page(Scorer(estimator, weights, uploads), HELLO)
            page.launch(args.host, args.port)
            where = "memory" if uploads.in_memory else "on disk"
            print(f"age estimation page on http://{args.host}:{args.port} ({weights.name}, "
                  f"{estimator.backend.name}); uploads held in {uploads.path} ({where}, at most "
                  f"{uploads.budget / MEGA:.0f} MB) and deleted once read; Ctrl-C stops", flush=True)
            page.serve_until_stopped()
    except KeyboardInterrupt:
        pass  # a signal before the server was up
    finally:
        uploads.close()


if __name__ == "__main__":
    main()
