"""`prepare.verify=true`: check every shard and the tokenizer of a prepared dataset against its manifest."""

from pathlib import Path

from data_pipelines.manifest import REBUILD_FIX, Manifest, read_manifest
from data_pipelines.progress import Progress
from data_pipelines.shard_writer import sha256_file


def check_tokenizer(manifest: Manifest, expected_fingerprint: str | None = None) -> None:
    """The dataset's tokenizer file is the one its shards were made with (and the one expected)."""
    path = manifest.tokenizer_path
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} listed in the manifest is missing")
    recorded = manifest.data["tokenizer"]["fingerprint"]
    if sha256_file(path) != recorded:
        raise ValueError(f"tokenizer {path} does not match the fingerprint in {manifest.root / 'manifest.json'}")
    if expected_fingerprint and expected_fingerprint != recorded:
        raise ValueError(
            f"dataset {manifest.root} was tokenized with tokenizer {recorded[:12]}, this run expects "
            f"{expected_fingerprint[:12]}: prepare the data with the run's tokenizer"
        )


def verify_dataset(root: str | Path) -> int:
    """Raises ValueError naming every bad shard; returns the number of shards checked."""
    manifest = read_manifest(root)
    shards = [s for split in manifest.data["splits"] for s in manifest.shards(split)]
    progress, bad = Progress("verify"), []
    for i, shard in enumerate(shards, 1):
        path = manifest.root / shard.name
        if not path.is_file():
            bad.append(f"shard {path} listed in the manifest is missing")
        elif (actual := sha256_file(path)) != shard.sha256:
            bad.append(f"shard {path} is corrupt: sha256 {actual[:16]}..., manifest says {shard.sha256[:16]}...")
        progress.update({"shards": i}, done_fraction=i / len(shards))
    if bad:
        more = f" ({len(bad)} of {len(shards)} shards)" if len(bad) > 1 else ""
        raise ValueError("; ".join(bad) + f"{more}: {REBUILD_FIX}")
    try:
        check_tokenizer(manifest)  # as a run's loader will
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    print(f"[verify] {manifest.root}: all {len(shards)} shards and the tokenizer match their checksums", flush=True)
    return len(shards)
