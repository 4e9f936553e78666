"""How one token reads in a logprobs entry: its exact bytes, and its text.

A byte-level BPE token may hold part of a UTF-8 character, so decoding it alone gives U+FFFD; OpenAI's
`bytes` field carries the exact bytes so that a client can join tokens losslessly. For byte-level tokenizers
(ours, GPT-2's) the bytes come from the token's own characters through the byte-to-unicode table; for
others (SentencePiece-style) from decoding the token alone.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the rest are shifted
    past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


_UNICODE_TO_BYTE = _unicode_to_byte()


class TokenTexts:
    """Token id -> (text, bytes), computed once per token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self.special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        if token_id not in self._cache:
            raw = self._bytes(token_id)
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id) or ""
        if self.byte_level and token_id not in self.special and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        if token_id in self.special:
            return piece.encode()
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
