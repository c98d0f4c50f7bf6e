"""`prepare.verify=true`: check every shard of a prepared dataset against its manifest."""

from pathlib import Path

from data_pipelines.manifest import REBUILD_FIX, read_manifest
from data_pipelines.progress import Progress
from data_pipelines.shard_writer import sha256_file


def verify_dataset(root: str | Path) -> int:
    """Raises ValueError naming the first bad shard; returns the number of shards checked."""
    manifest = read_manifest(root)
    shards = [s for split in manifest.data["splits"] for s in manifest.shards(split)]
    progress = Progress("verify")
    for i, shard in enumerate(shards, 1):
        path = manifest.root / shard.name
        if not path.is_file():
            raise ValueError(f"shard {path} listed in the manifest is missing: {REBUILD_FIX}")
        actual = sha256_file(path)
        if actual != shard.sha256:
            raise ValueError(f"shard {path} is corrupt: sha256 {actual[:16]}..., manifest says {shard.sha256[:16]}...: "
                             f"{REBUILD_FIX}")
        progress.update({"shards": i}, done_fraction=i / len(shards))
    tokenizer = manifest.tokenizer_path
    if not tokenizer.is_file():
        raise ValueError(f"tokenizer {tokenizer} listed in the manifest is missing")
    print(f"[verify] {manifest.root}: all {len(shards)} shards match their checksums", flush=True)
    return len(shards)
