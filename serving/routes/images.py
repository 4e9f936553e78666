"""/v1/images/generations: OpenAI's image generation, for a model that draws digits as image tokens.

Each image is the model's reply to the prompt as a drawing request: the chat turn, the reply opened with `<image>`,
then exactly one image's codes, sampled with every other token masked out (`allowed_token_ids`), decoded by the
package's codebook and written as a PNG. The images of a request are decoded together by the batcher, as the
choices of a chat request are."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response

from models.chat_format import Message
from serving import generation
from serving.dependencies import Metrics, ServedFamily, authorize, model_for
from serving.errors import ApiError, error_responses
from serving.images import png_base64
from serving.protocol import ImageGenerationRequest
from serving.response_models import GeneratedImage, ImagesResponse

router = APIRouter(dependencies=[Depends(authorize)])


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=error_responses(400, 401, 404, 429))
async def generate_images(
    request: ImageGenerationRequest, response: Response, family: ServedFamily, metrics: Metrics
) -> ImagesResponse:
    unsupported = request.unsupported_parameter()
    if unsupported is not None:
        raise ApiError(400, f"{unsupported} is not supported by this server.", unsupported, "unsupported_parameter")
    loaded = model_for(family, request.model)
    package = loaded.package
    image_tokenizer = package.image_tokenizer
    if image_tokenizer is None:
        message = f"the model {loaded.name!r} draws no images: its package has no image tokenizer"
        raise ApiError(400, message, "model", "images_unsupported")
    prompt = package.drawing_prompt([Message(role="user", content=request.prompt)])
    codes = image_tokenizer.codes_per_image
    if package.room_for(prompt) < codes:
        limit = package.config.max_seq_len
        message = f"the prompt takes {len(prompt)} of the {limit}-token context, leaving no room for a drawing"
        raise ApiError(400, message, "prompt", "context_length_exceeded")
    temperature = 1.0 if request.temperature is None else request.temperature  # null: the documented default
    params = package.drawing_params(temperature, request.seed)
    decoding = await generation.start(loaded, [(prompt, codes)], params, request.n, metrics, "img-")
    response.headers[generation.SERVED_BY_HEADER] = loaded.name
    with metrics.running.labels(loaded.name).track_inprogress():
        for stream in decoding.streams:
            async for _ in stream:
                pass
    drawings = [png_base64(package.drawn_image(choice.ids), request.side()) for choice in decoding.choices]
    return ImagesResponse(created=int(time.time()), data=[GeneratedImage(b64_json=image) for image in drawings])
