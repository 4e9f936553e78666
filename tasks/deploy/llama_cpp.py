"""Where llama.cpp lives once `make llama-cpp` (infra/build_llama_cpp.sh) has built it.

llama.cpp is optional: GGUF export, its parity tests and the peer benchmark need it, nothing else does. One
pinned source serves all of them: the llama.cpp that `llama-cpp-python` vendors in its source distribution
(`convert_hf_to_gguf.py` with `conversion/` and `gguf-py/`, and the C++ sources of `llama-server` and
`llama-quantize`), so the converter, the binaries and the Python bindings always agree on the GGUF format.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
HOME_VARIABLE = "TRAINONCE_LLAMA_CPP"
# f32, f16, bf16 written by the converter, the rest by llama-quantize, which names each in upper case
GgufType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q2_k"]
GGUF_TYPES: tuple[str, ...] = get_args(GgufType)
INSTALL_HINT = "run `make llama-cpp` (builds llama.cpp; several minutes on 2 cores)"


class LlamaCppMissing(RuntimeError):
    """llama.cpp is not built where trainonce looks for it."""


def default_home() -> Path:
    """$TRAINONCE_LLAMA_CPP, else a per-user cache folder named after the pinned version."""
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "trainonce" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


@dataclass(frozen=True)
class LlamaCpp:
    """One built llama.cpp: its source tree (the converter) and its binaries and shared libraries."""

    home: Path

    @property
    def source(self) -> Path:
        return self.home / "src"

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.source / "gguf-py"

    @property
    def bin(self) -> Path:
        return self.home / "build" / "bin"

    @property
    def quantize(self) -> Path:
        return self.bin / "llama-quantize"

    @property
    def server(self) -> Path:
        return self.bin / "llama-server"

    def missing(self) -> list[Path]:
        return [path for path in (self.converter, self.gguf_py, self.quantize, self.server) if not path.exists()]

    def checked(self) -> LlamaCpp:
        if gone := self.missing():
            raise LlamaCppMissing(f"llama.cpp is not built at {self.home} (no {gone[0]}): {INSTALL_HINT}")
        return self


def find_llama_cpp() -> LlamaCpp:
    """The built llama.cpp, or LlamaCppMissing saying how to build it."""
    return LlamaCpp(default_home()).checked()


def check_gguf_request(field: str, types: tuple[str, ...]) -> None:
    """Before any compute: GGUF types asked for (config field `field`) need llama.cpp built."""
    if types and (gone := LlamaCpp(default_home()).missing()):
        raise LlamaCppMissing(
            f"{field}: {', '.join(types)} asked for, but llama.cpp is not built at {default_home()} "
            f"(no {gone[0].name}): {INSTALL_HINT}, or set {field} to []"
        )


if __name__ == "__main__":  # infra/build_llama_cpp.sh asks where to build and which version
    print({"home": default_home(), "version": LLAMA_CPP_PYTHON_VERSION}[sys.argv[1]])
