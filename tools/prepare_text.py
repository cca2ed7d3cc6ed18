"""Tokenize your own text into GPT-2 token shards that train.py can read.

    python tools/prepare_text.py books/ notes.txt corpus.jsonl --out_dir=data/mytext --name=mytext

Inputs: `.txt` files (a document each), JSONL (a document per line) and Parquet files (needs pyarrow), the text in
`--text_field`; directories are searched recursively, in sorted order. Each document is `<|endoftext|>` then its
tokens. The first documents, until at least `--val_tokens` tokens, go to `{name}_val_000000.bin ...`, the rest to
`{name}_train_000000.bin ...`, `--shard_tokens` tokens per shard, whatever `--workers`. This file knows the input
formats and the document order; the byte format is data/shards.py's, the vocabulary data/tokenizer.py's.
"""

import argparse, glob, itertools, json, multiprocessing, os, sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data.shards import EOT, write_shard
from data.tokenizer import get_tokenizer

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")

def iter_documents(paths: list[str], text_field: str = "text") -> Iterator[str]:
    """Yield the text of every document in `paths` (files or directories), in a fixed order."""
    for path in expand_inputs(paths):
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if line.strip():
                        yield _text_of(line, text_field, f"{path}:{line_number}")
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`)") from None
            parquet = pq.ParquetFile(path)
            if text_field not in parquet.schema_arrow.names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
            for batch in parquet.iter_batches(columns=[text_field]):
                yield from (text for text in batch.column(0).to_pylist() if text is not None)

def expand_inputs(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = glob.glob(os.path.join(path, "**", "*"), recursive=True)
            files += sorted(p for p in found if p.endswith(INPUT_SUFFIXES) and os.path.isfile(p))
        elif os.path.isfile(path) and path.endswith(INPUT_SUFFIXES):
            files.append(path)
        else:
            raise ValueError(f"{path}: not a directory or a {'/'.join(INPUT_SUFFIXES)} file")
    return files

def _text_of(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"{where}: expected a JSON object with a string field {text_field!r}")
    return record[text_field]

def encode_document(text: str) -> np.ndarray:
    """`<|endoftext|>` followed by the document's tokens; special-token text inside a document stays text."""
    return np.array([EOT] + get_tokenizer().encode_ordinary(text), dtype=np.uint16)

def write_shards(prefix: str, arrays: Iterable[np.ndarray], shard_tokens: int) -> list[str]:
    """Cut the stream of token arrays into shards of `shard_tokens` tokens named `{prefix}_{index:06d}.bin`."""
    paths, pending, held = [], [], 0
    for tokens in itertools.chain(arrays, [None]):  # None: the end, where the last, shorter shard is written
        if tokens is not None:
            pending.append(tokens)
            held += len(tokens)
        while held >= shard_tokens or (tokens is None and held):
            stream = np.concatenate(pending)
            paths.append(f"{prefix}_{len(paths):06d}.bin")
            write_shard(paths[-1], stream[:shard_tokens])
            pending, held = [stream[shard_tokens:]], max(held - shard_tokens, 0)
    return paths

def first_documents(encoded: Iterator[np.ndarray], num_tokens: int) -> Iterator[np.ndarray]:
    """Documents taken from `encoded` until they hold at least `num_tokens` tokens; the rest stay in `encoded`."""
    while num_tokens > 0 and (tokens := next(encoded, None)) is not None:
        num_tokens -= len(tokens)
        yield tokens

def write_token_shards(documents: Iterable[str], out_dir: str, name: str, val_tokens: int,
                       shard_tokens: int = 100_000_000, workers: int | None = None,
                       progress: bool = True) -> tuple[list[str], list[str]]:
    """Tokenize `documents` into val and train shards in `out_dir`; return (train_paths, val_paths)."""
    if shard_tokens < 1 or val_tokens < 0:
        raise ValueError(f"need shard_tokens >= 1 and val_tokens >= 0, got {shard_tokens} and {val_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    bar = tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {name}", disable=not progress)
    # one worker starts no processes, so small jobs do not pay for them
    with multiprocessing.Pool(workers, initializer=get_tokenizer) if workers > 1 else nullcontext() as pool:
        encoded = pool.imap(encode_document, documents, chunksize=128) if pool else map(encode_document, documents)
        encoded = (tokens for tokens in encoded if bar.update(len(tokens)) or True)
        val_paths = write_shards(os.path.join(out_dir, f"{name}_val"), first_documents(encoded, val_tokens),
                                 shard_tokens)
        train_paths = write_shards(os.path.join(out_dir, f"{name}_train"), encoded, shard_tokens)
    bar.close()
    if not train_paths:
        raise ValueError(f"{name}: no documents left for training after {val_tokens} tokens went to val")
    return train_paths, val_paths

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="text files, .jsonl files, .parquet files or directories")
    parser.add_argument("--out_dir", required=True, help="where the shards go")
    parser.add_argument("--name", default="custom", help="shard file prefix (default: custom)")
    parser.add_argument("--text_field", default="text", help="JSONL key / Parquet column of the text")
    parser.add_argument("--val_tokens", type=int, default=1_048_576, help="held-out tokens (whole documents)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards with this name")
    args = parser.parse_args()

    existing = sorted(glob.glob(os.path.join(args.out_dir, f"{args.name}_*_" + "[0-9]" * 6 + ".bin")))
    if existing and not args.overwrite:
        raise SystemExit(f"{args.out_dir} already holds {len(existing)} {args.name} shards; pass --overwrite")
    for path in existing:
        os.remove(path)
    try:
        documents = iter_documents(expand_inputs(args.inputs), args.text_field)  # bad paths fail before out_dir exists
        train_paths, val_paths = write_token_shards(documents, args.out_dir, args.name, args.val_tokens,
                                                    args.shard_tokens, args.workers)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {len(train_paths)} train and {len(val_paths)} val shards to {args.out_dir}")

if __name__ == "__main__":
    main()
