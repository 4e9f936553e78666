"""MLflow "model from code" for a registered `trainonce-chat` version: an exported chat package.

No pickled Python object: only this file + the package folder (ONNX graph, tokenizer, generation config).
`predict` takes rows of OpenAI-style `messages` (and an optional `max_tokens`) and returns the reply computed
by onnxruntime with the KV cache, exactly as `trainonce serve` would: greedy, unless MLflow `params` set
sampling controls (`temperature`, `top_p`, `top_k`, `min_p`, the penalties, `seed`), checked against the same
ranges as the server's. For a package with an image tokenizer, a row's optional `images` (data URLs, read as the
server reads image_url parts) go before the text of its last message, and the param `image_output` makes the reply
a drawing: its image tokens in `content` and the PNG (64x64) in `b64_json`.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class ChatCompletionModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's PythonModelContext
        from serving.engine import ChatPackage

        self.package = ChatPackage(context.artifacts["package"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        from models.chat_format import Message
        from models.sampling import SamplingParams
        from serving.errors import ApiError
        from serving.images import reader
        from serving.protocol import content_text

        params = dict(params or {})
        drawing = bool(params.pop("image_output", False))
        sampling = SamplingParams(**{k: v for k, v in params.items() if v is not None})
        rows = []
        for _, row in model_input.iterrows():
            messages = [Message.model_validate(dict(m)) for m in row["messages"]]
            urls = row.get("images")
            if urls is not None and not (isinstance(urls, float) and pd.isna(urls)) and len(urls):
                try:
                    image_text = reader(self.package, len(urls))
                    read = [(image_text(url, f"images.{i}"), True) for i, url in enumerate(urls)]
                except ApiError as error:
                    raise ValueError(f"{error.param}: {error.message}") from error
                last = messages[-1]  # the images, then the text, as the server renders image_url parts
                text = [(last.content, False)] if last.content else []
                messages[-1] = Message(role=last.role, content=content_text(read + text))
            if drawing:
                rows.append(self._draw(messages, sampling))
                continue
            prompt = self.package.chat_prompt(messages)
            room = self.package.room_for(prompt)
            if room < 1:
                limit = self.package.config.max_seq_len
                raise ValueError(f"messages: {len(prompt)} prompt tokens fill the {limit}-token context")
            requested = row.get("max_tokens")
            wanted = self.package.config.default_max_new_tokens if pd.isna(requested) else int(requested)
            if wanted < 1:
                raise ValueError(f"max_tokens: {wanted} is not in [1, {room}]")
            completion = self.package.complete(prompt, min(wanted, room), sampling)
            rows.append(
                {
                    "content": completion.text,
                    "finish_reason": completion.finish_reason,
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "b64_json": None,
                }
            )
        return pd.DataFrame(rows)

    def _draw(self, messages, sampling) -> dict:  # noqa: ANN001 - Message and SamplingParams, imported lazily
        """The reply as one drawing: its codes sampled after `<image>` as the server's images endpoint does."""
        from serving.images import png_base64

        image_tokenizer = self.package.image_tokenizer
        if image_tokenizer is None:
            raise ValueError("image_output: this model draws no images: its package has no image tokenizer")
        prompt = self.package.drawing_prompt(messages)
        codes = image_tokenizer.codes_per_image
        if self.package.room_for(prompt) < codes:
            raise ValueError(f"messages: {len(prompt)} prompt tokens leave no room for a drawing")
        params = self.package.drawing_params(sampling.temperature, sampling.seed)
        completion = self.package.complete(prompt, codes, params)
        pixels = self.package.drawn_image(completion.token_ids)
        return {
            "content": image_tokenizer.text(self.package.codes_of(completion.token_ids)),
            "finish_reason": completion.finish_reason,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "b64_json": png_base64(pixels, 64),
        }


mlflow.models.set_model(ChatCompletionModel())
