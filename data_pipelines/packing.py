"""Pack tokenized documents end to end into fixed samples of seq_len + 1 tokens.

Each document is framed as BOS tokens EOS; a sample holds seq_len + 1 tokens so
inputs (first seq_len) and shifted targets (last seq_len) come from one array.
The tail that does not fill a sample is dropped and counted.
"""

from typing import Iterable, Iterator

import numpy as np


class Packer:
    def __init__(self, seq_len: int, bos: int, eos: int, dtype: np.dtype):
        self.sample_len = seq_len + 1
        self.bos, self.eos, self.dtype = bos, eos, dtype
        self._buffer: list[int] = []
        self.dropped_tail_tokens = 0

    def add(self, token_ids: Iterable[int]) -> Iterator[np.ndarray]:
        """Append one document; yield every sample it completes."""
        self._buffer.append(self.bos)
        self._buffer.extend(token_ids)
        self._buffer.append(self.eos)
        n_full = len(self._buffer) // self.sample_len
        if n_full:
            cut = n_full * self.sample_len
            block = np.asarray(self._buffer[:cut], dtype=self.dtype).reshape(n_full, self.sample_len)
            del self._buffer[:cut]
            yield from block

    def finish(self) -> None:
        self.dropped_tail_tokens = len(self._buffer)
        self._buffer.clear()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
