"""Helpers the test modules share: tiny random models and token streams, a slow per-block reference of the loss,
train.py as a subprocess, logs, checkpoints, the demo corpus and one small trained run. Test modules import these
from here, never from each other.
"""

import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import common  # noqa: E402
from model import BD3LM, ModelConfig  # noqa: E402
from tools.demo_corpus import prepare_demo  # noqa: E402
from train import Hyperparameters  # noqa: E402

VOCAB, EOT = 97, 96  # a tiny vocabulary for random models; <|endoftext|> is its last id

# a small demo-preset model: two layers of width 128, 2 x 128-token sequences per step, exact fp32
SMALL = ["--preset=demo", "--n_layer=2", "--model_dim=128", "--n_head=2", "--head_dim=64", "--mlp_hidden=256",
         "--seq_len=128", "--batch_size=2", "--val_tokens=1024", "--autocast=fp32"]
# one thread per process: torchrun gives each rank one, and two threads on a busy 2-core machine spin-wait for
# each other (tens of seconds a step); exactness tests compare runs made with the same thread count anyway
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: a worker per core, each on one thread for the same reason
    torch.set_num_threads(1)
# the shared trained run: validations at steps 0, 2 and 4, latest.pt at step 2, final.pt at step 4
TRAINED = [*SMALL, "--steps=4", "--val_every=2"]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, as ONE_THREAD gives a subprocess: small models run faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_corpus():
    """(train shard, val shard) of the built-in demo corpus, prepared once if missing."""
    return prepare_demo()


# -----------------------------------------------------------------------------
# Models, streams and the reference loss


def small_model(block_size=4, vocab_size=VOCAB, seed=0, n_layer=4, **overrides) -> BD3LM:
    """A tiny model with every weight random (zero-initialized projections would hide bugs); <|endoftext|> is the
    vocabulary's last id."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64,
                      block_size=block_size, **overrides)
    model = BD3LM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def peaked_model(block_size: int, seed: int, vocab_size: int) -> BD3LM:
    """Random weights with a wide head: peaked, position-dependent distributions, as a trained model has. In eval
    mode, <|endoftext|> is the last id."""
    torch.manual_seed(seed)
    model = BD3LM(ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, head_dim=16, model_dim=32, mlp_hidden=64,
                              block_size=block_size))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, (4 if name.startswith("head") else 1) * param.size(-1) ** -0.5)
    return model.eval()


class CountingBackend:
    """A torch.compile backend that counts the graphs Dynamo hands over (a recompile is one more) and runs them
    with aot_eager."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend("aot_eager")(graph_module, example_inputs)


def random_stream(length, gen, eot_id=EOT, vocab=VOCAB, mean_doc=20) -> torch.Tensor:
    """Random tokens in which an <|endoftext|> ends a document with probability 1 / mean_doc at every position,
    so documents of every length occur, shorter than a block and two in one block included."""
    tokens = torch.randint(0, vocab - 1, (length,), generator=gen)
    tokens[tokens == eot_id] = 0
    tokens[torch.rand(length, generator=gen) < 1 / mean_doc] = eot_id
    return tokens


def tricky_streams(length, block_size, gen):
    """Streams that put <|endoftext|> where the rule is easy to get wrong: on the first and on the last slot of a
    block, twice in one block, at the start of the stream, and nowhere at all (one document mid-stream)."""
    streams = [random_stream(length, gen, mean_doc=m) for m in (3, 8, 10**9)]
    edges = random_stream(length, gen, mean_doc=10**9)
    edges[::block_size] = EOT  # first slot of every block
    edges[block_size - 1::3 * block_size] = EOT  # last slot of every third block
    if block_size >= 4:
        edges[block_size + 1: length: 5 * block_size] = EOT  # with the first slot: two in one block
    return streams + [edges]


def naive_token_losses(model, tokens, noise):
    """For each block: the clean tokens of the document it starts in, then the noisy block, run as one
    ordinary sequence with a block-causal mask over the fixed slots. A masked token's cross-entropy is
    multiplied by its weight in the noise."""
    cfg, length = model.config, len(tokens)
    losses = torch.zeros(length)
    x_t = torch.where(noise.masked, cfg.mask_id, tokens)
    ids = tokens.tolist()
    for start in range(0, length, cfg.block_size):
        end = min(start + cfg.block_size, length)
        doc_start = start
        while doc_start > 0 and ids[doc_start - 1] != cfg.eot_id:
            doc_start -= 1
        sequence = torch.cat([tokens[doc_start:start], x_t[start:end]])
        pos = torch.arange(doc_start, end)
        slot = pos // cfg.block_size
        mask = (slot[None, :] <= slot[:, None])[None, None]
        hidden, _ = model.trunk(sequence[None], pos[None], mask)
        logits = model.logits_of(hidden[0, start - doc_start:]).float()
        ce = F.cross_entropy(logits, tokens[start:end], reduction="none")
        losses[start:end] = torch.where(noise.masked[start:end], ce * noise.weight[start:end], 0.0)
    return losses


def save_checkpoint(model: BD3LM, path, seq_len: int = 64) -> str:
    """A checkpoint of `model` in train.py's format, as if a run of seq_len-token sequences had written it."""
    common.save_checkpoint(str(path), model, asdict(Hyperparameters(**asdict(model.config), seq_len=seq_len)))
    return str(path)


# -----------------------------------------------------------------------------
# train.py as a subprocess, its logs and checkpoints


def run_train(tmp_path, *flags, env=None, check=True, launcher=(sys.executable, f"{REPO}/train.py")):
    """Run train.py in tmp_path, so that its logs/ and checkpoints/ are there; returns the CompletedProcess."""
    result = subprocess.run([*launcher, *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **ONE_THREAD, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_log(tmp_path, run_id):
    with open(f"{tmp_path}/logs/{run_id}.txt") as f:
        return f.read()


def val_losses(log_text):
    return [float(m.group(1)) for m in re.finditer(r"^step:\d+/\d+ val_loss:(\S+) ", log_text, re.M)]


def load_final(tmp_path, run_id):
    return torch.load(f"{tmp_path}/checkpoints/{run_id}/final.pt", weights_only=True)


@dataclass(frozen=True)
class TrainedRun:
    """What one run of train.py leaves behind; tests read these files and never write to them."""

    folder: Path
    run_id: str
    text: str  # the log

    @property
    def log(self) -> Path:
        return self.folder / "logs" / f"{self.run_id}.txt"

    @property
    def final(self) -> str:
        return f"{self.folder}/checkpoints/{self.run_id}/final.pt"

    @property
    def latest(self) -> str:
        return f"{self.folder}/checkpoints/{self.run_id}/latest.pt"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo_corpus) -> TrainedRun:
    """One small demo-corpus run of train.py with the TRAINED flags, shared by every test that needs a real log or
    checkpoint, so that the suite trains it once."""
    folder = tmp_path_factory.mktemp("trained")
    run_train(folder, *TRAINED, "--run_id=small")
    return TrainedRun(folder, "small", read_log(folder, "small"))
