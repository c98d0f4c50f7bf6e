"""Document cleaning and filters, applied to every document before and after tokenization.

- Unicode NFC, then control characters removed (tab and newline kept).
- Length filter in characters, counted after lower-casing and stripping
  punctuation (OpenELM: 200), and in tokens (OpenELM: 256).
- Exact deduplication on normalised text: NFC-cleaned, whitespace runs
  collapsed. The key is a 16-byte BLAKE2b digest kept in a Python set on the
  driver, about 100 bytes of memory per kept document.
"""

import hashlib
import re
import string
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean_text(text: str) -> str:
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def filter_length(text: str) -> int:
    """Characters that count for the length filter: lower-cased, punctuation stripped."""
    return len(text.lower().translate(_PUNCTUATION).strip())


def dedup_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def split_of(key: bytes, val_fraction: float) -> str:
    """A document's split from its dedup key: stable whatever the order or number of documents."""
    bucket = int.from_bytes(key[:8], "big") % 1_000_000
    return "val" if bucket < val_fraction * 1_000_000 else "train"
