"""Text to token ids: a vocabulary of the training split's most frequent words, then fixed-length id rows."""

from __future__ import annotations

import collections
import re

import numpy as np

# Token ids 0 and 1 of a text vocabulary: padding and out-of-vocabulary words.
PAD, OOV = 0, 1
DEFAULT_LENGTH = 256  # ids per text when data.max_length is None

_MARKUP = re.compile(r"<[^>]+>")
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str | bytes) -> list[str]:
    """Lowercase words, with HTML tags such as imdb_reviews' <br /> removed."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return _WORD.findall(_MARKUP.sub(" ", text.lower()))


def build_vocabulary(texts: list[str | bytes], size: int) -> list[str]:
    """The `size - 2` most frequent words (ties by first appearance), after the pad and OOV ids."""
    counts = collections.Counter(w for text in texts for w in words(text))
    return ["<pad>", "<oov>", *(w for w, _ in counts.most_common(size - 2))]


def encode(texts: list[str | bytes], vocabulary: list[str], max_length: int) -> np.ndarray:
    """int32 ids (N, max_length): the first max_length words, padded with PAD at the end."""
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = np.full((len(texts), max_length), PAD, np.int32)
    for row, text in enumerate(texts):
        tokens = [index.get(w, OOV) for w in words(text)[:max_length]]
        ids[row, :len(tokens)] = tokens
    return ids
