"""Token helpers shared by every feature that takes a token as text or id."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from labkit.core.errors import InvalidArgument, TokenizationError


def token_id(tokenizer: Any, token: str | int) -> int:
    """Resolve ``token`` (text that must be exactly one token, or an id) to a vocabulary id.

    Text is tokenized without special tokens; text that is not exactly one token raises
    :class:`~labkit.core.errors.TokenizationError` showing how it tokenizes.
    """
    vocab_size = len(tokenizer)
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise InvalidArgument(f"token must be a str (one token) or an int id; got {type(token).__name__}")
    if isinstance(token, int):
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"token id must be in [0, {vocab_size}); got {token}")
        return token
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise TokenizationError(
            f"token {token!r} is not a single token: it tokenizes as {len(ids)} tokens "
            f"{pieces!r} (ids {ids}); pass one of those, or an id"
        )
    return ids[0]


class TokenTexts:
    """Memoised id -> display text of one token (``tokenizer.decode([id])``)."""

    def __init__(self, tokenizer: Any, maxsize: int = 65536) -> None:
        self._decode = lru_cache(maxsize=maxsize)(lambda i: tokenizer.decode([i]))

    def __call__(self, token_id: int) -> str:
        return self._decode(int(token_id))
