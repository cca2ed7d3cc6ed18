"""The `.bin` token shard (cached FineWeb-Edu's format): 256 int32 `[MAGIC, VERSION, num_tokens, 0, ...]`, then
`num_tokens` uint16 GPT-2 ids. Write, read memory-mapped, check, hash; nothing of tokenizers or documents."""

import hashlib, os

import numpy as np

MAGIC, VERSION = 20240520, 1  # the header's first two int32
HEADER_BYTES = 256 * 4
VOCAB_SIZE = 50257  # GPT-2; every token id in a shard must be below this
EOT = 50256  # <|endoftext|>: stored before each document; the model reads it as the end of the one before

class ShardError(ValueError):
    """A file that is not a valid token shard; the message names the file and the problem."""

def write_shard(path, tokens) -> None:
    """Write `tokens` (ids < VOCAB_SIZE) to `path` atomically: readers see the old file or the whole new one."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise ValueError(f"{path}: ids must be in [0, {VOCAB_SIZE}), got {tokens.min()}..{tokens.max()}")
    header = np.array([MAGIC, VERSION, len(tokens)], dtype="<i4").tobytes().ljust(HEADER_BYTES, b"\0")
    tmp_path = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(header + tokens.astype("<u2").tobytes())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)

def shard_num_tokens(path) -> int:
    """The number of tokens `path` holds, once its header is checked against the file size."""
    try:
        size, header = os.path.getsize(path), np.fromfile(path, dtype="<i4", count=3)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated, {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, num_tokens = header.tolist()
    if (magic, version) != (MAGIC, VERSION):
        raise ShardError(f"{path}: bad magic {magic} or version {version}, not {MAGIC} and {VERSION}: not a shard")
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(f"{path}: {what}: header says {num_tokens} tokens ({expected} bytes), file has {size} bytes")
    return num_tokens

def read_shard(path) -> np.memmap:
    """The tokens of `path` as a read-only uint16 memmap; ids are not scanned (loader.token_counts checks them)."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(shard_num_tokens(path),))

def file_sha256(path) -> str:
    """The sha256 of the whole file, header included: the hash the Hugging Face Hub keeps for each shard."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
