"""The judge of generated digits: a linear classifier of 8x8 images, trained once on the real training digits
(tasks/data/images.py `fit_judge`, scikit-learn's logistic regression) and kept as plain numbers.

A model asked to draw a digit is right when the judge reads the drawing as that digit: the generation task's exact
check and GRPO's reward. Stored as JSON weights and applied with numpy, the judge needs neither scikit-learn nor
pickle wherever it runs (the server, the MLflow pyfunc, a user's machine).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from models.publish import JsonFile


class DigitJudge(JsonFile):
    """Logits = pixels (flattened, in [0, 1]) @ weights.T + bias; the digit is their argmax."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    FILE_NAME: ClassVar[str] = "digit_judge.json"

    weights: tuple[tuple[float, ...], ...] = Field(description="One row of pixel weights per digit 0..9.")
    bias: tuple[float, ...] = Field(description="One bias per digit 0..9.")
    held_out_accuracy: float = Field(ge=0, le=1, description="Accuracy on the held-out real digits when fitted.")

    @model_validator(mode="after")
    def _check_shapes(self) -> DigitJudge:
        if len(self.weights) != 10 or len(self.bias) != 10 or len({len(row) for row in self.weights}) != 1:
            raise ValueError("a digit judge has 10 rows of equal length and 10 biases")
        return self

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W) or (H, W) images -> (N, 10) logits."""
        flat = np.asarray(pixels, dtype=np.float64).reshape(-1, len(self.weights[0]))
        return flat @ np.asarray(self.weights).T + np.asarray(self.bias)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """The digit each image shows, as the judge reads it: (N,) int64."""
        return self.logits(pixels).argmax(axis=1)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 10) the judge's probability of each digit (softmax of the logits, as scikit-learn's predict_proba
        for a multinomial logistic regression)."""
        logits = self.logits(pixels)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)
