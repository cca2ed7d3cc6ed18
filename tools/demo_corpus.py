"""A built-in demo corpus: real English text that every Python installation already has.

    python tools/demo_corpus.py     # writes data/demo/demo_{train,val}_000000.bin unless they are already there

The Python language reference topics (`pydoc_data.topics`), then the docstrings of the standard library, numpy and
torch (modules, public classes and functions, their public members); those under 200 characters dropped, exact
duplicates kept once, shuffled with a fixed seed. Documents sharing a run of 50 tokens, directly or through others
(numpy's and numpy.ma's twins), form a group that goes wholly to val (~128K tokens) or to train. The result depends
only on the installed versions. This file chooses the text; prepare_text.py and data/ tokenize and write it.
"""

import importlib, inspect, os, pkgutil, random, re, sys, warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data.loader import DEMO_DIR
from data.shards import EOT, ShardError, read_shard, write_shard
from tools.prepare_text import encode_document

DEMO_VAL_TOKENS = 131_072
MIN_CHARS = 200
SPAN_TOKENS = 50  # documents sharing a run of this many tokens are near duplicates
# random odd 64-bit coefficients: a span's hash is their dot product with its tokens, modulo 2**64
SPAN_COEFFICIENTS = np.random.default_rng(0).integers(0, 2**63, size=SPAN_TOKENS, dtype=np.uint64) * 2 + 1
# Imports with side effects (GUI, terminal, printing, browser) or that are only tests/tools of Python itself.
STDLIB_SKIP = set("antigravity this idlelib tkinter turtle turtledemo test readline rlcompleter distutils lib2to3 "
                  "ensurepip pydoc_data".split())
SUBMODULES = {  # read after the package itself, in this order
    "numpy": "linalg fft random ma polynomial lib lib.scimath lib.stride_tricks char strings testing rec exceptions",
    "torch": "nn nn.functional nn.init nn.utils nn.attention optim optim.lr_scheduler distributions linalg fft special "
             "autograd utils.data distributed cuda amp sparse nested func masked random testing export compiler fx "
             "profiler utils.checkpoint",
}

def stdlib_modules() -> list:
    """The importable public standard-library modules and their direct public submodules, sorted by name."""
    modules = []
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in STDLIB_SKIP):
        module = _try_import(name)
        if module is not None:
            children = pkgutil.iter_modules(getattr(module, "__path__", []), name + ".")
            public = sorted(info.name for info in children if not info.name.rsplit(".", 1)[1].startswith("_"))
            modules += [module] + [child for child in map(_try_import, public) if child is not None]
    return modules

def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # platform-specific or optional modules (winreg, _tkinter, ...) are absent
        return None

def docstrings(modules: list) -> list[str]:
    """Docstrings of each module, its public classes and callables and their public members, by name."""
    found = []

    def add(obj):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str):  # pybind signatures show default objects' addresses, which change per run
            found.append(re.sub(r" at 0x[0-9a-f]+>", ">", inspect.cleandoc(doc)))

    for module in modules:
        add(module)
        for obj in (_public_attribute(module, name) for name in sorted(dir(module))):
            if callable(obj) and not inspect.ismodule(obj):
                add(obj)
                for member in sorted(dir(obj)) if inspect.isclass(obj) else ():
                    add(_public_attribute(obj, member))
    return found

def _public_attribute(owner, name: str):
    if name.startswith("_"):
        return None
    if owner is sys and hasattr(sys, f"__{name}__"):  # hooks that tools replace (pytest: unraisablehook): the originals
        name = f"__{name}__"
    try:
        return getattr(owner, name)
    except Exception:  # lazy attributes that fail to load on this platform
        return None

def collect_documents() -> tuple[list[str], dict[str, int]]:
    """All demo documents (deduplicated, shuffled with a fixed seed) and how many came from each source."""
    from pydoc_data.topics import topics

    sources = {"pydoc_data.topics": [topics[key] for key in sorted(topics)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import; their docstrings are still text
        print("demo corpus: reading the docstrings of the standard library", flush=True)
        sources["stdlib docstrings"] = docstrings(stdlib_modules())
        for package, submodules in SUBMODULES.items():
            print(f"demo corpus: reading the docstrings of {package}", flush=True)
            modules = map(_try_import, [package] + [f"{package}.{name}" for name in submodules.split()])
            sources[f"{package} docstrings"] = docstrings(list(filter(None, modules)))
    documents, counts = {}, {}  # a dict keeps the first of exact duplicates, in order
    for source, texts in sources.items():
        before = len(documents)
        documents.update((text, None) for text in texts if len(text) >= MIN_CHARS)
        counts[source] = len(documents) - before
    documents = list(documents)
    random.Random(0).shuffle(documents)
    return documents, counts

def span_hashes(tokens: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each run of SPAN_TOKENS consecutive tokens, in order (none if there are fewer tokens)."""
    if len(tokens) < SPAN_TOKENS:
        return np.zeros(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.uint64), SPAN_TOKENS)
    return windows @ SPAN_COEFFICIENTS

def near_duplicate_groups(encoded: list[np.ndarray]) -> np.ndarray:
    """The group of each document: documents that share a span of SPAN_TOKENS tokens, directly or through other
    documents, are in one group, named by its first document."""
    hashes = [span_hashes(tokens) for tokens in encoded]
    owners = np.repeat(np.arange(len(encoded)), [len(h) for h in hashes])
    _, span_ids = np.unique(np.concatenate(hashes), return_inverse=True)
    groups, span_groups = np.arange(len(encoded)), np.empty(span_ids.max(initial=-1) + 1, dtype=np.int64)
    while True:  # each span and document takes the smallest group among its documents and spans, until none changes
        span_groups.fill(len(encoded))
        np.minimum.at(span_groups, span_ids, groups[owners])
        merged = groups.copy()
        np.minimum.at(merged, owners, span_groups[span_ids])
        if np.array_equal(merged := merged[merged], groups):
            return groups
        groups = merged

def split_groups(encoded: list[np.ndarray], val_tokens: int) -> tuple[list[int], list[int]]:
    """(val, train) document indices, in document order. Val takes whole near-duplicate groups in the order of their
    first documents until it holds val_tokens; a group larger than an eighth of that stays in train."""
    groups = near_duplicate_groups(encoded)
    sizes = np.bincount(groups, weights=[len(tokens) for tokens in encoded], minlength=len(encoded))
    in_val, filled = set(), 0
    for doc, group in enumerate(groups.tolist()):
        if doc == group and filled < val_tokens and sizes[group] <= val_tokens / 8:
            in_val.add(group)
            filled += int(sizes[group])
    chosen = np.isin(groups, list(in_val))
    return np.flatnonzero(chosen).tolist(), np.flatnonzero(~chosen).tolist()

def prepare_demo() -> tuple[str, str]:
    """Write the demo shards unless valid ones exist; print the corpus size; return (train_path, val_path)."""
    train_path, val_path = (os.path.join(DEMO_DIR, f"demo_{split}_000000.bin") for split in ("train", "val"))
    try:
        train, val = read_shard(train_path), read_shard(val_path)
    except ShardError:
        print(f"demo corpus: building the demo corpus in {DEMO_DIR} (once)", flush=True)
        documents, counts = collect_documents()
        print(f"demo corpus: tokenizing {len(documents)} documents", flush=True)
        encoded = [encode_document(text) for text in documents]
        print(f"demo corpus: grouping documents that share {SPAN_TOKENS}-token spans, then splitting val", flush=True)
        val_docs, train_docs = split_groups([tokens[1:] for tokens in encoded], DEMO_VAL_TOKENS)  # no <|endoftext|>
        os.makedirs(DEMO_DIR, exist_ok=True)
        write_shard(val_path, np.concatenate([encoded[doc] for doc in val_docs]))
        write_shard(train_path, np.concatenate([encoded[doc] for doc in train_docs]))
        train, val = read_shard(train_path), read_shard(val_path)
        print("demo sources: " + ", ".join(f"{source} {n} documents" for source, n in counts.items()))
    documents = int((train == EOT).sum()) + int((val == EOT).sum())
    print(f"demo corpus: {documents} documents, {len(train)} train and {len(val)} val tokens in {DEMO_DIR}")
    return train_path, val_path

if __name__ == "__main__":
    prepare_demo()
