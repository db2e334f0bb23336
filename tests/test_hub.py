"""Verified model downloads (bitnet_ref.hub, `bitnet-xval download-model`), with the real huggingface_hub
client talking to a local stand-in for the hub (tests/hubserver.py) on 127.0.0.1.

How the client is pointed at the server: bitnet_ref.hub reads HF_ENDPOINT, HF_HUB_OFFLINE and the cache
variables when it is called and passes them to huggingface_hub explicitly (endpoint=, cache_dir=,
local_files_only=), so setting the environment per test is what drives it, whatever huggingface_hub froze
into `huggingface_hub.constants` when it was imported. The constants are patched as well, only as a
guard: a few client code paths read them directly (the agent-harness lookup hits constants.ENDPOINT, the
request hook refuses the network when constants.HF_HUB_OFFLINE is set). In-process (not a subprocess) so
that the client's one-second retry sleeps can be patched out and the tests stay fast; and a socket guard
makes any connection outside 127.0.0.1 fail the test.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import HubServer, RepoFile

from bitnet_ref import hub
from bitnet_ref.errors import ERROR, WARNING, Finding, ModelError
from bitnet_ref.hub import LockEntry, ModelLock

REPO = "test-org/tiny-bitnet"


# -------------------------------------------------------------------------------------------------
# fixtures


def make_gguf(path: Path, seed: int = 0) -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint32("llama.context_length", 64)
    w.add_uint32("llama.embedding_length", 8)
    w.add_string("general.name", f"tiny-{seed}")
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8) + seed)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> tuple[bytes, bytes]:
    d = tmp_path_factory.mktemp("gguf")
    return make_gguf(d / "a.gguf", 0), make_gguf(d / "b.gguf", 1)


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Any connection (or name lookup) outside the loopback interface fails the test."""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to reach {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            raise AssertionError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def server():
    with HubServer() as s:
        yield s


@pytest.fixture
def client_sleeps(monkeypatch):
    """The client sleeps 1 s before resuming an interrupted body and backs off on failed metadata
    requests: record those sleeps instead of waiting."""
    sleeps = Sleeps()
    monkeypatch.setattr(time, "sleep", sleeps)
    return sleeps


@pytest.fixture
def env(tmp_path, monkeypatch, server, client_sleeps):
    """A clean per-test environment pointing at the local hub; returns the hub cache directory."""
    from huggingface_hub import constants

    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "BITNET_MODELS_DIR",
        "BITNET_GGUF",
        "HF_TOKEN",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "hf" / "hub"


def dl(tmp_path: Path, repo: str = REPO, **kwargs):
    kwargs.setdefault("lock_path", tmp_path / "models.lock")
    kwargs.setdefault("sleep", Sleeps())
    kwargs.setdefault("backoff_s", 0.01)
    return hub.download(repo, **kwargs)


def stored_files(cache: Path) -> list[Path]:
    """Files a later run could find: snapshot entries that resolve, and blobs (complete or not)."""
    out = []
    for sub in ("snapshots", "blobs"):
        for d in cache.glob(f"models--*/{sub}"):
            out += [p for p in d.rglob("*") if p.is_file()]
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------------------
# good downloads


def test_good_download_records_lock_and_second_run_verifies(env, server, tmp_path, gguf_bytes):
    data = gguf_bytes[0]
    commit = server.add_commit(REPO, {"model.gguf": data, "README.md": b"# tiny\n"})

    r = dl(tmp_path)
    assert r.path.read_bytes() == data
    assert env in r.path.parents
    assert r.recorded
    assert r.entry == LockEntry(REPO, commit, "model.gguf", len(data), sha256(data))
    assert ModelLock.load(tmp_path / "models.lock").entries == [r.entry]
    assert server.count("GET", kind="cdn") == 1
    assert server.count("GET", "/api/models/") == 1  # --file not given: listed the repo once

    again = dl(tmp_path)
    assert again.path == r.path and again.entry == r.entry and not again.recorded
    assert server.count("GET", kind="cdn") == 1  # verified from disk, not fetched again
    assert server.count("GET", "/api/models/") == 1  # the file name came from the lock


def test_regular_file_is_checked_against_git_blob_etag(env, server, tmp_path):
    server.add_commit(REPO, {"config.json": RepoFile(b'{"a": 1}', lfs=False)})
    r = dl(tmp_path, filename="config.json")
    assert r.path.read_bytes() == b'{"a": 1}'
    server.file(REPO, "config.json").served = b'{"a": 2}'
    with pytest.raises(ModelError) as e:
        dl(tmp_path, filename="config.json", lock_path=None, models_dir=tmp_path / "other")
    assert e.value.code == "download-checksum-mismatch"
    assert "git blob id" in str(e.value)


def test_lock_pins_the_revision(env, server, tmp_path, gguf_bytes):
    old, new = gguf_bytes
    a = server.add_commit(REPO, {"model.gguf": old})
    dl(tmp_path)
    server.add_commit(REPO, {"model.gguf": new})  # main moves on
    r = dl(tmp_path, models_dir=tmp_path / "fresh-machine")
    assert r.path.read_bytes() == old and r.entry.revision == a
    assert server.count("HEAD", f"/resolve/{a}/model.gguf") == 1


def test_lock_conflict(env, server, tmp_path, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    first = dl(tmp_path)
    b = server.add_commit(REPO, {"model.gguf": gguf_bytes[1]})
    before = len(server.requests)
    with pytest.raises(ModelError) as e:
        dl(tmp_path, filename="model.gguf", revision=b)  # a commit sha: refused before any request
    assert e.value.code == "download-lock-conflict" and first.entry.revision in str(e.value)
    assert len(server.requests) == before
    with pytest.raises(ModelError) as e:
        dl(tmp_path, revision="main")  # a branch that moved: refused once resolved
    assert e.value.code == "download-lock-conflict" and b in str(e.value)
    assert ModelLock.load(tmp_path / "models.lock").entries == [first.entry]


def test_picks_the_only_gguf_and_refuses_to_guess(env, server, tmp_path, gguf_bytes):
    server.add_commit("o/one", {"a.gguf": gguf_bytes[0], "README.md": b"x"})
    assert dl(tmp_path, "o/one").entry.file == "a.gguf"
    server.add_commit("o/two", {"a.gguf": gguf_bytes[0], "b.gguf": gguf_bytes[1]})
    with pytest.raises(ModelError) as e:
        dl(tmp_path, "o/two")
    assert e.value.code == "download-ambiguous-file"
    assert "a.gguf" in str(e.value) and "b.gguf" in str(e.value)
    assert dl(tmp_path, "o/two", filename="b.gguf").path.read_bytes() == gguf_bytes[1]
    server.add_commit("o/none", {"README.md": b"x"})
    with pytest.raises(ModelError) as e:
        dl(tmp_path, "o/none")
    assert e.value.code == "download-no-gguf"


# -------------------------------------------------------------------------------------------------
# checksum mismatches


def test_checksum_mismatch_against_lock_leaves_nothing_trusted(env, server, tmp_path, gguf_bytes):
    good, bad = gguf_bytes
    server.add_commit(REPO, {"model.gguf": good})
    locked = dl(tmp_path).entry
    lock_text = (tmp_path / "models.lock").read_text()

    # Another machine, same lock; the hub now serves other bytes for the locked commit (self-consistent
    # headers, so only the lock can tell).
    server.file(REPO, "model.gguf").data = bad
    other = tmp_path / "machine2"
    for _attempt in range(2):  # a rerun fails the same way rather than trusting anything cached
        with pytest.raises(ModelError) as e:
            dl(tmp_path, models_dir=other)
        assert e.value.code == "download-checksum-mismatch"
        assert locked.sha256 in str(e.value) and sha256(bad) in str(e.value)
        assert stored_files(other) == []
    assert server.count("GET", kind="cdn") == 1 + 2 * 2  # each failing run fetched twice, then gave up
    assert (tmp_path / "models.lock").read_text() == lock_text


def test_corrupting_cdn_is_caught_without_a_lock(env, server, tmp_path, gguf_bytes):
    good, bad = gguf_bytes
    server.add_commit(REPO, {"model.gguf": RepoFile(good, served=bad[: len(good)].ljust(len(good), b"\0"))})
    with pytest.raises(ModelError) as e:
        dl(tmp_path)
    assert e.value.code == "download-checksum-mismatch"
    assert "ETag" in str(e.value) and sha256(good) in str(e.value)
    assert stored_files(env) == []
    assert not (tmp_path / "models.lock").exists()


def test_corrupted_cache_file_is_replaced(env, server, tmp_path, gguf_bytes):
    good = gguf_bytes[0]
    server.add_commit(REPO, {"model.gguf": good})
    path = dl(tmp_path).path
    blob = path.resolve()
    blob.write_bytes(b"\xff" * len(good))  # bit rot on disk, same size
    r = dl(tmp_path)
    assert r.path.read_bytes() == good
    assert server.count("GET", kind="cdn") == 2


def test_size_mismatch_against_lock(env, server, tmp_path, gguf_bytes):
    good = gguf_bytes[0]
    server.add_commit(REPO, {"model.gguf": good})
    entry = dl(tmp_path).entry
    lock = ModelLock.load(tmp_path / "models.lock")
    lock.put(LockEntry(entry.repo, entry.revision, entry.file, entry.size + 1, entry.sha256))
    lock.save()
    with pytest.raises(ModelError) as e:
        dl(tmp_path)
    assert e.value.code == "download-size-mismatch"
    assert stored_files(env) == []


# -------------------------------------------------------------------------------------------------
# interrupted transfers, network failures


def test_interrupted_transfer_is_resumed(env, server, tmp_path, monkeypatch, gguf_bytes):
    from huggingface_hub import constants

    # The client only writes what its reader yields, in DOWNLOAD_CHUNK_SIZE (10 MB) pieces: below that, a
    # dropped body is restarted from zero. Small chunks make it resume from where the body broke off.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)
    data = gguf_bytes[0]
    server.add_commit(REPO, {"model.gguf": RepoFile(data, cut_after=100, cut_times=1)})
    r = dl(tmp_path)
    assert r.path.read_bytes() == data and r.entry.sha256 == sha256(data)
    ranges = [h.get("Range") for k, m, _, h in server.requests if k == "cdn" and m == "GET"]
    assert ranges == [None, "bytes=64-"]


def test_interrupted_small_transfer_restarts(env, server, tmp_path, gguf_bytes):
    data = gguf_bytes[0]
    server.add_commit(REPO, {"model.gguf": RepoFile(data, cut_after=100, cut_times=2)})
    r = dl(tmp_path)
    assert r.path.read_bytes() == data
    assert server.count("GET", kind="cdn") == 3


def test_interrupted_transfer_that_always_fails(env, server, tmp_path, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": RepoFile(gguf_bytes[0], cut_after=0, cut_times=None)})
    sleeps = Sleeps()
    with pytest.raises(ModelError) as e:
        dl(tmp_path, retries=2, backoff_s=0.5, sleep=sleeps)
    assert e.value.code == "download-failed"
    assert "3 attempts" in str(e.value)
    assert sleeps == [0.5, 1.0]
    assert stored_files(env) == []  # no partial blob, no .incomplete file
    assert not (tmp_path / "models.lock").exists()


def test_cdn_error_is_retried_with_backoff(env, server, tmp_path, gguf_bytes):
    # The client does not retry a 5xx on the body request itself; bitnet_ref.hub does.
    server.add_commit(REPO, {"model.gguf": RepoFile(gguf_bytes[0], fail_status=503, fail_times=2)})
    sleeps = Sleeps()
    r = dl(tmp_path, backoff_s=0.25, sleep=sleeps)
    assert r.path.read_bytes() == gguf_bytes[0]
    assert sleeps == [0.25, 0.5]
    assert server.count("GET", kind="cdn") == 3


def test_unreachable_hub_is_reported(env, server, tmp_path, monkeypatch, client_sleeps):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    sleeps = Sleeps()
    with pytest.raises(ModelError) as e:
        dl(tmp_path, filename="model.gguf", retries=3, sleep=sleeps)
    assert e.value.code == "download-failed"
    assert f"127.0.0.1:{port}" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    # The client backed off on its own metadata request; retrying it again on top would multiply the wait.
    assert len(client_sleeps) >= 1 and sleeps == []


# -------------------------------------------------------------------------------------------------
# not found


def test_missing_file(env, server, tmp_path, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    with pytest.raises(ModelError) as e:
        dl(tmp_path, filename="nope.gguf")
    assert e.value.code == "download-file-not-found"
    assert REPO in str(e.value) and "nope.gguf" in str(e.value)
    assert stored_files(env) == []


@pytest.mark.parametrize(
    "repo, revision, code",
    [
        ("test-org/absent", None, "download-repo-not-found"),
        (REPO, "no-such-branch", "download-revision-not-found"),
    ],
)
def test_missing_repo_or_revision(env, server, tmp_path, gguf_bytes, repo, revision, code):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    with pytest.raises(ModelError) as e:
        dl(tmp_path, repo, filename="model.gguf", revision=revision)
    assert e.value.code == code


# -------------------------------------------------------------------------------------------------
# offline, directories, default model


def test_offline_uses_only_the_disk(env, server, tmp_path, monkeypatch, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        dl(tmp_path, filename="model.gguf")
    assert e.value.code == "download-offline-missing" and "HF_HUB_OFFLINE" in str(e.value)
    assert server.requests == []

    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = dl(tmp_path, lock_path=None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(server.requests)
    r = dl(tmp_path)  # no --file, no lock entry: found through the cached snapshot of main
    assert r.path == online.path and r.recorded and r.entry.sha256 == sha256(gguf_bytes[0])
    assert dl(tmp_path).path == online.path  # and now through the lock
    assert len(server.requests) == n


def test_offline_does_not_trust_a_corrupted_cache(env, server, tmp_path, monkeypatch, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    path = dl(tmp_path).path
    path.resolve().write_bytes(b"\0" * len(gguf_bytes[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        dl(tmp_path)
    assert e.value.code == "download-checksum-mismatch"
    assert not path.exists()


def test_bitnet_models_dir(env, server, tmp_path, monkeypatch, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    monkeypatch.setenv("BITNET_MODELS_DIR", str(tmp_path / "models"))
    assert hub.models_dir() == tmp_path / "models"
    r = dl(tmp_path)
    assert (tmp_path / "models") in r.path.parents
    assert not env.exists()
    monkeypatch.delenv("BITNET_MODELS_DIR")
    assert hub.models_dir() == env


def test_default_model(env, tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelError) as e:
        hub.default_model()
    assert e.value.code == "model-not-specified"
    assert "--model" in str(e.value) and "BITNET_GGUF" in str(e.value)
    monkeypatch.setenv("BITNET_GGUF", str(f))
    assert hub.default_model() == f
    assert hub.default_model(tmp_path / "x.gguf", must_exist=False) == tmp_path / "x.gguf"
    monkeypatch.setenv("BITNET_GGUF", str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelError) as e:
        hub.default_model()
    assert e.value.code == "model-not-found" and "BITNET_GGUF" in str(e.value)


# -------------------------------------------------------------------------------------------------
# validation


def _fake_validator(monkeypatch, findings):
    mod = types.ModuleType("bitnet_ref.gguf.validate")
    mod.validate_file = lambda path: list(findings)
    monkeypatch.setitem(sys.modules, "bitnet_ref.gguf.validate", mod)


def test_validation_failure_is_not_recorded(env, server, tmp_path, monkeypatch, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    _fake_validator(
        monkeypatch,
        [
            Finding("tensor-misaligned", ERROR, "offset 7", "realign"),
            Finding("odd-key", WARNING, "meh", "ignore"),
        ],
    )
    with pytest.raises(ModelError) as e:
        dl(tmp_path, validate=True)
    assert e.value.code == "download-validation-failed" and "tensor-misaligned" in str(e.value)
    assert not (tmp_path / "models.lock").exists()


def test_validation_warnings_pass(env, server, tmp_path, monkeypatch, gguf_bytes):
    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    _fake_validator(monkeypatch, [Finding("odd-key", WARNING, "meh", "ignore")])
    r = dl(tmp_path, validate=True)
    assert [f.code for f in r.findings] == ["odd-key"] and r.recorded


def test_real_validator_rejects_a_file_that_is_not_gguf(env, server, tmp_path):
    server.add_commit(REPO, {"model.gguf": b"this is not a GGUF file at all" * 4})
    with pytest.raises(ModelError) as e:
        dl(tmp_path, validate=True)
    assert e.value.code == "download-validation-failed"
    assert not (tmp_path / "models.lock").exists()


# -------------------------------------------------------------------------------------------------
# lock file


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=50, deadline=None)
@given(repo=_text, file=_text, revision=_text, size=st.integers(0, 2**62), digest=st.binary(min_size=1))
def test_lock_round_trip(tmp_path_factory, repo, file, revision, size, digest):
    path = tmp_path_factory.mktemp("lock") / "models.lock"
    entries = [LockEntry(repo, revision, file, size, sha256(digest)), LockEntry("b/b", "r", "f", 1, "0" * 64)]
    lock = ModelLock(path, list(entries))
    lock.save()
    assert sorted(ModelLock.load(path).entries, key=repr) == sorted(entries, key=repr)


@pytest.mark.parametrize(
    "text",
    [
        "[[model]\n",
        "version = 9\n",
        '[[model]]\nrepo = "a"\nrevision = "r"\nfile = "f"\nsize = 1\nsha256 = "xyz"\n',
        '[[model]]\nrepo = "a"\nfile = "f"\nsize = 1\nsha256 = "' + "0" * 64 + '"\n',
    ],
)
def test_invalid_lock_is_an_error(tmp_path, text):
    (tmp_path / "models.lock").write_text(text)
    with pytest.raises(ModelError) as e:
        ModelLock.load(tmp_path / "models.lock")
    assert e.value.code == "lock-invalid"


# -------------------------------------------------------------------------------------------------
# command line


def cli(*argv: str) -> int:
    from harness.commands import download_model

    parser = argparse.ArgumentParser(prog="bitnet-xval")
    download_model.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["download-model", *argv])
    return args.func(args)


def test_cli(env, server, tmp_path, capsys, gguf_bytes):
    good, bad = gguf_bytes
    server.add_commit(REPO, {"model.gguf": good})
    assert cli("--id", REPO, "--lock", str(tmp_path / "l.lock")) == 0
    out = capsys.readouterr().out.splitlines()
    assert Path(out[0]).read_bytes() == good
    assert f'sha256 = "{sha256(good)}"' in out

    server.file(REPO, "model.gguf").data = bad
    assert cli("--id", REPO, "--lock", str(tmp_path / "l.lock"), "--models-dir", str(tmp_path / "m2")) == 1
    err = capsys.readouterr().err
    assert "download-checksum-mismatch" in err and "Traceback" not in err and err.count("\n") == 1

    assert cli("--id", REPO, "--file", "missing.gguf") == 2
    err = capsys.readouterr().err
    assert "download-file-not-found" in err and "missing.gguf" in err


def test_a_lock_case_downloads_its_model_verified(env, server, tmp_path, gguf_bytes):
    """The ladder's `lock` model branch (harness.crossval.model_path_for): the case's `repo:file` is fetched
    through the hub client and recorded in models.lock (cwd is tmp_path here), then verified against it."""
    from harness.cases import Case
    from harness.crossval import model_path_for

    server.add_commit(REPO, {"model.gguf": gguf_bytes[0]})
    case = Case(id="locked", file="(test)", model={"lock": f"{REPO}:model.gguf"}, references=["llama_cpp"],
                prompts=["hi"])
    path = model_path_for(case, tmp_path / "models")
    assert path.read_bytes() == gguf_bytes[0]
    lock = ModelLock.load(tmp_path / "models.lock")
    (entry,) = lock.entries
    assert (entry.repo, entry.file, entry.sha256) == (REPO, "model.gguf", sha256(gguf_bytes[0]))
    assert model_path_for(case, tmp_path / "models") == path  # found again, checked against the lock
