"""Download GPT-2-tokenized FineWeb-Edu shards from the Hugging Face Hub.

    python data/cached_finewebedu10B.py 10      # the val shard and train shards 1..10 (100M tokens each)

Files come from the dataset repo kjj0/finewebedu10B-gpt2 into data/finewebedu10B/. A file already there and
valid (its header matches its size, and its sha256 the known one where KNOWN_SHA256 has it) is skipped without
asking the network, so a re-run only fetches what is missing. huggingface_hub downloads to a temporary name and
renames when complete, so an interrupted transfer never leaves a valid-looking shard. Every file fetched is checked
as a shard and its sha256 against KNOWN_SHA256, else against the sha256 the Hub gives for it (the ETag of a file
in Git LFS); a mismatch removes it. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE work as huggingface_hub documents
them. This file knows the files on the Hub; the shard format belongs to shards.py.
"""

import argparse
import os
import re
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import ShardError, file_sha256, shard_num_tokens

REPO_ID = "kjj0/finewebedu10B-gpt2"
# sha256 of files whose hash was recorded from a download, as records/README.md lists them. None is known yet: this
# project's machines cannot reach the Hub. Add the line the downloader prints for a file you fetched.
KNOWN_SHA256: dict[str, str] = {}
MAX_TRAIN_SHARDS = 99
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finewebedu10B")


def download(name: str, out_dir: str) -> None:
    """Fetch one file unless a valid copy is there; exit with one line if the network or the file fails."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    path = os.path.join(out_dir, name)
    try:
        shard_num_tokens(path)
        if name not in KNOWN_SHA256 or file_sha256(path) == KNOWN_SHA256[name]:
            print(f"{name}: already complete, skipped")
            return
    except ShardError:  # missing or incomplete
        pass
    try:
        etag = get_hf_file_metadata(hf_hub_url(REPO_ID, name, repo_type="dataset")).etag or ""
        hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=out_dir)
    except Exception as e:  # connection, HTTP, offline-mode and consistency errors all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"{constants.ENDPOINT} ({REPO_ID})"
        raise SystemExit(f"could not download {name} from {where}: {type(e).__name__}: {reason}") from None
    try:
        tokens = shard_num_tokens(path)
    except ShardError as e:
        os.remove(path)
        raise SystemExit(f"removed the download of {name}, it is not a valid shard: {e}") from None
    sha256 = file_sha256(path)
    try:
        verified = check_sha256(name, sha256, etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
    except ValueError as e:
        os.remove(path)
        raise SystemExit(f"removed the download of {name}: {e}") from None
    print(f"{name}: {tokens:,} tokens, sha256 {sha256} ({verified})")


def check_sha256(name: str, sha256: str, hub_sha256: str | None) -> str:
    """What the sha256 of a fetched file was verified against; ValueError if it differs from it."""
    if name in KNOWN_SHA256:
        expected, source = KNOWN_SHA256[name], "the known hash"
    elif hub_sha256:
        expected, source = hub_sha256, "the Hub's hash"
    else:
        return "no known hash to verify it against"
    if sha256 != expected:
        raise ValueError(f"its sha256 {sha256} is not {source} {expected}")
    return f"matches {source}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("num_train", type=int, nargs="?", default=10, help="train shards to fetch (0-99)")
    parser.add_argument("--out_dir", default=DEFAULT_DIR, help="where the shards go")
    args = parser.parse_args()
    if not 0 <= args.num_train <= MAX_TRAIN_SHARDS:
        raise SystemExit(f"num_train must be between 0 and {MAX_TRAIN_SHARDS}, got {args.num_train}")
    os.makedirs(args.out_dir, exist_ok=True)
    train_names = [f"finewebedu_train_{i:06d}.bin" for i in range(1, args.num_train + 1)]
    for name in ["finewebedu_val_000000.bin"] + train_names:
        download(name, args.out_dir)


if __name__ == "__main__":
    main()
