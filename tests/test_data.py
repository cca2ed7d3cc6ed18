"""Tests for data/: shard format, downloader (against a fake Hub on 127.0.0.1), tokenizer, corpora, loader.

Run: python -m pytest -q tests/test_data.py      (offline; about half a minute on 2 cores)
"""

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import tiktoken
import torch

from data.loader import DataExhausted, TokenLoader, find_shards, token_counts, unigram_baseline, val_batches
from data.shards import EOT, HEADER_BYTES, MAGIC, VOCAB_SIZE, ShardError, read_shard, shard_num_tokens, write_shard
from data.tokenizer import GPT2_FILES, get_tokenizer, gpt2_from_files, package_files
from tools.prepare_text import iter_documents, write_token_shards

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng()


def real_text(chars: int = 20_000) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    start = int(rng.integers(0, len(text) - chars))
    return text[start : start + chars] + " naïve café, 東京, emoji 🙂, <|endoftext|> as plain text"


# ----------------------------------------------------------------------------------------------------------
# 1. Shard format


def test_shard_round_trip(tmp_path):
    tokens = rng.integers(0, 50257, size=int(rng.integers(1, 5000)))
    tokens[[0, -1]] = 0, 50256
    path = tmp_path / "a.bin"
    write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [MAGIC, 1, len(tokens)]
    assert os.path.getsize(path) == HEADER_BYTES + 2 * len(tokens)
    loaded = read_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16 and loaded.max() < VOCAB_SIZE
    np.testing.assert_array_equal(loaded, tokens)
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary file left behind
    write_shard(tmp_path / "empty.bin", [])
    assert len(read_shard(tmp_path / "empty.bin")) == 0


def _corrupt(path, kind):
    data = bytearray(path.read_bytes())
    if kind == "bad magic":
        data[0:4] = np.int32(12345).tobytes()
    elif kind == "wrong version":
        data[4:8] = np.int32(7).tobytes()
    elif kind == "truncated":
        data = data[:-6]
    elif kind == "count mismatch":
        data[8:12] = np.int32(10).tobytes()
    elif kind == "shorter than header":
        data = data[:100]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "kind, words",
    [
        ("bad magic", "magic"),
        ("wrong version", "version"),
        ("truncated", "truncated"),
        ("count mismatch", "longer than its header"),
        ("shorter than header", "truncated"),
    ],
)
def test_shard_errors_name_file_and_problem(tmp_path, kind, words):
    path = tmp_path / f"{kind.replace(' ', '_')}.bin"
    write_shard(path, rng.integers(0, 50257, size=100))
    _corrupt(path, kind)
    with pytest.raises(ShardError, match=words) as error:
        read_shard(path)
    assert str(path) in str(error.value)
    assert isinstance(error.value, ValueError)


def test_shard_id_check(tmp_path):
    path = tmp_path / "ids.bin"
    write_shard(path, [1, 2, 3])
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 2)
        f.write(np.uint16(60000).tobytes())
    read_shard(path)  # ids are not scanned on reading; train.py's unigram baseline counts every id
    with pytest.raises(ValueError, match="token id 60000 is not below 50257"):
        token_counts([str(path)])
    with pytest.raises(ValueError, match="ids must be in"):
        write_shard(tmp_path / "bad.bin", [50257])


# ----------------------------------------------------------------------------------------------------------
# 2. Downloader against a fake Hub


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves files the way the Hub's resolve endpoint does; records every request."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.files, self.requests, self.interrupt, self.etags = files, [], set(), {}
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    prefix = "/datasets/kjj0/finewebedu10B-gpt2/resolve/main/"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body):
        hub = self.server
        name = self.path[len(self.prefix) :] if self.path.startswith(self.prefix) else None
        hub.requests.append((self.command, self.path))
        if name not in hub.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = hub.files[name]
        gets = sum(1 for method, path in hub.requests if method == "GET" and path == self.path)
        if send_body and name in hub.interrupt and gets > 1:
            self.send_response(500)  # the retry after a broken transfer fails too: a lasting outage
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"' + hub.etags.get(name, hashlib.sha256(body).hexdigest()) + '"')  # LFS: sha256
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not send_body:
            return
        if name in hub.interrupt:
            self.wfile.write(body[start : start + len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        self.wfile.write(body[start:])


@pytest.fixture
def fake_hub():
    def shard_bytes(num_tokens):
        tokens = rng.integers(0, 50257, size=num_tokens).astype("<u2")
        header = np.zeros(256, dtype="<i4")
        header[:3] = MAGIC, 1, num_tokens
        return header.tobytes() + tokens.tobytes()

    files = {"finewebedu_val_000000.bin": shard_bytes(3000)}
    files.update({f"finewebedu_train_{i:06d}.bin": shard_bytes(5000 + i) for i in range(1, 4)})
    hub = FakeHub(files)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def run_downloader(hub, out_dir, num_train):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(out_dir / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "data/cached_finewebedu10B.py", str(num_train), f"--out_dir={out_dir / 'fw'}"]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def shard_gets(hub):
    return [path for method, path in hub.requests if method == "GET" and path.endswith(".bin")]


def test_downloader_fetches_then_skips(fake_hub, tmp_path):
    result = run_downloader(fake_hub, tmp_path, 2)
    assert result.returncode == 0, result.stderr
    wanted = ["finewebedu_val_000000.bin", "finewebedu_train_000001.bin", "finewebedu_train_000002.bin"]
    for name in wanted:
        assert (tmp_path / "fw" / name).read_bytes() == fake_hub.files[name]
    assert not (tmp_path / "fw" / "finewebedu_train_000003.bin").exists()
    assert len(shard_gets(fake_hub)) == 3

    fake_hub.requests.clear()
    result = run_downloader(fake_hub, tmp_path, 3)
    assert result.returncode == 0, result.stderr
    assert shard_gets(fake_hub) == [FakeHubHandler.prefix + "finewebedu_train_000003.bin"]
    assert result.stdout.count("already complete, skipped") == 3


def test_downloader_replaces_invalid_local_file(fake_hub, tmp_path):
    (tmp_path / "fw").mkdir()
    truncated = fake_hub.files["finewebedu_val_000000.bin"][:-100]
    (tmp_path / "fw" / "finewebedu_val_000000.bin").write_bytes(truncated)
    result = run_downloader(fake_hub, tmp_path, 0)
    assert result.returncode == 0, result.stderr
    name = "finewebedu_val_000000.bin"
    assert (tmp_path / "fw" / name).read_bytes() == fake_hub.files[name]


def test_interrupted_download_leaves_no_valid_looking_shard(fake_hub, tmp_path):
    fake_hub.interrupt.add("finewebedu_train_000001.bin")
    result = run_downloader(fake_hub, tmp_path, 2)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("could not download finewebedu_train_000001.bin"), result.stderr
    assert not (tmp_path / "fw" / "finewebedu_train_000001.bin").exists()
    valid = []
    for folder, _, names in os.walk(tmp_path / "fw"):
        for name in names:
            try:
                shard_num_tokens(os.path.join(folder, name))
                valid.append(name)
            except ShardError:
                pass
    assert valid == ["finewebedu_val_000000.bin"]


def test_downloader_verifies_the_sha256(fake_hub, tmp_path, monkeypatch):
    name = "finewebedu_val_000000.bin"
    result = run_downloader(fake_hub, tmp_path, 0)
    sha256 = hashlib.sha256(fake_hub.files[name]).hexdigest()
    assert result.returncode == 0 and f"sha256 {sha256} (matches the Hub's hash)" in result.stdout, result.stdout

    (tmp_path / "fw" / name).unlink()
    fake_hub.etags[name] = "0" * 64  # a transfer that does not give the file the Hub names
    result = run_downloader(fake_hub, tmp_path, 0)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last_line == f"removed the download of {name}: its sha256 {sha256} is not the " \
                                                  f"Hub's hash {'0' * 64}", result.stderr
    assert not (tmp_path / "fw" / name).exists()

    import data.cached_finewebedu10B as downloader

    assert downloader.check_sha256(name, sha256, None) == "no known hash to verify it against"
    monkeypatch.setitem(downloader.KNOWN_SHA256, name, "1" * 64)  # a known hash wins over the Hub's
    with pytest.raises(ValueError, match=f"its sha256 {sha256} is not the known hash {'1' * 64}"):
        downloader.check_sha256(name, sha256, sha256)


def test_downloader_rejects_a_served_file_that_is_not_a_shard(fake_hub, tmp_path):
    fake_hub.files["finewebedu_val_000000.bin"] = b"not a shard at all" * 100
    result = run_downloader(fake_hub, tmp_path, 0)
    assert result.returncode != 0 and "not a valid shard" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "fw" / "finewebedu_val_000000.bin").exists()


# ----------------------------------------------------------------------------------------------------------
# 3. Tokenizer


def test_tokenizer_round_trip_and_special_token():
    enc = get_tokenizer()
    text = real_text()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert max(ids) < 50257 and EOT not in ids  # "<|endoftext|>" written in a document stays text
    assert EOT == enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode("Hello world") == [15496, 995]
    assert get_tokenizer() is enc


def test_offline_files_match_tiktoken_gpt2(tmp_path, monkeypatch):
    """Hand tiktoken's own gpt2 definition the package's files through its cache; compare the encodings."""
    vocab_bpe, encoder_json = package_files()
    base_url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name, path in zip(GPT2_FILES, (vocab_bpe, encoder_json)):
        shutil.copy(path, tmp_path / hashlib.sha1((base_url + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("gpt2")
    offline = gpt2_from_files(vocab_bpe, encoder_json)
    text = real_text(50_000)
    assert offline.encode_ordinary(text) == reference.encode_ordinary(text)
    assert offline.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert offline.n_vocab == reference.n_vocab and offline.special_tokens_set == reference.special_tokens_set


def test_offline_files_with_wrong_hash_are_refused(tmp_path):
    vocab_bpe, encoder_json = package_files()
    damaged = tmp_path / "vocab.bpe"
    lines = open(vocab_bpe, "rb").read().split(b"\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges swapped: a different tokenizer, same file size
    damaged.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match="sha256") as error:
        gpt2_from_files(str(damaged), encoder_json)
    assert str(damaged) in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# prepare.py and the demo corpus


def split_documents(tokens):
    starts = np.flatnonzero(tokens == EOT).tolist() + [len(tokens)]
    return [tokens[a + 1 : b] for a, b in zip(starts, starts[1:])]


def test_write_token_shards_same_for_any_worker_count(tmp_path):
    documents = [real_text(int(rng.integers(100, 3000))) for _ in range(40)]
    enc = get_tokenizer()
    outputs = []
    for workers in (1, 2):
        out_dir = tmp_path / f"w{workers}"
        train, val = write_token_shards(documents, str(out_dir), "t", val_tokens=2000, shard_tokens=5000,
                                        workers=workers, progress=False)  # fmt: skip
        outputs.append([open(p, "rb").read() for p in val + train])
        stream = np.concatenate([read_shard(p) for p in val + train])
        assert stream[0] == EOT and len(split_documents(stream)) == len(documents)
        assert [enc.decode(d.tolist()) for d in split_documents(stream)] == documents
        assert all(shard_num_tokens(p) == 5000 for p in train[:-1]) and len(train) > 1
        val_tokens = sum(shard_num_tokens(p) for p in val)
        assert val_tokens >= 2000 and read_shard(train[0])[0] == EOT  # val holds whole documents
    assert outputs[0] == outputs[1]


def test_prepare_script_reads_txt_and_jsonl(tmp_path):
    texts = [real_text(int(rng.integers(200, 2000))) for _ in range(6)]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text(texts[0])
    (tmp_path / "in" / "sub" / "b.txt").write_text(texts[1])
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[2:])]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "tools/prepare_text.py", str(tmp_path / "in"), str(tmp_path / "c.jsonl"),
               f"--out_dir={tmp_path / 'out'}", "--name=mine", "--val_tokens=1", "--workers=2"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    val = read_shard(tmp_path / "out" / "mine_val_000000.bin")
    train = read_shard(tmp_path / "out" / "mine_train_000000.bin")
    enc = get_tokenizer()
    assert [enc.decode(d.tolist()) for d in split_documents(np.concatenate([val, train]))] == texts
    assert len(split_documents(np.asarray(val))) == 1
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_iter_documents_errors_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_documents([str(tmp_path / "bad.jsonl")]))


def test_demo_corpus(tmp_path, monkeypatch, capsys):
    import tools.demo_corpus as demo

    monkeypatch.setattr(demo, "DEMO_DIR", str(tmp_path))
    train_path, val_path = demo.prepare_demo()
    train, val = read_shard(train_path), read_shard(val_path)
    assert train.max() < VOCAB_SIZE and val.max() < VOCAB_SIZE
    assert len(train) >= 1_000_000 and len(val) >= demo.DEMO_VAL_TOKENS
    assert train[0] == EOT and val[0] == EOT
    first_bytes = open(train_path, "rb").read()
    stages = ["building", "standard library", "numpy", "torch", "tokenizing", "grouping", f"{len(train)} train"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("demo corpus: ")]
    assert len(printed) == len(stages) and all(stage in line for stage, line in zip(stages, printed)), printed
    assert demo.prepare_demo() == (train_path, val_path)  # idempotent: the existing shards are kept
    assert open(train_path, "rb").read() == first_bytes and "demo corpus:" in capsys.readouterr().out
    documents, counts = demo.collect_documents()
    assert len(documents) == len(set(documents)) == sum(counts.values())
    assert len(split_documents(np.concatenate([val, train]))) == len(documents)
    # the same corpus in a plain process as here under pytest, which replaces sys.unraisablehook
    fresh = subprocess.run([sys.executable, "-c", "import hashlib, json; "
                            "from tools.demo_corpus import collect_documents; "
                            "print(hashlib.sha256(json.dumps(collect_documents()[0]).encode()).hexdigest())"],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert fresh.stdout.strip().splitlines()[-1] == hashlib.sha256(json.dumps(documents).encode()).hexdigest()


def windows(tokens, n: int) -> set[bytes]:
    """Every run of n tokens, as bytes: the slow exact reference of demo.span_hashes."""
    raw = np.ascontiguousarray(tokens, dtype="<u2").tobytes()
    return {raw[2 * i : 2 * (i + n)] for i in range(len(tokens) - n + 1)}


def test_demo_val_shares_no_long_span_with_train(demo_corpus):
    """The real demo corpus: no val document has a run of 50 tokens that a train document has."""
    import tools.demo_corpus as demo

    train, val = (np.asarray(read_shard(path)) for path in demo_corpus)
    train_spans = set().union(*(windows(doc, demo.SPAN_TOKENS) for doc in split_documents(train)))
    val_docs = split_documents(val)
    assert len(val_docs) > 100 and not any(windows(doc, demo.SPAN_TOKENS) & train_spans for doc in val_docs)


def test_near_duplicate_groups_match_a_slow_reference():
    """Random documents with spans copied between them (chains included) are grouped as the slow way groups them:
    documents linked when they share a run of SPAN_TOKENS tokens, groups the connected sets."""
    import tools.demo_corpus as demo

    n = demo.SPAN_TOKENS
    docs = [rng.integers(0, 50257, size=int(rng.integers(10, 400))).astype(np.uint16) for _ in range(60)]
    for _ in range(25):
        a, b = rng.integers(0, len(docs), size=2)
        length = int(rng.integers(n - 3, n + 30))  # some copies too short to link
        if len(docs[a]) >= length and len(docs[b]) >= length:
            start, to = int(rng.integers(0, len(docs[a]) - length + 1)), int(rng.integers(0, len(docs[b]) - length + 1))
            docs[b][to : to + length] = docs[a][start : start + length]
    spans = [windows(doc, n) for doc in docs]
    reference = list(range(len(docs)))
    for i in range(len(docs)):  # label propagation until every linked pair shares the smallest label
        for j in range(len(docs)):
            if spans[i] & spans[j]:
                low = min(reference[i], reference[j])
                reference = [low if label in (reference[i], reference[j]) else label for label in reference]
    assert demo.near_duplicate_groups(docs).tolist() == reference

    val, train = demo.split_groups(docs, 2000)
    assert sorted(val + train) == list(range(len(docs)))
    assert not set().union(*(spans[i] for i in val)) & set().union(*(spans[i] for i in train))
    groups = demo.near_duplicate_groups(docs)
    sizes = {group: sum(len(docs[i]) for i in range(len(docs)) if groups[i] == group) for group in set(groups.tolist())}
    small = sum(size for size in sizes.values() if size <= 2000 / 8)  # the groups val may take
    assert sum(len(docs[i]) for i in val) >= min(2000, small)


# ----------------------------------------------------------------------------------------------------------
# 4. Loader


@pytest.fixture
def position_shards(tmp_path):
    """Shards whose token at global position p is p (so every token read tells where it came from), except
    where a document ends, which holds EOT. Files of uneven sizes, one of them empty; documents cross files."""
    total = int(rng.integers(30_000, 45_000))
    stream = np.arange(total, dtype=np.uint16)
    doc_ends = np.unique(np.concatenate([[0], rng.integers(1, total, size=total // 300)]))
    stream[doc_ends] = EOT
    cuts = sorted(rng.integers(1, total, size=3).tolist())
    cuts.insert(2, cuts[1])  # an empty shard
    paths = []
    for i, (a, b) in enumerate(zip([0] + cuts, cuts + [total])):
        paths.append(str(tmp_path / f"s_{i:06d}.bin"))
        write_shard(paths[-1], stream[a:b])
    return paths, stream


def reference_chunks(stream, seq_len, align):
    """The stream's chunks in order, found the slow obvious way."""
    chunks, position = [], 0
    while True:
        while align and position < len(stream) and (position == 0 or stream[position - 1] != EOT):
            position += 1
        if position + seq_len > len(stream):
            return chunks
        chunks.append((position, stream[position : position + seq_len]))
        position += seq_len


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("world_size,sequences", [(1, 1), (2, 1), (4, 1), (1, 3), (2, 2)])
def test_ranks_read_one_window_per_step(position_shards, world_size, sequences, align):
    paths, stream = position_shards
    seq_len = int(rng.integers(200, 900))
    loaders = [TokenLoader(paths, seq_len, rank, world_size, align, sequences=sequences) for rank in range(world_size)]
    expected = reference_chunks(stream, seq_len, align)
    window_size = world_size * sequences
    for step in range(len(expected) // window_size):
        window = [loader.next_batch() for loader in loaders]
        for rank, x in enumerate(window):
            assert x.dtype == torch.int64 and x.shape == (sequences, seq_len)
            for row in range(sequences):  # rank r reads the r-th run of `sequences` chunks of the window
                start, tokens = expected[step * window_size + rank * sequences + row]
                np.testing.assert_array_equal(x[row].numpy(), tokens)
                assert not align or stream[start - 1] == EOT  # a chunk starts a document
        if not align:
            begin = step * window_size * seq_len
            contiguous = stream[begin : begin + window_size * seq_len]
            np.testing.assert_array_equal(torch.cat(window).flatten().numpy(), contiguous)
        assert len({loader.position for loader in loaders}) == 1
    for loader in loaders:
        with pytest.raises(DataExhausted):
            loader.next_batch()


def positions_of(x):
    """Global positions a chunk of position_shards covers (non-EOT tokens hold their own position)."""
    values = x.numpy()
    index = int(np.flatnonzero(values != EOT)[0])
    positions = values[index] - index + np.arange(len(values))
    assert np.all((values == positions) | (values == EOT))
    return positions.tolist()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_no_position_read_twice_and_clear_exhaustion(position_shards, world_size):
    paths, stream = position_shards
    seq_len = 512
    loaders = [TokenLoader(paths, seq_len, rank, world_size) for rank in range(world_size)]
    seen = []
    with pytest.raises(DataExhausted, match="exhausted.*never repeated.*cached_finewebedu10B.py"):
        while True:
            for loader in loaders:
                seen += positions_of(loader.next_batch()[0])
    assert len(seen) == len(set(seen)) and max(seen) < loaders[0].position <= len(stream)
    state = loaders[0].state_dict()
    with pytest.raises(DataExhausted):  # exhaustion is final and does not move the position
        loaders[0].next_batch()
    assert loaders[0].state_dict() == state


@pytest.mark.parametrize("world_size, resume_world_size", [(1, 1), (2, 2), (4, 2), (2, 1)])
def test_restored_position_continues_exactly(position_shards, tmp_path, world_size, resume_world_size):
    paths, _ = position_shards
    seq_len, steps = 300, 6
    uninterrupted = TokenLoader(paths, seq_len, 0, 1)
    chunks = [uninterrupted.next_batch() for _ in range(steps * world_size)]

    first = [TokenLoader(paths, seq_len, rank, world_size) for rank in range(world_size)]
    split = int(rng.integers(1, steps))
    for _ in range(split):
        for loader in first:
            loader.next_batch()
    torch.save(first[0].state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = [TokenLoader(paths, seq_len, rank, resume_world_size) for rank in range(resume_world_size)]
    for loader in resumed:
        loader.load_state_dict(state)
        assert loader.position == first[0].position
    index = split * world_size
    while index < len(chunks):
        for loader in resumed:
            torch.testing.assert_close(loader.next_batch(), chunks[index], rtol=0, atol=0)
            index += 1


def test_restore_into_other_files_is_refused(position_shards):
    paths, _ = position_shards
    loader = TokenLoader(paths, 100)
    loader.next_batch()
    with pytest.raises(ValueError, match="s_000000.bin"):
        TokenLoader(paths[1:], 100).load_state_dict(loader.state_dict())


def test_missing_data_says_how_to_get_it(tmp_path):
    for make in (lambda: TokenLoader([f"{tmp_path}/none.bin"], 64), lambda: find_shards(f"{tmp_path}/*.bin")):
        with pytest.raises(FileNotFoundError) as error:
            make()
        assert "`python data/cached_finewebedu10B.py 10`" in str(error.value)
        assert "--preset=demo" in str(error.value)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_val_batches_split_fixed_chunks_across_ranks(position_shards, world_size):
    paths, stream = position_shards
    seq_len, num_tokens = 256, 256 * 37
    got = {}
    for rank in range(world_size):
        for offset, x in val_batches(paths, num_tokens, seq_len, rank, world_size):
            assert offset // seq_len % world_size == rank and offset not in got
            got[offset] = x
    assert sorted(got) == list(range(0, num_tokens, seq_len))
    np.testing.assert_array_equal(torch.cat([got[o] for o in sorted(got)]).numpy(), stream[:num_tokens])
    with pytest.raises(ValueError, match="multiple of seq_len"):
        val_batches(paths, num_tokens + 1, seq_len)
    assert sum(len(x) for _, x in val_batches(paths, None, seq_len)) == len(stream) // seq_len * seq_len


def test_unigram_baseline_matches_direct_computation(tmp_path):
    train, val = rng.integers(0, 300, size=5000), rng.integers(0, 400, size=700)
    write_shard(tmp_path / "train.bin", train)
    write_shard(tmp_path / "val.bin", val)
    counts = np.bincount(train, minlength=50257)
    expected = -np.mean([np.log((counts[t] + 1) / (len(train) + 50257)) for t in val])
    baseline = unigram_baseline([str(tmp_path / "train.bin")], str(tmp_path / "val.bin"))
    assert baseline == pytest.approx(expected)
