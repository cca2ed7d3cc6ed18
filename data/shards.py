"""The `.bin` token shard: 256 little-endian int32 `[MAGIC, VERSION, num_tokens, 0, ...]`, then `num_tokens` uint16
GPT-2 ids (the format of the cached FineWeb-Edu shards on the Hub). Write, read memory-mapped, validate, hash; this
file knows nothing of tokenizers, documents or where shards come from."""

import hashlib
import os

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
    header = np.zeros(HEADER_BYTES // 4, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def shard_num_tokens(path) -> int:
    """The number of tokens `path` holds, once its header is checked against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated, {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, num_tokens = np.frombuffer(raw, dtype="<i4")[:3].tolist()
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic number {magic}, expected {MAGIC} (not a token shard)")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported shard version {version}, expected {VERSION}")
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(f"{path}: {what}: header says {num_tokens} tokens ({expected} bytes), file has {size} bytes")
    return num_tokens


def read_shard(path, check_ids: bool = False) -> np.memmap:
    """The tokens of `path` as a read-only uint16 memmap; `check_ids` (reads the whole file) checks every id."""
    num_tokens = shard_num_tokens(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if check_ids and int(tokens.max()) >= VOCAB_SIZE:
        position = int(np.argmax(tokens >= VOCAB_SIZE))
        raise ShardError(f"{path}: token {position} has id {tokens[position]}, not below {VOCAB_SIZE}")
    return tokens


def file_sha256(path) -> str:
    """The sha256 of the whole file, header included: the hash the Hugging Face Hub keeps for each shard."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
