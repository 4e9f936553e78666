"""Images through the OpenAI API, on a real `trainonce serve` of a package that carries an image tokenizer: image_url
parts are read as the model's image tokens (data URLs only), /v1/images/generations draws PNGs with the official
`openai` client, a drawing sent back is read, and every bad image is a 400 naming the part and the problem."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from models.chat_format import Message
from models.moe import ElasticMoE
from registry.names import CHAT_MODEL
from registry.promotion import promote
from serving.engine import ChatPackage
from tasks.data.corpus import PreparedData
from tests.conftest import image_model

from .test_server import API_KEY, running_server


def package_of(model: ElasticMoE, image_data: PreparedData, output: Path, graph: str = "fused") -> Path:
    """The fp32 chat package of `model` over the text-and-image vocabulary, with its codebook."""
    from tasks.deploy.config import DeployConfig
    from tasks.deploy.onnx_export import build_packages

    images = image_data.images
    assert images is not None
    config = DeployConfig(variants=("fp32",), graph=graph, hugging_face=False)
    tokenizer, chat_format = image_data.tokenizer_path, image_data.chat_format
    return build_packages(model, tokenizer, chat_format, output, config, images.image_tokenizer)["fp32"]


@pytest.fixture(scope="module")
def image_package(tmp_path_factory: pytest.TempPathFactory, image_data: PreparedData) -> Path:
    return package_of(image_model(), image_data, tmp_path_factory.mktemp("image-package"))


@pytest.fixture(scope="module")
def image_registry(tmp_path_factory: pytest.TempPathFactory, image_package: Path) -> Path:
    """The package registered as `trainonce-chat` version 1, the champion."""
    from registry.models import register_chat_package
    from registry.tracking import RunLogger
    from serving import CHAT_PYFUNC_CODE

    workdir = tmp_path_factory.mktemp("image-registry")
    logger = RunLogger(workdir, run_name="export")
    register_chat_package(workdir, logger.run_id, image_package, {"quantization": "fp32"}, CHAT_PYFUNC_CODE)
    logger.finish()
    promote(workdir, CHAT_MODEL, "1")
    return workdir


@pytest.fixture(scope="module")
def image_client(image_registry: Path) -> Iterator[openai.OpenAI]:
    with running_server(image_registry) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def png_url(pixels: np.ndarray, side: int = 8, kind: str = "png") -> str:
    grey = np.kron(np.round(pixels * 255).astype(np.uint8), np.ones((side // 8, side // 8), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format=kind.upper())
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(image_url: str, question: str = "Which digit is this?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}],
        }
    ]


def test_an_image_part_is_read_as_the_model_s_image_tokens(
    image_client: openai.OpenAI, image_package: Path, image_data: PreparedData
) -> None:
    """The server's reply to an image question is the package's own greedy reply to the drawing's token text
    followed by the question: the prompt SFT's digit_read examples have."""
    images = image_data.images
    assert images is not None
    digit = images.split("held_out").pixels[0]
    reply = image_client.chat.completions.create(model=CHAT_MODEL, messages=ask(png_url(digit)), max_tokens=6)
    package = ChatPackage(image_package)
    assert package.image_tokenizer is not None
    text = package.image_tokenizer.text(package.image_tokenizer.encode(digit)) + " Which digit is this?"
    expected = package.complete(package.chat_prompt([Message(role="user", content=text)]), 6).text
    assert reply.choices[0].message.content == expected
    assert reply.usage is not None and reply.usage.prompt_tokens == len(
        package.chat_prompt([Message(role="user", content=text)])
    )
    # the same image as a 64x64 PNG, averaged down, reads the same at 8x8
    bigger = image_client.chat.completions.create(model=CHAT_MODEL, messages=ask(png_url(digit, 64)), max_tokens=6)
    assert bigger.choices[0].message.content == expected


def test_images_generate_draws_pngs_that_read_back(image_client: openai.OpenAI, image_package: Path) -> None:
    drawing = {"model": CHAT_MODEL, "prompt": "Draw the digit 3.", "n": 3, "size": "64x64", "extra_body": {"seed": 7}}
    drawn = image_client.images.generate(**drawing, response_format="b64_json")
    assert len(drawn.data) == 3
    pictures = [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in drawn.data]
    assert all(p.format == "PNG" and p.size == (64, 64) and p.mode == "L" for p in pictures)
    package = ChatPackage(image_package)
    assert package.image_tokenizer is not None
    codebook = {tuple(np.round(np.asarray(row) * 255).astype(int)) for row in package.image_tokenizer.codebook}
    for picture in pictures:  # every 2x4 patch of the 8x8 drawing is a codeword
        grey = np.asarray(picture)[::8, ::8].astype(int)
        patches = grey.reshape(4, 2, 2, 4).transpose(0, 2, 1, 3).reshape(-1, 8)
        assert all(any(np.abs(np.asarray(c) - p).max() <= 1 for c in codebook) for p in map(tuple, patches))
    again = image_client.images.generate(**drawing)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in drawn.data]  # seeded
    returned = "data:image/png;base64," + (drawn.data[0].b64_json or "")
    read = image_client.chat.completions.create(model=CHAT_MODEL, messages=ask(returned), max_tokens=2)
    assert read.choices[0].finish_reason in ("stop", "length")
    assert read.usage is not None and read.usage.prompt_tokens > 10  # the drawing's codes are in the prompt
    small = image_client.images.generate(model=CHAT_MODEL, prompt="Draw a 5.", size="8x8")
    assert Image.open(io.BytesIO(base64.b64decode(small.data[0].b64_json or ""))).size == (8, 8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header(side: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))


# a header claiming 20000x20000 (Pillow's decompression-bomb guard), and a valid 8x8 header whose body breaks off
BOMB = _png_header(20_000) + _png_chunk(b"IEND", b"")
BROKEN = (
    _png_header(8) + _png_chunk(b"IDAT", zlib.compress(bytes(72))[:5]) + b"\x00\x00\x00\x04!!!!abcd\x00\x00\x00\x00"
)


def _refused(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as refused:
        call()
    return refused.value


@pytest.mark.parametrize(
    ("url", "code", "words"),
    [
        ("https://example.com/three.png", "invalid_image_url", "fetches nothing"),
        ("data:image/png;base64,***", "invalid_image", "does not decode"),
        ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "invalid_image_type", "image/gif"),
        ("data:image/jpeg;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(20)).decode(), "invalid_image",
         "not a image/jpeg image"),
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(20)).decode(), "invalid_image",
         "cannot be read"),
        ("data:image/png;base64," + "A" * 90_000, "image_too_large", "64 KiB"),
        ("data:image/png;base64," + base64.b64encode(BOMB).decode(), "invalid_image", "cannot be read"),
        ("data:image/png;base64," + base64.b64encode(BROKEN).decode(), "invalid_image", "cannot be decoded"),
    ],
)  # fmt: skip
def test_a_bad_image_is_a_400_naming_the_part(image_client: openai.OpenAI, url: str, code: str, words: str) -> None:
    error = _refused(lambda: image_client.chat.completions.create(model=CHAT_MODEL, messages=ask(url)))
    assert error.code == code and words in error.message and error.param == "messages.0.content.0.image_url.url"


@pytest.mark.parametrize(("width", "height"), [(10, 10), (16, 8), (512, 512)])
def test_an_image_of_the_wrong_size_is_refused(image_client: openai.OpenAI, width: int, height: int) -> None:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    error = _refused(lambda: image_client.chat.completions.create(model=CHAT_MODEL, messages=ask(url)))
    assert error.code == "invalid_image_size" and f"{width}x{height}" in error.message


def test_too_many_images_and_image_requests_the_server_cannot_honour(
    image_client: openai.OpenAI, image_data: PreparedData
) -> None:
    images = image_data.images
    assert images is not None
    url = png_url(images.split("held_out").pixels[0])
    five = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 5}]
    assert _refused(lambda: image_client.chat.completions.create(model=CHAT_MODEL, messages=five)).code == (
        "too_many_images"
    )
    generate = image_client.images.generate
    assert _refused(lambda: generate(model=CHAT_MODEL, prompt="Draw a 3.", response_format="url")).param == (
        "response_format"
    )
    assert (
        _refused(lambda: generate(model=CHAT_MODEL, prompt="Draw a 3.", quality="hd")).code == "unsupported_parameter"
    )
    assert _refused(lambda: generate(model=CHAT_MODEL, prompt="Draw a 3.", n=11)).param == "n"
    assert _refused(lambda: generate(model=CHAT_MODEL, prompt="Draw a 3.", size="1024x1024")).param == "size"
    assert _refused(lambda: generate(model=CHAT_MODEL, prompt="")).param == "prompt"


def test_a_text_only_model_draws_nothing(fp32_client: openai.OpenAI) -> None:
    error = _refused(lambda: fp32_client.images.generate(model=CHAT_MODEL, prompt="Draw the digit 3."))
    assert error.code == "images_unsupported" and error.param == "model"


@pytest.mark.parametrize("routing", ["shared", "heterogeneous"])
def test_the_exported_model_equals_pytorch_with_images_in_the_prompt(
    routing: str, tmp_path: Path, image_data: PreparedData
) -> None:
    """Shared routing leaves as the fused graph, heterogeneous routing as the traced one (its pools are computed in
    the graph from the ids): both compute the PyTorch model's logits and greedy tokens on an image question."""
    from tasks.deploy.onnx_export import PARITY_TOLERANCE, check_parity

    heterogeneous = {"routing": "heterogeneous", "n_image_experts": 2, "top_k": 1}
    model = image_model(**(heterogeneous if routing == "heterogeneous" else {}))
    package = ChatPackage(package_of(model, image_data, tmp_path, "traced" if routing == "heterogeneous" else "fused"))
    images = image_data.images
    assert images is not None and package.image_tokenizer == images.image_tokenizer
    drawing = images.image_tokenizer.text(images.image_tokenizer.encode(images.split("held_out").pixels[3]))
    prompts = [package.chat_prompt([Message(role="user", content=f"{drawing} Which digit is this?")])]
    prompts.append(package.drawing_prompt([Message(role="user", content="Draw the digit 7.")]))
    parity = check_parity(model, package, prompts, new_tokens=12)
    assert parity.max_abs_logit_diff < PARITY_TOLERANCE and parity.greedy_tokens_equal


def test_the_mlflow_pyfunc_reads_images_and_draws(
    image_registry: Path, image_client: openai.OpenAI, image_data: PreparedData
) -> None:
    """The registered version's pyfunc answers as the server does: the images before the last message's text, and
    with `image_output` a drawing (its image tokens and a PNG)."""
    import mlflow
    import pandas as pd

    from registry.tracking import active_store

    with active_store(image_registry):
        model = mlflow.pyfunc.load_model(f"models:/{CHAT_MODEL}/1")
    images = image_data.images
    assert images is not None
    url = png_url(images.split("held_out").pixels[1])
    messages = [{"role": "user", "content": "Which digit is this?"}]
    answer = model.predict(pd.DataFrame({"messages": [messages], "max_tokens": [4], "images": [[url]]}))
    served = image_client.chat.completions.create(model=CHAT_MODEL, messages=ask(url), max_tokens=4)
    assert answer.loc[0, "content"] == served.choices[0].message.content
    drawn = model.predict(pd.DataFrame({"messages": [[{"role": "user", "content": "Draw a 4."}]]}),
                          params={"image_output": True, "seed": 3, "temperature": 1.0})  # fmt: skip
    picture = Image.open(io.BytesIO(base64.b64decode(drawn.loc[0, "b64_json"])))
    assert picture.size == (64, 64) and images.image_tokenizer.parse(drawn.loc[0, "content"]) is not None
    with pytest.raises(ValueError, match="images.0: only data URLs are accepted"):
        model.predict(pd.DataFrame({"messages": [messages], "images": [["https://example.com/4.png"]]}))
