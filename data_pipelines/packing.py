"""Pack tokenized documents end to end into fixed samples of seq_len + 1 tokens.

Each document is framed as BOS tokens EOS; a sample holds seq_len + 1 tokens so
inputs (first seq_len) and shifted targets (last seq_len) come from one array.
The tail that does not fill a sample is dropped and counted.
"""

from typing import Iterator, Sequence

import numpy as np


class Packer:
    def __init__(self, seq_len: int, bos: int, eos: int, dtype: np.dtype):
        self.sample_len = seq_len + 1
        self.bos, self.eos, self.dtype = bos, eos, dtype
        self._parts: list[np.ndarray] = []
        self._pending = 0
        self.dropped_tail_tokens = 0

    def add(self, token_ids: Sequence[int] | np.ndarray) -> Iterator[np.ndarray]:
        """Append one document; yield every sample it completes."""
        framed = np.empty(len(token_ids) + 2, dtype=self.dtype)
        framed[0], framed[1:-1], framed[-1] = self.bos, token_ids, self.eos
        self._parts.append(framed)
        self._pending += len(framed)
        if self._pending >= self.sample_len:
            buffer = np.concatenate(self._parts)
            n_full = len(buffer) // self.sample_len
            yield from buffer[: n_full * self.sample_len].reshape(n_full, self.sample_len)
            rest = buffer[n_full * self.sample_len :]
            self._parts, self._pending = [rest], len(rest)

    def finish(self) -> None:
        self.dropped_tail_tokens = self._pending
        self._parts, self._pending = [], 0


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
