"""MLflow "model from code" for a registered trainonce checkpoint (supernet or sub-model).

No pickled Python object: only this file + artifacts.

`mlflow.pyfunc.load_model("models:/trainonce-supernet/<version>")` gives a model whose `predict` scores
texts: mean next-token negative log-likelihood under the full model or under any sub-model given as a
SubnetSpec JSON string. The weights load from safetensors.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SupernetScorer(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's PythonModelContext
        from tokenizers import Tokenizer

        from models.checkpoint import load_model

        self.model = load_model(context.artifacts["checkpoint"]).eval()
        self.tokenizer = Tokenizer.from_file(context.artifacts["tokenizer"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        import torch

        from models.losses import causal_lm_loss
        from models.subnet import SubnetSpec

        rows = []
        for _, row in model_input.iterrows():
            ids = self.tokenizer.encode(str(row["text"])).ids[: self.model.config.max_seq_len]
            if len(ids) < 2:
                raise ValueError("text: needs at least 2 tokens to score")
            subnet_json = row.get("subnet") or ""
            spec = SubnetSpec.model_validate_json(subnet_json) if subnet_json else None
            tokens = torch.tensor([ids])
            with torch.no_grad():
                nll = causal_lm_loss(self.model(tokens, subnet=spec).logits, tokens).item()
            rows.append({"nll": nll, "tokens": len(ids)})
        return pd.DataFrame(rows)


mlflow.models.set_model(SupernetScorer())
