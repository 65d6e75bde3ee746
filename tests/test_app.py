"""app.py without a browser: the request handler on real photos and bad files, the upload folder, and the server.

The page's faces are compared with `AgeEstimator.from_checkpoint()` (the default model, whichever it is) and with
demo.py's predictions.csv on the same photos, never with numbers written here.
"""
import concurrent.futures
import dataclasses
import hashlib
import html.parser
import io
import os
import re
import signal
import socket
import subprocess
import sys
import shutil
import threading
import time

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import app
import cli
import demo
import drawing
import estimator
import upload_folder
from conftest import ROOT, utkface_files
from estimator import AgeEstimator
from geometry import read_rgb
from test_estimator import multitask  # noqa: F401  (the fixture: an untrained multitask checkpoint)

SAMPLES = ROOT / "samples"
ASTRONAUT = SAMPLES / "astronaut.jpg"
CSV_ROUNDING = 0.005  # predictions.csv keeps two decimals
SHOWN_ROUNDING = 0.05  # the page shows one
PAGE_TOLERANCE = 0.1  # the largest age difference the page may show against demo.py for one photo
EXACT = 1e-6
BIG_SIZE = (12000, 9000)
FACE_SIDE_IN_BIG = 9000
BOX_SHIFT_PX = 2  # a face box may move by a pixel or two when the JPEG holding it is encoded again
CONCURRENT = 4
SERVER_START_S = 180
REQUEST_S = 120
POLL_S = 0.05


class TableReader(html.parser.HTMLParser):
    """The cells of an HTML table, row by row, header first."""

    def __init__(self):
        super().__init__()
        self.rows = []
        self.cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def table_rows(markup):
    """Dicts, one per face row, keyed by the header's column names."""
    reader = TableReader()
    reader.feed(markup)
    if not reader.rows:
        return []
    header, *rows = reader.rows
    return [dict(zip(header, row)) for row in rows]


@pytest.fixture(scope="module")
def weights():
    return cli.chosen_model_path(app.build_parser().parse_args([]))


@pytest.fixture(scope="module")
def page_estimator(weights):
    """The estimator app.main builds from an empty command line."""
    return cli.load_estimator(weights, app.build_parser().parse_args([]), torch.device("cpu"))


@pytest.fixture(scope="module")
def reference():
    return AgeEstimator.from_checkpoint()


@pytest.fixture
def uploads():
    folder = upload_folder.UploadFolder()
    yield folder
    folder.close()


@pytest.fixture
def scorer(page_estimator, weights, uploads):
    return app.Scorer(page_estimator, weights, uploads)


def put_upload(uploads, data, name):
    """A file where Gradio's upload route leaves it: in a folder of the upload folder named by the content's hash."""
    folder = uploads.path / hashlib.sha256(data).hexdigest()
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def encode(rgb, fmt, **options):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **options)
    return buffer.getvalue()


def boxes(faces):
    return [tuple(round(v) for v in face["box"]) for face in faces]


def assert_same_faces(faces, expected):
    assert boxes(faces) == boxes(expected)
    assert [face["age"] for face in faces] == pytest.approx([face["age"] for face in expected], abs=EXACT)
    assert [face["age_sd"] for face in faces] == pytest.approx([face["age_sd"] for face in expected], abs=EXACT)


# The handler on real photos -------------------------------------------------------


def test_the_page_scores_a_photo_as_the_estimator_and_draws_it_as_demo_py(scorer, uploads, reference):
    path = put_upload(uploads, ASTRONAUT.read_bytes(), "astronaut.jpg")
    result = scorer.score_upload(path, "astronaut.jpg")
    rgb = read_rgb(ASTRONAUT)
    expected = reference.predict(rgb)
    assert not result.error and len(expected) == 1
    assert_same_faces(result.faces, expected)
    assert np.array_equal(result.annotated, drawing.annotate(rgb, result.faces))
    rows = table_rows(app.faces_html(result.faces))
    assert float(rows[0]["age"]) == pytest.approx(expected[0]["age"], abs=SHOWN_ROUNDING)
    assert float(rows[0]["sd"]) == pytest.approx(expected[0]["age_sd"], abs=SHOWN_ROUNDING)
    assert result.message.startswith("astronaut.jpg: 1 face")
    assert not path.exists() and not path.parent.exists(), "the upload is deleted once read"


def test_the_table_equals_demo_py_predictions_csv_face_for_face(scorer, tmp_path):
    demo.main(["--img_dir", str(SAMPLES), "--output_dir", str(tmp_path)])
    predictions = pd.read_csv(tmp_path / demo.CSV_NAME)
    for photo in app.sample_photos():
        rows = table_rows(app.faces_html(scorer.score_file(photo).faces))
        expected = predictions[predictions["source"] == photo.name].dropna(subset=["face"])
        assert len(rows) == len(expected) >= 1, photo.name
        for row, (_, line) in zip(rows, expected.iterrows()):
            assert [int(row[k]) for k in ("x1", "y1", "x2", "y2")] == [line[k] for k in ("x1", "y1", "x2", "y2")]
            assert float(row["age"]) == pytest.approx(line["age"], abs=PAGE_TOLERANCE)


def test_bad_files_get_a_message_naming_them(scorer, uploads):
    jpeg = ASTRONAUT.read_bytes()
    cases = {
        "notes.txt": (b"age,name\n34,someone\n", "is not an image"),
        "empty.jpg": (b"", "is empty (0 bytes)"),
        "truncated.jpg": (jpeg[:len(jpeg) // 2], "truncated"),
        "random.png": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "is not an image"),
    }
    for name, (data, reason) in cases.items():
        path = put_upload(uploads, data, name)
        result = scorer.score_upload(path, name)
        assert result.error and result.message.startswith(name) and reason in result.message, result.message
        assert result.faces == [] and result.annotated is None
        assert not path.exists()


def test_a_photo_without_a_face_says_so_and_is_shown(scorer, uploads):
    rgb = read_rgb(ASTRONAUT)[:, 300:]  # the shuttle and the flag, not the face
    path = put_upload(uploads, encode(rgb, "PNG"), "shuttle.png")
    result = scorer.score_upload(path, "shuttle.png")
    assert not result.error and result.faces == []
    assert cli.NO_FACE_NOTE in result.message
    assert np.array_equal(result.annotated, rgb)
    assert table_rows(app.faces_html(result.faces)) == []


def test_a_face_that_cannot_be_cropped_is_named_on_the_page_without_a_traceback(scorer, page_estimator, monkeypatch,
                                                                                capsys):
    """A box under a pixel wide (no detector gives one) stands in for any face whose crop fails."""
    detect = page_estimator.detect

    def detect_a_broken_face(rgb):
        face = detect(rgb)[0]
        x1, y1, _, y2 = face.box
        return [dataclasses.replace(face, box=(x1, y1, x1, y2))]

    monkeypatch.setattr(page_estimator, "detect", detect_a_broken_face)
    result = scorer.score_file(ASTRONAUT)
    assert result.error and result.message.startswith("astronaut.jpg: box") and cli.UNCROPPED_NOTE in result.message
    assert "Traceback" not in capsys.readouterr().err


def rotate_stored(rgb, orientation):
    """The pixels a camera stores for an upright scene with this EXIF orientation (6: turned 90 degrees clockwise)."""
    image = Image.fromarray(rgb)
    return np.asarray(image.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else image)


def test_greyscale_alpha_16_bit_and_sideways_photos_are_scored_as_their_upright_rgb(scorer, uploads, reference):
    """Each lossless variant of the photo gets exactly the faces of the RGB photo it shows."""
    rgb = read_rgb(ASTRONAUT)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = {
        "grey.png": (encode(grey, "PNG"), np.dstack([grey] * 3)),
        "rgba.png": (encode(np.dstack([rgb, np.full(grey.shape, 255, np.uint8)]), "PNG"), rgb),
        "16bit.png": (cv2.imencode(".png", cv2.cvtColor(rgb.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))[1].tobytes(),
                      rgb),
        "sideways.png": (encode(rotate_stored(rgb, 6), "PNG", exif=exif.tobytes()), rgb),
    }
    for name, (data, shown) in variants.items():
        result = scorer.score_upload(put_upload(uploads, data, name), name)
        assert not result.error, result.message
        assert_same_faces(result.faces, reference.predict(shown))


def test_a_phone_photo_stored_sideways_is_scored_upright(scorer, uploads, reference):
    """A JPEG stored turned, with EXIF orientation 6, as phones write: the face where it is in the upright photo."""
    rgb = read_rgb(ASTRONAUT)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(rotate_stored(rgb, 6), "JPEG", quality=95, exif=exif.tobytes())
    result = scorer.score_upload(put_upload(uploads, data, "phone.jpg"), "phone.jpg")
    upright = reference.predict(rgb)
    assert len(result.faces) == len(upright) == 1
    assert np.abs(np.subtract(result.faces[0]["box"], upright[0]["box"])).max() <= BOX_SHIFT_PX
    assert result.annotated.shape == rgb.shape


@pytest.fixture(scope="module")
def big_jpeg():
    """12,000 x 9,000 pixels (a 108-megapixel phone's photo): the sample portrait enlarged, on grey."""
    canvas = np.full((BIG_SIZE[1], BIG_SIZE[0], 3), 128, np.uint8)
    left = (BIG_SIZE[0] - FACE_SIDE_IN_BIG) // 2
    canvas[:, left:left + FACE_SIDE_IN_BIG] = cv2.resize(read_rgb(ASTRONAUT), (FACE_SIDE_IN_BIG, FACE_SIDE_IN_BIG))
    return cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_a_12000_by_9000_jpeg_is_scaled_down_before_detection(scorer, uploads, big_jpeg):
    photo = app.decode_photo(big_jpeg, "big.jpg")
    assert photo.rgb.shape[0] * photo.rgb.shape[1] <= app.MAX_PIXELS
    assert photo.rgb.shape[:2] == (BIG_SIZE[1] // 2, BIG_SIZE[0] // 2) and photo.size == BIG_SIZE
    result = scorer.score_upload(put_upload(uploads, big_jpeg, "big.jpg"), "big.jpg")
    assert len(result.faces) == 1 and "scaled to 6000 × 4500" in result.message
    x1, y1, x2, y2 = result.faces[0]["box"]
    assert x2 > BIG_SIZE[0] / 2 > x1 and y2 <= BIG_SIZE[1], "the box is in the original photo's pixels"
    assert max(result.annotated.shape) == app.DISPLAY_MAX_SIDE


def test_a_12000_by_9000_png_is_refused_with_the_limit_named(scorer, uploads):
    data = cv2.imencode(".png", np.full((BIG_SIZE[1], BIG_SIZE[0], 3), 128, np.uint8))[1].tobytes()
    result = scorer.score_upload(put_upload(uploads, data, "big.png"), "big.png")
    assert result.error and "12000 × 9000" in result.message and "limit of 50" in result.message


def test_resume_takes_a_multitask_checkpoint_and_the_table_shows_gender_and_ethnicity(multitask, uploads):
    args = app.build_parser().parse_args(["--resume", str(multitask)])
    weights = cli.chosen_model_path(args)
    scorer = app.Scorer(cli.load_estimator(weights, args, torch.device("cpu")), weights, uploads)
    result = scorer.score_file(ASTRONAUT)
    expected = AgeEstimator.from_checkpoint(multitask).predict(read_rgb(ASTRONAUT))
    assert_same_faces(result.faces, expected)
    rows = table_rows(app.faces_html(result.faces))
    for row, face in zip(rows, expected):
        assert row["gender"] == f"{face['gender'] or app.LEFT_OUT} ({100 * face['gender_prob']:.0f}%)"
        assert row["ethnicity"] == f"{face['race'] or app.LEFT_OUT} ({100 * face['race_prob']:.0f}%)"
    assert f"{multitask.name} (tinyage, " in result.message


GRACE_HOPPER = SAMPLES / "grace_hopper.jpg"


def test_the_page_calls_gender_and_ethnicity_guesses_leaves_out_unsure_ones_and_turns_them_off(weights, uploads):
    """The shipped model gives Grace Hopper's ethnicity at 42%: the table keeps the probability and leaves out the
    label; --no_attributes leaves out both columns, and the page's note goes with them."""
    for argv, shown in (([], True), (["--no_attributes"], False)):
        args = app.build_parser().parse_args(argv)
        page_estimator = cli.load_estimator(weights, args, torch.device("cpu"))
        result = app.Scorer(page_estimator, weights, uploads).score_file(GRACE_HOPPER)
        reference = AgeEstimator.from_checkpoint(min_attribute_prob=0).predict(read_rgb(GRACE_HOPPER))[0]
        row = table_rows(app.faces_html(result.faces))[0]
        note = app.attributes_note(page_estimator)
        if not shown:
            assert "gender" not in row and "ethnicity" not in row and note == ""
            continue
        assert "guesses from the photo's appearance" in note and "under 70%" in note
        for head, column in (("gender", "gender"), ("race", "ethnicity")):
            probability = reference[f"{head}_prob"]
            label = reference[head] if probability >= estimator.DEFAULT_MIN_ATTRIBUTE_PROB else app.LEFT_OUT
            assert row[column] == f"{label} ({100 * probability:.0f}%)"
        assert row["ethnicity"].startswith(app.LEFT_OUT), "an ethnicity at 42% (under --min_attribute_prob) is left out"


# Uploads --------------------------------------------------------------------------


def test_the_upload_folder_is_private_reads_only_uploads_and_goes_at_close(page_estimator, weights):
    folder = upload_folder.UploadFolder()
    assert os.environ["GRADIO_TEMP_DIR"] == str(folder.path)
    assert folder.path.stat().st_mode & 0o777 == 0o700
    with pytest.raises(PermissionError):
        with folder.reading(ASTRONAUT):
            pass
    path = put_upload(folder, ASTRONAUT.read_bytes(), "astronaut.jpg")
    with folder.reading(path) as first, folder.reading(path) as second:
        assert first == second
    assert not path.exists(), "deleted when the last of two requests reading the same upload ends"
    put_upload(folder, b"left", "behind.txt")
    folder.close()
    assert not folder.path.exists()


def test_the_upload_folder_goes_to_disk_when_memory_cannot_hold_its_budget():
    """A default Docker container's /dev/shm has 64 MB; the page takes more than that, so it must not fill it."""
    if upload_folder.upload_parent(0) is None:
        pytest.skip(f"{upload_folder.MEMORY_FOLDER} is not a writable folder here")
    too_big = shutil.disk_usage(upload_folder.MEMORY_FOLDER).free + 1
    for budget, in_memory in ((too_big, False), (1, True)):
        folder = upload_folder.UploadFolder(budget)
        try:
            assert folder.in_memory == in_memory
            assert folder.path.is_relative_to(upload_folder.MEMORY_FOLDER.resolve()) == in_memory
            assert folder.path.stat().st_mode & 0o777 == 0o700
        finally:
            folder.close()


def test_uploads_no_request_reads_are_deleted_after_a_short_time(uploads, monkeypatch):
    """Files sent to Gradio's upload route alone, and the half of an upload whose client left, go after
    UNCLAIMED_S; a file a request is reading stays, however old, and a fresh one stays."""
    stale = time.time() - upload_folder.UNCLAIMED_S - 1
    unclaimed = put_upload(uploads, b"never scored", "unclaimed.jpg")
    being_read = put_upload(uploads, ASTRONAUT.read_bytes(), "astronaut.jpg")
    half = uploads.path / "tmp_half_of_an_upload"
    half.write_bytes(b"the client left")
    fresh = put_upload(uploads, b"just arrived", "fresh.jpg")
    for path in (unclaimed, being_read, half):
        os.utime(path, (stale, stale))
    with uploads.reading(being_read):
        uploads.sweep()
        assert being_read.exists()
    assert not unclaimed.exists() and not unclaimed.parent.exists() and not half.exists()
    assert fresh.exists() and not being_read.exists(), "the one read is deleted when its request ends"
    monkeypatch.setattr(upload_folder, "UNCLAIMED_S", 0)
    monkeypatch.setattr(upload_folder, "SWEEP_EVERY_S", POLL_S)
    uploads.start_sweeping()
    deadline = time.monotonic() + REQUEST_S
    while fresh.exists():
        assert time.monotonic() < deadline, "the sweeping thread never deleted the unclaimed upload"
        time.sleep(POLL_S)


# Several users at once -------------------------------------------------------------


def family_photos(folder):
    """Four photos, each with its own real faces: the samples and two pairs of UTKFace adults side by side."""
    people = [read_rgb(row[0]) for row in utkface_files() if 20 <= row[1] <= 60][::700][:4]
    photos = list(app.sample_photos())[:2]
    for index in range(2):
        canvas = np.full((300, 560, 3), 128, np.uint8)
        canvas[50:250, 40:240], canvas[50:250, 320:520] = people[2 * index], people[2 * index + 1]
        photos.append(folder / f"pair{index}.png")
        cv2.imwrite(str(photos[-1]), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return photos


def test_four_requests_at_once_each_get_their_own_faces(scorer, uploads, reference, tmp_path):
    photos = family_photos(tmp_path)
    expected = [reference.predict(read_rgb(photo)) for photo in photos]
    paths = [put_upload(uploads, photo.read_bytes(), photo.name) for photo in photos]
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        results = list(pool.map(scorer.score_upload, paths, [photo.name for photo in photos]))
    for result, faces, photo in zip(results, expected, photos):
        assert result.message.startswith(photo.name) and faces
        assert_same_faces(result.faces, faces)


class Rendezvous(app.Scorer):
    """Each request waits in the handler until four are there at once: a server that runs them one by one fails."""

    def __init__(self, *args):
        super().__init__(*args)
        self.barrier = threading.Barrier(CONCURRENT, timeout=REQUEST_S)

    def score_upload(self, path, name):
        self.barrier.wait()
        return super().score_upload(path, name)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_server_runs_four_uploads_at_once_and_each_gets_its_own_faces(page_estimator, weights, reference,
                                                                          tmp_path):
    from gradio_client import Client, handle_file

    photos = family_photos(tmp_path)
    expected = [reference.predict(read_rgb(photo)) for photo in photos]
    uploads = upload_folder.UploadFolder()
    page = app.Page(Rendezvous(page_estimator, weights, uploads), app.HELLO)
    port = free_port()
    page.launch("127.0.0.1", port)
    try:
        def send(photo):
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            return client.predict(handle_file(str(photo)), api_name="/score_upload")

        with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
            answers = list(pool.map(send, photos))
    finally:
        page.blocks.close()
        uploads.close()
    for answer, faces, photo in zip(answers, expected, photos):
        message, table = answer[2], answer[4]
        assert photo.name in message
        rows = table_rows(table)
        assert [tuple(int(row[k]) for k in ("x1", "y1", "x2", "y2")) for row in rows] == boxes(faces)
        assert [float(row["age"]) for row in rows] == pytest.approx([f["age"] for f in faces], abs=SHOWN_ROUNDING)


BUDGET_BYTES = 3_000_000
UPLOAD_BYTES = 2_000_000


class HeldInHandler(app.Scorer):
    """Each request waits in the handler until released: the queue behind it fills as a slow server's would."""

    def __init__(self, *args):
        super().__init__(*args)
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def score_upload(self, path, name):
        self.entered.release()
        self.release.wait(REQUEST_S)
        return super().score_upload(path, name)


def test_the_server_bounds_the_bytes_it_holds_and_the_requests_that_wait(page_estimator, weights, monkeypatch):
    """An upload past the folder's budget is refused before it is stored, one without a declared size too, and a
    request past the queue's size is refused: nothing the page holds grows without bound."""
    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.utils import QueueError

    monkeypatch.setattr(app, "CONCURRENT_REQUESTS", 1)
    monkeypatch.setattr(app, "QUEUE_SIZE", 1)
    uploads = upload_folder.UploadFolder(BUDGET_BYTES)
    scorer = HeldInHandler(page_estimator, weights, uploads)
    page = app.Page(scorer, app.HELLO)
    port = free_port()
    page.launch("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/gradio_api/upload"
    try:
        first = httpx.post(url, files={"files": ("a.jpg", os.urandom(UPLOAD_BYTES))}, timeout=REQUEST_S)
        second = httpx.post(url, files={"files": ("b.jpg", os.urandom(UPLOAD_BYTES))}, timeout=REQUEST_S)
        undeclared = httpx.post(url, content=iter([b"--x\r\n"]), timeout=REQUEST_S,
                                headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert first.status_code == 200 and uploads.held_bytes() == UPLOAD_BYTES
        assert second.status_code == 413 and "takes at most 3 MB" in second.text
        assert undeclared.status_code == 411
        uploads.sweep(now=time.time() + upload_folder.UNCLAIMED_S + 1)
        again = httpx.post(url, files={"files": ("b.jpg", os.urandom(UPLOAD_BYTES))}, timeout=REQUEST_S)
        assert again.status_code == 200, "room again once the unclaimed upload is swept"

        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(3)]
        running = clients[0].submit(handle_file(str(ASTRONAUT)), api_name="/score_upload")
        assert scorer.entered.acquire(timeout=REQUEST_S), "the first request never reached the handler"
        waiting = clients[1].submit(handle_file(str(ASTRONAUT)), api_name="/score_upload")
        deadline = time.monotonic() + REQUEST_S
        while len(page.blocks._queue) < 1:
            assert time.monotonic() < deadline, "the second request never joined the queue"
            time.sleep(POLL_S)
        with pytest.raises(QueueError, match="Queue is full"):
            clients[2].predict(handle_file(str(ASTRONAUT)), api_name="/score_upload")
        scorer.release.set()
        assert "astronaut.jpg: 1 face" in running.result(timeout=REQUEST_S)[2]
        assert "astronaut.jpg: 1 face" in waiting.result(timeout=REQUEST_S)[2]
    finally:
        scorer.release.set()
        page.blocks.close()
        uploads.close()


# The real command -------------------------------------------------------------------

# app.py run with an audit hook that reports every connection or name lookup beyond this machine
LAUNCHER = """
import runpy, sys
LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "", None)
def report(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        host = args[0] if event == "socket.getaddrinfo" else args[1]
        host = host[0] if isinstance(host, tuple) else host
        host = host.decode() if isinstance(host, bytes) else host
        if isinstance(host, str) and host.startswith("/"):
            return
        if host not in LOCAL:
            print(f"OUTSIDE {event} {host!r}", file=sys.stderr, flush=True)
sys.addaudithook(report)
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_app(port):
    """app.py in its own process; returns it once it serves, with the upload folder it announced."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ROOT / "app.py"), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "age estimation page on" in line:
            break
    folder = re.search(r"uploads held in (\S+) \(", "".join(lines))
    assert process.poll() is None and folder, "".join(lines)
    return process, folder.group(1), lines


def test_app_py_serves_offline_deletes_uploads_and_cleans_up_on_sigterm(reference):
    from gradio_client import Client, handle_file

    port = free_port()
    process, folder, lines = start_app(port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        answer = client.predict(handle_file(str(ASTRONAUT)), api_name="/score_upload")
        assert os.listdir(folder) == [], "the upload is deleted once scored"
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=REQUEST_S)
    output = "".join(lines) + rest
    rows = table_rows(answer[4])
    assert float(rows[0]["age"]) == pytest.approx(reference.predict(read_rgb(ASTRONAUT))[0]["age"], abs=SHOWN_ROUNDING)
    assert "OUTSIDE" not in output, output
    assert not os.path.exists(folder), "SIGTERM removes the upload folder"
    assert process.returncode == 0, output
    for noise in ("share=True", "public link", "Keyboard interruption", "Traceback"):
        assert noise not in output, output
