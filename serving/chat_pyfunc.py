"""MLflow "model from code" for a registered `trainonce-chat` version: an exported chat package.

No pickled Python object: only this file + the package folder (ONNX graph, tokenizer, generation config).
`predict` takes rows of OpenAI-style `messages` (and an optional `max_tokens`) and returns the reply computed
by onnxruntime with the KV cache, exactly as `trainonce serve` would: greedy, unless MLflow `params` set
sampling controls (`temperature`, `top_p`, `top_k`, `min_p`, the penalties, `seed`), checked against the same
ranges as the server's.
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

        sampling = SamplingParams(**{k: v for k, v in (params or {}).items() if v is not None})
        rows = []
        for _, row in model_input.iterrows():
            messages = [Message.model_validate(dict(m)) for m in row["messages"]]
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
                }
            )
        return pd.DataFrame(rows)


mlflow.models.set_model(ChatCompletionModel())
