"""Mix sources so each gets its weight's share of the output tokens.

Weights are normalised to shares. Documents are taken whole: the next one comes
from the source furthest behind its share (ties go to the earlier source), so
every share is met to within one document. With a token target, a source that
runs out before its share is an error naming it, unless it may repeat. Without
a target, every document of every source is used once: the weights then only
set how the sources interleave.
"""

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from data_pipelines.source_cache import SourceCacheReader

FRAMING = 2  # BOS + EOS around every document


def normalised_weights(weights: list[float]) -> list[float]:
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data source weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


class SourceExhausted(ValueError):
    pass


@dataclass
class MixStats:
    tokens: list[int]
    documents: list[int]
    repeats: list[int]
    shares: list[float] = field(default_factory=list)


def mix(
    caches: list[SourceCacheReader],
    weights: list[float],
    names: list[str],
    repeat: list[bool],
    target_tokens: Optional[int],
) -> tuple[Iterator[tuple[np.ndarray, bool]], MixStats]:
    """(documents in output order, stats filled in as the iterator runs)."""
    shares = normalised_weights(weights)
    n = len(caches)
    stats = MixStats([0] * n, [0] * n, [0] * n)
    active = [i for i in range(n) if shares[i] > 0]

    def documents() -> Iterator[tuple[np.ndarray, bool]]:
        streams = [caches[i].documents() for i in range(n)]
        total = 0
        while target_tokens is None or total < target_tokens:
            s = min(active, key=lambda i: (stats.tokens[i] / shares[i], i))
            doc = next(streams[s], None)
            if doc is None:
                if target_tokens is None:
                    active.remove(s)
                    if not active:
                        break
                    continue
                if not repeat[s] or caches[s].num_documents == 0:
                    share = shares[s] * target_tokens
                    raise SourceExhausted(
                        f"data source {names[s]!r} ran out after {stats.tokens[s]:,} tokens, short of its share "
                        f"of {share:,.0f} of data.target_tokens={target_tokens:,}; allow repeating it with "
                        f"repeat: true on that source, or lower the target or its weight"
                    )
                stats.repeats[s] += 1
                streams[s] = caches[s].documents()
                continue
            ids, is_val = doc
            stats.tokens[s] += len(ids) + FRAMING
            stats.documents[s] += 1
            total += len(ids) + FRAMING
            yield ids, is_val
        stats.shares = [t / max(1, total) for t in stats.tokens]

    return documents(), stats
