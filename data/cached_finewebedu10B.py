"""Download GPT-2-tokenized FineWeb-Edu shards from the Hugging Face Hub.

    python data/cached_finewebedu10B.py 10      # the val shard and train shards 1..10 (100M tokens each)

Files come from the dataset repo kjj0/finewebedu10B-gpt2 into data/finewebedu10B/. A file already there and
valid (its header matches its size) is skipped without asking the network, so a re-run only fetches what is
missing. huggingface_hub downloads to a temporary name and renames when complete, so an interrupted transfer
never leaves a valid-looking shard; every file is checked again after download. HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE work as huggingface_hub documents them. This file knows the file names on the Hub; the shard
format belongs to shards.py.
"""

import argparse
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import ShardError, shard_num_tokens

REPO_ID = "kjj0/finewebedu10B-gpt2"
MAX_TRAIN_SHARDS = 99
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finewebedu10B")


def download(name: str, out_dir: str) -> None:
    """Fetch one file unless a valid copy is there; exit with one line if the network or the file fails."""
    from huggingface_hub import constants, hf_hub_download

    path = os.path.join(out_dir, name)
    try:
        shard_num_tokens(path)
        print(f"{name}: already complete, skipped")
        return
    except ShardError:  # missing or incomplete
        pass
    try:
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
    print(f"{name}: {tokens:,} tokens")


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
