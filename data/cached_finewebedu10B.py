"""Download GPT-2-tokenized FineWeb-Edu shards (Hub dataset kjj0/finewebedu10B-gpt2) into data/finewebedu10B/.

    python data/cached_finewebedu10B.py 10      # the val shard and train shards 1..10 (100M tokens each)

A valid file already there is skipped offline; a fetched one must be a valid shard whose sha256 is KNOWN_SHA256's,
else the Hub's (its LFS ETag), or it is removed. HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE work as in huggingface_hub.
"""

import argparse, contextlib, os, re, sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import ShardError, file_sha256, shard_num_tokens

REPO_ID = "kjj0/finewebedu10B-gpt2"
KNOWN_SHA256: dict[str, str] = {}  # name -> sha256 as records/README.md lists them: the line printed for a download

def download(name: str, out_dir: str) -> None:
    """Fetch one file unless a valid copy is there; exit with one line if the network or the file fails."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    path = os.path.join(out_dir, name)
    with contextlib.suppress(ShardError):  # missing or incomplete: fetch it
        shard_num_tokens(path)
        if name not in KNOWN_SHA256 or file_sha256(path) == KNOWN_SHA256[name]:
            print(f"{name}: already complete, skipped")
            return
    try:
        etag = get_hf_file_metadata(hf_hub_url(REPO_ID, name, repo_type="dataset")).etag or ""
        hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=out_dir)
    except Exception as e:  # connection, HTTP, offline-mode and consistency errors all end the same way
        raise SystemExit(f"could not download {name} from {constants.ENDPOINT} ({REPO_ID}): {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or ['no message'])[0]}") from None
    try:
        tokens, sha256 = shard_num_tokens(path), file_sha256(path)
        verified = check_sha256(name, sha256, etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)
    except ValueError as e:  # a ShardError, or a sha256 that differs
        os.remove(path)
        why = "it is not a valid shard: " if isinstance(e, ShardError) else ""
        raise SystemExit(f"removed the download of {name}: {why}{e}") from None
    print(f"{name}: {tokens:,} tokens, sha256 {sha256} ({verified})")

def check_sha256(name: str, sha256: str, hub_sha256: str | None) -> str:
    """What the sha256 of a fetched file was verified against; ValueError if it differs from it."""
    known = KNOWN_SHA256.get(name)
    expected, source = (known, "the known hash") if known else (hub_sha256, "the Hub's hash")
    if expected is None:
        return "no known hash to verify it against"
    if sha256 != expected:
        raise ValueError(f"its sha256 {sha256} is not {source} {expected}")
    return f"matches {source}"

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("num_train", type=int, nargs="?", default=10, help="train shards to fetch (0-99)")
    parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "finewebedu10B"),
                        help="where the shards go")
    args = parser.parse_args()
    if not 0 <= args.num_train <= 99:
        raise SystemExit(f"num_train must be between 0 and 99, got {args.num_train}")
    os.makedirs(args.out_dir, exist_ok=True)
    for name in ["finewebedu_val_000000.bin"] + [f"finewebedu_train_{i:06d}.bin" for i in range(1, args.num_train + 1)]:
        download(name, args.out_dir)

if __name__ == "__main__":
    main()
