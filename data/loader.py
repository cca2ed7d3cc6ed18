"""Token shards read as one stream in a fixed order, split across ranks; a token is never reused, and what a run sees
does not depend on its ranks or micro-batches (docs/training.md, "Data"). Knows the shard format, not the model."""

import glob, os

import numpy as np
import torch

from data.shards import EOT, VOCAB_SIZE, read_shard

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")  # tools/demo_corpus.py writes it
MISSING_DATA_HINT = ("download FineWeb-Edu with `python data/cached_finewebedu10B.py 10` (10 train shards, 1B "
                     "tokens), or train on the built-in demo corpus with `python train.py --preset=demo`")

def train_val_paths(data: str) -> tuple[str, str]:
    """The train shards' glob and the val shard of a corpus prefix (as cached_finewebedu10B.py names them)."""
    return f"{data}_train_*.bin", f"{data}_val_000000.bin"

class DataExhausted(RuntimeError):
    """The training shards have no room for another window; the loader never repeats data."""

def find_shards(pattern: str) -> list[str]:
    """The files matching a glob pattern, sorted; none: an error that says how to get data."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}: {MISSING_DATA_HINT}")
    return files

class TokenStream:
    """Shard files (a path or a list) as one concatenated stream of tokens with global positions, via memmaps."""

    def __init__(self, files):
        self.files = [str(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
        for path in self.files or ["no shard files given"]:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such shard: {MISSING_DATA_HINT}")
        self.shards = [read_shard(path) for path in self.files]
        self.starts = np.cumsum([0, *map(len, self.shards)]).tolist()  # global position of each file's start
        self.num_tokens = self.starts[-1]
        self._eot_file, self._eot_positions = None, None  # the <|endoftext|> positions of one file, read forward

    def file_of(self, position: int) -> int:
        """Index of the file holding `position` (len(files) at the end of the stream); skips empty files."""
        return int(np.searchsorted(self.starts, position, side="right")) - 1

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream as a uint16 array (a copy when it spans files)."""
        pieces, index = [], self.file_of(start)
        while start < end:
            take = min(end, self.starts[index + 1]) - start
            pieces.append(self.shards[index][start - self.starts[index]:][:take])
            start, index = start + take, index + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def next_document_start(self, position: int) -> int | None:
        """The first position >= `position` right after an `<|endoftext|>`, or None if there is none."""
        position = max(position - 1, 0)  # look for the <|endoftext|> that ends the document before
        for index in range(self.file_of(position), len(self.files)):
            if self._eot_file != index:
                self._eot_file, self._eot_positions = index, np.flatnonzero(self.shards[index] == EOT)
            k = int(np.searchsorted(self._eot_positions, position - self.starts[index]))
            if k < len(self._eot_positions):
                return self.starts[index] + int(self._eot_positions[k]) + 1
        return None

class TokenLoader:
    """This rank's batches [sequences, seq_len]: each step every rank reads the next window of world_size x sequences
    chunks and takes its own run of them; aligned chunks start at a document, skipped tokens count as consumed."""

    def __init__(self, files, seq_len: int, rank: int = 0, world_size: int = 1, align_to_documents: bool = True,
                 sequences: int = 1):
        if seq_len < 1 or sequences < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need seq_len >= 1, sequences >= 1, 0 <= rank < world_size: "
                             f"{seq_len=} {sequences=} {rank=} {world_size=}")
        self.stream, self.rank, self.world_size, self.sequences = TokenStream(files), rank, world_size, sequences
        self.seq_len, self.align_to_documents, self.num_tokens = seq_len, align_to_documents, self.stream.num_tokens
        self.position = 0  # tokens consumed by all ranks, those skipped to reach a document start included

    def next_batch(self) -> torch.Tensor:
        starts, position, window = [], self.position, self.world_size * self.sequences
        for _ in range(window):
            if self.align_to_documents:
                position = self.stream.next_document_start(position)
            if position is None or position + self.seq_len > self.num_tokens:
                raise DataExhausted(f"training data exhausted after {self.position:,} of {self.num_tokens:,} tokens: "
                                    f"no room for another {window}x{self.seq_len} window, and data is never repeated;"
                                    " train fewer steps or add shards (`python data/cached_finewebedu10B.py N`)")
            starts.append(position)
            position += self.seq_len
        self.position = position
        mine = starts[self.rank * self.sequences:(self.rank + 1) * self.sequences]
        chunks = [self.stream.read(start, start + self.seq_len) for start in mine]
        return torch.from_numpy(np.stack(chunks).astype(np.int64))

    def state_dict(self) -> dict:
        shard = min(self.stream.file_of(self.position), len(self.stream.files) - 1)
        name = os.path.basename(self.stream.files[shard])
        return {"shard": shard, "offset": self.position - self.stream.starts[shard], "shard_name": name}

    def load_state_dict(self, state: dict) -> None:
        shard, offset = int(state["shard"]), int(state["offset"])
        names = [os.path.basename(path) for path in self.stream.files]
        if not 0 <= shard < len(names) or names[shard] != state["shard_name"]:
            raise ValueError(f"saved loader position is in shard {state['shard_name']!r} (#{shard}), which is not "
                             f"shard #{shard} of the {len(names)} training shards given now")
        if not 0 <= offset <= (size := len(self.stream.shards[shard])):
            raise ValueError(f"saved loader offset {offset} is outside shard {names[shard]} ({size} tokens)")
        self.position = self.stream.starts[shard] + offset

def val_batches(path_or_files, num_tokens: int | None, seq_len: int, rank: int = 0, world_size: int = 1):
    """(offset, tokens [seq_len]) of the chunks rank, rank + world_size, ... of the first num_tokens (None: all)."""
    stream = TokenStream(path_or_files)
    num_tokens = stream.num_tokens // seq_len * seq_len if num_tokens is None else num_tokens
    if num_tokens % seq_len or num_tokens > stream.num_tokens:
        raise ValueError(f"val tokens {num_tokens} must be a multiple of seq_len {seq_len} and at most the "
                         f"{stream.num_tokens} tokens in {', '.join(stream.files)}")
    offsets = range(rank * seq_len, num_tokens, world_size * seq_len)  # not a generator: bad arguments fail at once
    return ((offset, torch.from_numpy(stream.read(offset, offset + seq_len).astype(np.int64))) for offset in offsets)

def unigram_baseline(train_files, val_files) -> float:
    """Cross-entropy in nats/token of the val tokens under the train tokens' unigram frequencies (add-one)."""
    train_counts, val_counts = token_counts(train_files), token_counts(val_files)
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + VOCAB_SIZE)
    return float(-(val_counts * log_probs).sum() / val_counts.sum())

def token_counts(files, step: int = 1 << 24) -> np.ndarray:
    """How often each id occurs in the shards, counted `step` tokens at a time (bounded memory on large shards)."""
    stream, counts = TokenStream(files), np.zeros(VOCAB_SIZE, dtype=np.int64)
    for start in range(0, stream.num_tokens, step):
        found = np.bincount(stream.read(start, min(start + step, stream.num_tokens)), minlength=VOCAB_SIZE)
        if len(found) > VOCAB_SIZE:
            raise ValueError(f"token id {len(found) - 1} is not below {VOCAB_SIZE} in {stream.files}")
        counts += found
    return counts
