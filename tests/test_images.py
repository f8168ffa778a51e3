"""Image tasks without the engine: the compiler over <Image>, prompts with image parts, and image fetching
against a real local HTTP server (Pillow-made images, real sockets, the real SSRF guard).

The local server stands in for Label Studio's file serving (`/data/upload/...` answers only with the right
token) and for remote image hosts: a real Label Studio is exercised by tests/e2e, and remote hosts cannot be
reached from this machine. Because the server is on loopback, tests that fetch from it set
`allow_private=True` or make it the trusted LABEL_STUDIO_URL host; the guard tests check it is refused
otherwise.
"""
from __future__ import annotations

import base64
import socket
import io
import json
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.errors import InvalidTaskData, UnsupportedLabelConfig
from backend.images import (
    ForbiddenImageUrl,
    ImageError,
    ImageFetcher,
    ImageLimits,
    ImageTooLarge,
    LabelStudioAccess,
    UnsupportedImageType,
    is_public_address,
)
from backend.label_config import compile_label_config
from backend.prompts import build_choice_messages, build_messages, message_images, message_text, reward_text
from tests.conftest import load_config, shipped_configs

TOKEN = "ls-legacy-token-123"
VQA = """<View>
  <Image name="image" value="$image"/>
  <Text name="question" value="$question"/>
  <TextArea name="answer" toName="image" maxLength="80"/>
  <Rating name="quality" toName="image" maxRating="3"/>
  <Choices name="tags" toName="image" choice="multiple"><Choice value="Indoor"/><Choice value="Outdoor"/></Choices>
</View>"""


# --- images made with Pillow ----------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def png(size=(40, 30), color=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", size, color))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (a decompression bomb's calling card), with no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


GOOD = png()
CORRUPT = GOOD[:60] + b"\x00garbage" * 20  # valid PNG header, broken image data


# --- a real local HTTP server ---------------------------------------------------------------------


class ImageHost(ThreadingHTTPServer):
    """Routes: /ok.png, /corrupt.png, /page (text/html), /big.png (chunked, no length), /upload-like paths
    that need the token, /redirect?to=URL; it records the Authorization header of every request."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen_auth: list[tuple[str, str | None]] = []
        self.big = png((600, 600), (1, 2, 3)) + b"\x00" * 200_000

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        host: ImageHost = self.server
        auth = self.headers.get("Authorization")
        host.seen_auth.append((self.path, auth))
        path = self.path.split("?", 1)[0]
        if path.startswith("/data/"):
            if auth != f"Token {TOKEN}":
                return self._send(401, b'{"detail":"Authentication credentials were not provided."}', "application/json")
            return self._send(200, GOOD, "image/png")
        if path == "/ok.png":
            return self._send(200, GOOD, "image/png")
        if path == "/corrupt.png":
            return self._send(200, CORRUPT, "image/png")
        if path == "/page":
            return self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
        if path == "/big.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the size is only known while reading
            self.wfile.write(host.big)
            return None
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def host():
    server = ImageHost()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def fetcher(**limits) -> ImageFetcher:
    return ImageFetcher(ImageLimits(**limits))


def prepare(reference: str, access: LabelStudioAccess = LabelStudioAccess(), **limits):
    return fetcher(**limits).prepare(reference, access, "task 7 image 'image'")


# --- compiler ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", shipped_configs(images=True))
def test_shipped_image_configs_compile_and_read_their_sample_tasks(name):
    xml, tasks = load_config(name)
    config = compile_label_config(xml)
    assert [obj.name for obj in config.image_objects] == ["image"]
    for task in tasks:
        texts = config.read_task(task, 100)  # data URIs are longer than the text limit: images have their own
        assert texts["image"].startswith("data:image/png;base64,")
        prepared = prepare(texts["image"])
        assert (prepared.width, prepared.height) == (48, 48)


def test_image_controls_compile_and_results_are_valid_for_label_studio():
    config = compile_label_config(VQA)
    assert [c.name for c in config.controls] == ["answer", "quality", "tags"]
    assert [o.name for o in config.objects] == ["image", "question"]  # the question is context for the model
    texts = config.read_task({"id": 1, "data": {"image": "/data/upload/1/a.png", "question": "Where is it?"}}, 1000)
    assert texts == {"image": "/data/upload/1/a.png", "question": "Where is it?"}
    result = config.parse(json.dumps({"answer": "in a kitchen", "quality": 2, "tags": ["Indoor"]}), texts)
    assert {r["to_name"] for r in result} == {"image"}
    assert LabelInterface(VQA).validate_prediction({"result": result})
    assert config.enumerable_control(16) is None
    single = compile_label_config(load_config("image_classification")[0])
    assert single.enumerable_control(16).options() == ["Circle", "Square", "Triangle"]


@pytest.mark.parametrize(
    "xml, named",
    [
        ('<View><Image name="i" value="$i"/><Labels name="l" toName="i"><Label value="A"/></Labels></View>', "Labels"),
        ('<View><Image name="i" value="$i"/><Number name="n" toName="i"/></View>', "Number"),
        ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="A"/></RectangleLabels></View>', "RectangleLabels"),
    ],
)
def test_unsupported_image_controls_are_named(xml, named):
    with pytest.raises(UnsupportedLabelConfig) as err:
        compile_label_config(xml)
    assert named in err.value.message and err.value.status == 422


@pytest.mark.parametrize("data, message", [({"question": "q"}, "'image'"), ({"image": "  ", "question": "q"}, "empty")])
def test_missing_or_empty_image_field_is_422(data, message):
    with pytest.raises(InvalidTaskData) as err:
        compile_label_config(VQA).read_task({"id": 3, "data": data}, 1000)
    assert message in err.value.message


# --- prompts ----------------------------------------------------------------------------------------


def test_prompts_carry_the_image_as_an_image_url_part():
    config = compile_label_config(VQA)
    texts = {"image": "/data/upload/1/a.png", "question": "What is on the table?"}
    # training keeps the task's reference; serving sends the validated data URI
    for images, expected in ((None, "/data/upload/1/a.png"), ({"image": data_uri(GOOD)}, data_uri(GOOD))):
        messages = build_messages(config, texts, "", images)
        user = messages[-1]["content"]
        assert user[0] == {"type": "image_url", "image_url": {"url": expected}}
        assert "What is on the table?" in message_text(user) and "(image 'image', attached)" in message_text(user)
        assert message_images(messages) == [expected]
    classification = compile_label_config(load_config("image_classification")[0])
    choice = build_choice_messages(
        classification, {"image": "x"}, classification.controls[0], ["Circle", "Square"], "", {"image": data_uri(GOOD)}
    )
    assert message_images(choice) == [data_uri(GOOD)]
    assert "- Circle" in message_text(choice[-1]["content"])
    assert reward_text(build_messages(config, texts), '{"answer":"x"}').startswith("image:\n(image 'image', attached)")


def test_text_configs_keep_plain_string_prompts():
    xml, tasks = load_config("sentiment")
    config = compile_label_config(xml)
    assert isinstance(build_messages(config, config.read_task(tasks[0], 1000))[-1]["content"], str)


# --- fetching: every reference form ------------------------------------------------------------------


def test_data_uri_http_url_and_label_studio_upload_are_fetched(host):
    assert prepare(data_uri(GOOD)).width == 40
    assert prepare(host.url + "/ok.png", allow_private=True).height == 30
    label_studio = LabelStudioAccess(url=host.url, token=TOKEN, trusted=True)
    prepared = prepare("/data/upload/3/cat.png", label_studio)  # trusted LABEL_STUDIO_URL host: guard passes
    assert prepared.png.startswith(b"\x89PNG") and prepared.data_uri().startswith("data:image/png;base64,")
    assert (f"/data/upload/3/cat.png", f"Token {TOKEN}") in host.seen_auth
    prepare("/data/local-files/?d=dir/1.png", label_studio)  # local-files storage, served by Label Studio


def test_upload_without_the_token_names_the_http_status(host):
    with pytest.raises(ImageError) as err:
        prepare("/data/upload/3/cat.png", LabelStudioAccess(url=host.url, token="", trusted=True))
    assert err.value.status == 422 and "HTTP 401" in err.value.message and "task 7 image 'image'" in err.value.message


def test_label_studio_path_without_a_label_studio_url_says_what_to_set():
    with pytest.raises(ImageError) as err:
        prepare("/data/upload/3/cat.png")
    assert "LABEL_STUDIO_URL" in err.value.message


def test_token_goes_to_label_studio_only(host):
    other_host = host.url.replace("127.0.0.1", "localhost")  # same server, another netloc
    host.seen_auth.clear()
    prepare(other_host + "/ok.png", LabelStudioAccess(url=host.url, token=TOKEN, trusted=True), allow_private=True)
    assert host.seen_auth == [("/ok.png", None)]


def test_local_files_are_read_from_the_document_root_and_confined_to_it(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "1.png").write_bytes(GOOD)
    assert prepare("/data/local-files/?d=dir/1.png", local_files_root=str(tmp_path)).width == 40
    (tmp_path.parent / "secret.png").write_bytes(GOOD)
    with pytest.raises(ForbiddenImageUrl):
        prepare("/data/local-files/?d=../secret.png", local_files_root=str(tmp_path))


# --- SSRF guard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, public",
    [("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
     ("192.168.0.5", False), ("172.16.0.1", False), ("169.254.169.254", False), ("0.0.0.0", False), ("::1", False),
     ("::ffff:127.0.0.1", False), ("fc00::1", False), ("fe80::1", False), ("100.64.0.1", False), ("224.0.0.1", False)],
)
def test_public_address_classification(address, public):
    assert is_public_address(address) is public


def test_private_address_is_refused_unless_allowed(host):
    with pytest.raises(ForbiddenImageUrl) as err:
        prepare(host.url + "/ok.png")
    assert err.value.status == 403 and "127.0.0.1" in err.value.message and "DATAENGINE_ALLOW_PRIVATE_URLS" in err.value.message
    with pytest.raises(ForbiddenImageUrl):  # a host name that resolves to loopback is no way around it
        prepare(host.url.replace("127.0.0.1", "localhost") + "/ok.png")
    assert prepare(host.url + "/ok.png", allow_private=True).width == 40


def test_label_studio_host_from_setup_is_not_trusted(host):
    """Only the operator's LABEL_STUDIO_URL is trusted; a `hostname` sent to /setup goes through the guard."""
    with pytest.raises(ForbiddenImageUrl):
        prepare("/data/upload/3/cat.png", LabelStudioAccess(url=host.url, token=TOKEN, trusted=False))


def test_every_redirect_hop_is_checked(host):
    """The trusted Label Studio host redirects to another private address: refused at that hop."""
    label_studio = LabelStudioAccess(url=host.url, token=TOKEN, trusted=True)
    target = host.url.replace("127.0.0.1", "localhost") + "/ok.png"
    with pytest.raises(ForbiddenImageUrl):
        prepare(f"{host.url}/redirect?to={target}", label_studio)
    assert prepare(f"{host.url}/redirect?to={target}", label_studio, allow_private=True).width == 40


# --- bad images ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, limits, error, status, words",
    [
        (data_uri(CORRUPT), {}, ImageError, 422, "corrupt"),
        (data_uri(b"hello, not an image", "image/png"), {}, ImageError, 422, "not a readable image"),
        (data_uri(GOOD[: len(GOOD) // 2]), {}, ImageError, 422, "corrupt"),
        ("data:image/png;base64,@@@not-base64", {}, ImageError, 422, "base64"),
        (data_uri(b"<svg/>", "image/svg+xml"), {}, UnsupportedImageType, 415, "image/svg+xml"),
        (data_uri(encode(Image.new("RGB", (8, 8)), "TIFF"), "application/octet-stream"), {}, UnsupportedImageType, 415, "TIFF"),
        (data_uri(png_header_only(50_000, 50_000)), {}, ImageTooLarge, 413, "pixels"),
        (data_uri(png_header_only(30_000, 2_000)), {}, ImageTooLarge, 413, "DATAENGINE_IMAGE_MAX_PIXELS"),
        (data_uri(GOOD), {"max_bytes": 100}, ImageTooLarge, 413, "DATAENGINE_IMAGE_MAX_BYTES"),
        ("s3://bucket/cat.png", {}, ImageError, 422, "cloud storage"),
        ("file:///etc/passwd", {}, ImageError, 422, "not an image URL"),
        ("just some words", {}, ImageError, 422, "not an image URL"),
        ("http://no-such-host.invalid/cat.png", {}, ImageError, 422, "cannot resolve host"),
    ],
)
def test_bad_images_get_a_clear_4xx(reference, limits, error, status, words):
    with pytest.raises(error) as err:
        prepare(reference, **limits)
    assert err.value.status == status, err.value.message
    assert words in err.value.message and "task 7 image 'image'" in err.value.message


@pytest.mark.parametrize(
    "path, limits, status, words",
    [
        ("/corrupt.png", {}, 422, "corrupt"),
        ("/page", {}, 415, "text/html"),
        ("/missing.png", {}, 422, "HTTP 404"),
        ("/big.png", {"max_bytes": 100_000}, 413, "DATAENGINE_IMAGE_MAX_BYTES"),  # streamed, no Content-Length
        ("/ok.png", {"max_bytes": 50}, 413, "DATAENGINE_IMAGE_MAX_BYTES"),  # Content-Length says so
    ],
)
def test_bad_images_over_http_get_a_clear_4xx(host, path, limits, status, words):
    with pytest.raises(ImageError) as err:
        prepare(host.url + path, allow_private=True, **limits)
    assert err.value.status == status and words in err.value.message, err.value.message


def test_unreachable_url_is_422():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageError) as err:
        prepare(f"http://127.0.0.1:{port}/cat.png", allow_private=True)
    assert err.value.status == 422 and "cannot fetch" in err.value.message


def test_large_images_are_scaled_down_for_the_engine():
    prepared = prepare(data_uri(png((2000, 500))), max_side=256)
    assert (prepared.width, prepared.height) == (2000, 500)  # what the task holds
    assert Image.open(io.BytesIO(prepared.png)).size == (256, 64)  # what the engine sees
    rgba = encode(Image.new("RGBA", (10, 10), (1, 2, 3, 4)))
    assert Image.open(io.BytesIO(prepare(data_uri(rgba)).png)).mode == "RGB"


# --- training keeps the image reference ------------------------------------------------------------


def test_preference_pairs_and_sft_keep_the_image_reference():
    from training.preferences import derive

    xml, _ = load_config("image_classification")
    shape = lambda label: [{"from_name": "shape", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]  # noqa: E731
    task = {
        "id": 11,
        "data": {"image": "/data/upload/4/circle.png"},
        "annotations": [{"id": 1, "completed_by": 1, "result": shape("Circle"), "parent_prediction": 21}],
        "predictions": [{"id": 21, "result": shape("Circle")}, {"id": 22, "result": shape("Square")}],
    }
    derived = derive([task], xml)
    assert derived.pairs and derived.sft
    for prompt in [p.prompt for p in derived.pairs] + [derived.sft[0].prompt]:
        assert message_images(prompt) == ["/data/upload/4/circle.png"]
    assert {(p.chosen, p.rejected) for p in derived.pairs} == {('{"shape":"Circle"}', '{"shape":"Square"}')}


def test_only_vision_models_get_the_engine_image_limits(tmp_path):
    from backend.engine_process import EngineProcess
    from backend.settings import Settings

    for name, config, expected in (("text", {"model_type": "llama"}, False), ("vlm", {"vision_config": {}}, True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        settings = Settings(engine_python=__import__("sys").executable, engine_max_images=2, image_max_side=512)
        command = EngineProcess(settings).command(str(tmp_path / name))
        assert ("--limit-mm-per-prompt" in command) is expected
        if expected:
            limits = json.loads(command[command.index("--limit-mm-per-prompt") + 1])
            assert limits == {"image": {"count": 2, "width": 512, "height": 512}, "video": 0}


# --- the host httpx connects to, pinned (issue 15, point 4) -----------------------------------------------
# DNS answers cannot be controlled on this machine, so these tests replace socket.getaddrinfo with a resolver
# that answers for a few made-up names and passes every other lookup to the real one. Python's getaddrinfo
# encodes a non-ASCII name with the IDNA 2003 codec, and the fake does the same.

PUBLIC = "93.184.216.34"


class FakeDns:
    def __init__(self, monkeypatch, answers: dict[str, list[str]]):
        self.answers, self.asked = answers, []
        self.real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)

    def __call__(self, host, port, *args, **kwargs):
        name = host.encode("idna").decode("ascii") if isinstance(host, str) else host.decode("ascii")
        self.asked.append(name)
        if name not in self.answers:
            return self.real(host, port, *args, **kwargs)
        address = self.answers[name].pop(0) if len(self.answers[name]) > 1 else self.answers[name][0]
        return self.real(address, port, *args, **kwargs)


def test_the_idna_2008_name_httpx_connects_to_is_the_one_checked(host, monkeypatch):
    """straße.test: Python's resolver would check strasse.test (public); httpx connects to xn--strae-oqa.test."""
    port = host.url.rsplit(":", 1)[1]
    FakeDns(monkeypatch, {"strasse.test": [PUBLIC], "xn--strae-oqa.test": ["127.0.0.1"]})
    host.seen_auth.clear()
    with pytest.raises(ForbiddenImageUrl) as err:
        prepare(f"http://straße.test:{port}/ok.png", timeout=2)
    assert "127.0.0.1" in err.value.message and host.seen_auth == []


def test_the_connection_goes_to_the_address_that_was_checked(host, monkeypatch):
    """DNS rebinding: public at the check, loopback a moment later. The fetch must never reach loopback."""
    port = host.url.rsplit(":", 1)[1]
    dns = FakeDns(monkeypatch, {"rebind.test": [PUBLIC, "127.0.0.1"]})
    host.seen_auth.clear()
    with pytest.raises(ImageError):  # whatever answers at the public address, it is not an image
        prepare(f"http://rebind.test:{port}/ok.png", timeout=2)
    assert host.seen_auth == [] and dns.asked.count("rebind.test") == 1


@pytest.mark.parametrize(
    "address, public",
    [("64:ff9b::7f00:1", False), ("64:ff9b::a00:1", False), ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::808:808", True),
     ("64:ff9b:1::a00:1", False), ("2002:7f00:1::1", False), ("2002:808:808::1", True)],
)
def test_ipv4_embedded_in_ipv6_is_judged_by_the_ipv4_address(address, public):
    assert is_public_address(address) is public


def test_nat64_address_of_loopback_is_refused(host, monkeypatch):
    port = host.url.rsplit(":", 1)[1]
    FakeDns(monkeypatch, {"nat64.test": ["64:ff9b::7f00:1"]})
    with pytest.raises(ForbiddenImageUrl) as err:
        prepare(f"http://nat64.test:{port}/ok.png")
    assert "64:ff9b::7f00:1" in err.value.message
