"""A built-in demo corpus: real English text that every Python installation already has.

Sources, in this order: the Python language reference topics of `pydoc_data.topics`, then the docstrings of
the standard library, numpy and torch (modules, their public classes and functions, and the public members
of those classes). Docstrings shorter than 200 characters are dropped and exact duplicates kept once. The
documents are shuffled with a fixed seed, so the first ~128K tokens, the held-out val split, come from all
sources. The result depends only on the Python and package versions installed.

    python data/demo.py     # writes data/demo/demo_{train,val}_000000.bin unless they are already there

This file chooses the text; tokenizing and the shard format belong to prepare.py, tokenizer.py, shards.py.
"""

import importlib
import inspect
import os
import pkgutil
import random
import re
import sys
import warnings

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import write_token_shards
from data.shards import ShardError, read_shard
from data.tokenizer import EOT

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEMO_VAL_TOKENS = 131_072
MIN_CHARS = 200
# Imports with side effects (GUI, terminal, printing, browser) or that are only tests/tools of Python itself.
STDLIB_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "readline", "rlcompleter",
    "distutils", "lib2to3", "ensurepip", "pydoc_data",
}  # fmt: skip
PACKAGE_MODULES = [
    "numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial", "numpy.lib",
    "numpy.lib.scimath", "numpy.lib.stride_tricks", "numpy.char", "numpy.strings", "numpy.testing",
    "numpy.rec", "numpy.exceptions",
    "torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.nn.utils", "torch.nn.attention",
    "torch.optim", "torch.optim.lr_scheduler", "torch.distributions", "torch.linalg", "torch.fft",
    "torch.special", "torch.autograd", "torch.utils.data", "torch.distributed", "torch.cuda", "torch.amp",
    "torch.sparse", "torch.nested", "torch.func", "torch.masked", "torch.random", "torch.testing",
    "torch.export", "torch.compiler", "torch.fx", "torch.profiler", "torch.utils.checkpoint",
]  # fmt: skip


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
    except Exception:  # platform-specific or optional modules (winreg, _tkinter, ...) are simply absent here
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
        for name in sorted(dir(module)):
            obj = _public_attribute(module, name)
            if obj is None or inspect.ismodule(obj) or not callable(obj):
                continue
            add(obj)
            if inspect.isclass(obj):
                for member in sorted(dir(obj)):
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
        sources["stdlib docstrings"] = docstrings(stdlib_modules())
        for package in ("numpy", "torch"):
            modules = [_try_import(n) for n in PACKAGE_MODULES if n.split(".")[0] == package]
            sources[f"{package} docstrings"] = docstrings(list(filter(None, modules)))
    documents, counts = {}, {}
    for source, texts in sources.items():
        before = len(documents)
        documents.update((text, None) for text in texts if len(text) >= MIN_CHARS)
        counts[source] = len(documents) - before
    documents = list(documents)
    random.Random(0).shuffle(documents)
    return documents, counts


def prepare_demo() -> tuple[str, str]:
    """Write the demo shards unless valid ones exist; print the corpus size; return (train_path, val_path)."""
    train_path, val_path = (os.path.join(DEMO_DIR, f"demo_{split}_000000.bin") for split in ("train", "val"))
    try:
        train, val = read_shard(train_path), read_shard(val_path)
    except ShardError:
        documents, counts = collect_documents()
        train_paths, val_paths = write_token_shards(documents, DEMO_DIR, "demo", DEMO_VAL_TOKENS, shard_tokens=1 << 28,
                                                    workers=1, progress=False)
        if [train_path, val_path] != train_paths + val_paths:
            raise RuntimeError(f"demo corpus no longer fits one train and one val shard: {train_paths}")
        train, val = read_shard(train_path), read_shard(val_path)
        print("demo sources: " + ", ".join(f"{source} {n} documents" for source, n in counts.items()))
    documents = int((train == EOT).sum()) + int((val == EOT).sum())
    print(f"demo corpus: {documents} documents, {len(train)} train and {len(val)} val tokens in {DEMO_DIR}")
    return train_path, val_path


if __name__ == "__main__":
    prepare_demo()
