"""What a training process pays the first time it reads a shard, at the OpenELM mix's shard size.

    .venv/bin/python bench/shard_open.py [--shard-bytes 1000000000] [--seq-len 2048] [--workdir DIR]

Writes one shard as prepare does (samples of seq_len + 1 uint16 tokens, up to --shard-bytes), then
times, on the same file, the loader's check at first read (data_pipelines.shard_index.check_shard:
size, a few headers, the end of the archive) against a full check: SHA-256 of the file plus every
tar header parsed, which is what each process did before. In a shuffled epoch every rank reads from
every shard within its first few hundred steps, so multiply by the number of shards (OpenELM's mix:
about 4,400) for what one loader process spends. The first timing of each reads from the page cache
the write left warm; on shared storage the full check also reads the whole file over the network.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipelines.prepare import samples_per_shard  # noqa: E402
from data_pipelines.shard_index import _scanned_spans, check_shard  # noqa: E402
from data_pipelines.shard_writer import ShardWriter, sha256_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-bytes", type=int, default=1_000_000_000, help="the mix's data.shard_bytes")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the shard (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        sample = np.random.default_rng(0).integers(0, 32000, args.seq_len + 1, dtype=np.uint16)
        samples = samples_per_shard({"shard_bytes": args.shard_bytes, "seq_len": args.seq_len}, np.uint16)  # prepare's
        writer = ShardWriter(root, "train", samples)
        start = time.perf_counter()
        for _ in range(samples):
            writer.write(sample)
        shard = writer.finish()[0]
        print(f"[bench] wrote a shard of {samples:,} samples, {shard.bytes / 1e9:.2f} GB, "
              f"in {time.perf_counter() - start:.1f} s")

        def timed(fn) -> float:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        ours = timed(lambda: check_shard(root, shard))
        full = timed(lambda: (sha256_file(root / shard.name), _scanned_spans(root / shard.name)))
        assert [check_shard(root, shard)[i] for i in (0, samples - 1)] == \
            [_scanned_spans(root / shard.name)[i] for i in (0, samples - 1)]
        print(f"[bench] first read of a shard: {ours * 1e3:.2f} ms (check_shard) against {full:.2f} s "
              f"(SHA-256 + every header), {full / ours:,.0f}x; x 4,400 shards: {ours * 4400:.1f} s "
              f"against {full * 4400 / 3600:.1f} h per loader process")


if __name__ == "__main__":
    main()
