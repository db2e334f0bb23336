"""Model download through `huggingface_hub`, verified against a lock file.

`download_model("org/repo")` fetches one GGUF file with the hub's own client (`hf_hub_download`) into a
hub-layout cache (BITNET_MODELS_DIR if set, else the huggingface_hub cache) and checks it:

* against `models.lock` when the lock has an entry for (repo, file): the locked commit is what gets
  downloaded, and size and sha256 must match;
* otherwise against the hub's own claim (the ETag of an LFS file is its sha256; of a regular file, its git
  blob id), and then a new entry is recorded, with the revision resolved to a full commit sha.

A file that fails the check is deleted from the cache (the snapshot link and its blob), so that nothing a
later run could pick up is left behind; it is downloaded once more, and if that copy fails too the
download is an error (ModelError "download-checksum-mismatch" or "download-size-mismatch").

Transient network errors are retried with exponential backoff (on top of the client's own resume of an
interrupted body). HF_HUB_OFFLINE=1 restricts everything to what is already on disk. HF_ENDPOINT, the
cache variables and HF_HUB_OFFLINE are read when a function is called, not when a module is imported, and
passed to the client explicitly (huggingface_hub itself freezes them into `huggingface_hub.constants` at
import time).

The lock file is TOML, one `[[model]]` table per file:

    [[model]]
    repo = "microsoft/bitnet-b1.58-2B-4T-gguf"
    revision = "<40-hex commit>"
    file = "ggml-model-i2_s.gguf"
    size = 1187801280
    sha256 = "<64-hex>"
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_text
from .errors import ERROR, Finding, ModelError, model_error

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_LOCK = "models.lock"
LOCK_VERSION = 1
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0

# Codes that mean "the bytes are not what they must be" (the CLI exits 1 on these, 2 on anything else).
VERIFICATION_CODES = frozenset(
    {
        "download-checksum-mismatch",
        "download-size-mismatch",
        "download-lock-conflict",
        "download-validation-failed",
    }
)

_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------------------------------------
# Lock file


@dataclass(frozen=True)
class LockEntry:
    repo: str
    revision: str  # a full commit sha when known
    file: str
    size: int
    sha256: str

    def to_toml(self) -> str:
        return (
            "[[model]]\n"
            f"repo = {_toml_str(self.repo)}\n"
            f"revision = {_toml_str(self.revision)}\n"
            f"file = {_toml_str(self.file)}\n"
            f"size = {int(self.size)}\n"
            f"sha256 = {_toml_str(self.sha256)}\n"
        )


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    """A TOML basic string. (Not json.dumps: JSON writes astral characters as surrogate pairs, which TOML
    rejects, and leaves U+007F raw, which TOML forbids.)"""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_LOCK_HEADER = (
    "# Models fetched by `bitnet-xval download-model`, with the size and sha256 each must have.\n"
    "# Every download is checked against this file. To accept a new revision, delete its entry.\n"
)


@dataclass
class ModelLock:
    path: Path
    entries: list[LockEntry] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelLock:
        """Read a lock file; a missing file is an empty lock."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        if tomllib is None:  # pragma: no cover - Python 3.10 without tomllib
            raise model_error(
                "lock-unreadable", "reading models.lock needs Python 3.11 (tomllib)", "use Python >= 3.11"
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise model_error(
                "lock-invalid",
                f"{path} is not valid TOML: {e}",
                "fix or delete the lock file",
                path=str(path),
            ) from e
        version = data.get("version", LOCK_VERSION)
        if version != LOCK_VERSION:
            raise model_error(
                "lock-invalid",
                f"{path} has lock version {version!r}; this tool reads version {LOCK_VERSION}",
                "upgrade bitnet-crossval, or delete the lock file to start a new one",
                path=str(path),
            )
        tables = data.get("model", [])
        if not isinstance(tables, list):
            raise model_error(
                "lock-invalid",
                f"{path}: 'model' must be an array of tables ([[model]])",
                "fix or delete the lock file",
                path=str(path),
            )
        entries = [_entry_from_table(t, path, i) for i, t in enumerate(tables)]
        return cls(path, entries)

    def find(self, repo: str, file: str) -> LockEntry | None:
        for e in self.entries:
            if e.repo == repo and e.file == file:
                return e
        return None

    def for_repo(self, repo: str) -> list[LockEntry]:
        return [e for e in self.entries if e.repo == repo]

    def put(self, entry: LockEntry) -> None:
        """Add `entry`, replacing any entry for the same (repo, file)."""
        self.entries = [e for e in self.entries if (e.repo, e.file) != (entry.repo, entry.file)]
        self.entries.append(entry)

    def dumps(self) -> str:
        body = "\n".join(e.to_toml() for e in sorted(self.entries, key=lambda e: (e.repo, e.file)))
        return f"{_LOCK_HEADER}version = {LOCK_VERSION}\n" + ("\n" + body if body else "")

    def save(self) -> None:
        """Write atomically (bitnet_ref.atomic)."""
        atomic_write_text(self.path, self.dumps())


def _entry_from_table(t: object, path: Path, i: int) -> LockEntry:
    def bad(what: str) -> ModelError:
        return model_error(
            "lock-invalid",
            f"{path}: [[model]] #{i + 1}: {what}",
            "fix or delete this entry in the lock file",
            path=str(path),
        )

    if not isinstance(t, dict):
        raise bad("not a table")
    for key in ("repo", "revision", "file", "sha256"):
        if not isinstance(t.get(key), str) or not t[key]:
            raise bad(f"{key!r} must be a non-empty string")
    size = t.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad("'size' must be a non-negative integer")
    if not _SHA256.fullmatch(t["sha256"]):
        raise bad(f"'sha256' must be 64 lowercase hex digits, not {t['sha256']!r}")
    return LockEntry(repo=t["repo"], revision=t["revision"], file=t["file"], size=size, sha256=t["sha256"])


# ------------------------------------------------------------------------------------------------
# Environment


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE, read now (also true when the hub client froze offline mode at import)."""
    if _env_true("HF_HUB_OFFLINE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str | None:
    """HF_ENDPOINT, read now; None means the client's default (https://huggingface.co)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def hub_cache_dir() -> Path:
    """The huggingface_hub cache, resolved from the environment now, with the client's precedence."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def models_dir() -> Path:
    """Where models are kept (in the hub cache layout): BITNET_MODELS_DIR, else the hub cache."""
    value = os.environ.get("BITNET_MODELS_DIR", "").strip()
    if value:
        return Path(os.path.expandvars(value)).expanduser()
    return hub_cache_dir()


def default_model(explicit: str | os.PathLike | None = None, *, must_exist: bool = True) -> Path:
    """The model a command should use: `explicit` (its --model), else BITNET_GGUF, else an error."""
    if explicit:
        source, path = "--model", Path(explicit)
    elif os.environ.get("BITNET_GGUF", "").strip():
        source, path = "BITNET_GGUF", Path(os.environ["BITNET_GGUF"].strip())
    else:
        raise model_error(
            "model-not-specified",
            "no model given",
            "pass --model PATH, or set BITNET_GGUF=PATH (for instance the path `bitnet-xval download-model` "
            "prints)",
        )
    path = path.expanduser()
    if must_exist and not path.is_file():
        raise model_error(
            "model-not-found",
            f"{source} names {path}, which is not a file",
            "fix the path, or download the model with `bitnet-xval download-model --id REPO`",
            path=str(path),
        )
    return path


# ------------------------------------------------------------------------------------------------
# Download


@dataclass
class DownloadResult:
    path: Path  # the verified file (a snapshot path in the hub cache layout)
    entry: LockEntry  # what the file is: checked against the lock, or newly recorded in it
    recorded: bool  # True when `entry` was new and has been written to the lock
    lock_path: Path | None
    findings: list[Finding] = field(default_factory=list)  # from validation, when asked for


def download_model(
    repo_id: str,
    filename: str | None = None,
    revision: str | None = None,
    models_dir: str | os.PathLike | None = None,
    lock_path: str | os.PathLike | None = DEFAULT_LOCK,
    validate: bool = False,
    **kwargs,
) -> Path:
    """Download (or find in the cache) one file of a hub repo, verify it, return its path.

    See `download` for the arguments; this returns only the path.
    """
    return download(repo_id, filename, revision, models_dir, lock_path, validate, **kwargs).path


def download(
    repo_id: str,
    filename: str | None = None,
    revision: str | None = None,
    models_dir: str | os.PathLike | None = None,
    lock_path: str | os.PathLike | None = DEFAULT_LOCK,
    validate: bool = False,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> DownloadResult:
    """Download one file of `repo_id`, verify it, record or check its lock entry.

    filename: the file in the repo; None picks the repo's only .gguf file (from the lock's entries for this
        repo when there is exactly one, else from the hub's file list or, offline, the cached snapshot).
    revision: branch, tag or commit; None means the locked commit when the lock has an entry, else "main".
    models_dir: the cache directory (hub layout); None means `models_dir()`.
    lock_path: the lock file (created when missing); None disables the lock (the hub's checksum is still
        checked).
    validate: run the GGUF validator on the file and fail on error findings (before anything is recorded).
    retries, backoff_s, sleep: transient network errors are retried `retries` times, waiting
        backoff_s * 2**attempt (at most MAX_BACKOFF_S) through `sleep`.
    """
    retry = _Retry(retries, backoff_s, sleep)
    offline = is_offline()
    endpoint = hub_endpoint()
    cache = Path(models_dir).expanduser() if models_dir is not None else _default_models_dir()
    lock = ModelLock.load(lock_path) if lock_path is not None else None

    if filename is None:
        filename = _pick_file(repo_id, revision, lock, cache, endpoint, offline, retry)
    entry = lock.find(repo_id, filename) if lock is not None else None
    if (
        entry is not None
        and revision is not None
        and _SHA1.fullmatch(revision)
        and revision != entry.revision
    ):
        raise _lock_conflict(repo_id, filename, revision, entry, lock)
    fetch_rev = revision or (entry.revision if entry is not None else "main")
    where = f"{repo_id}/{filename}@{fetch_rev}"

    path = _fetch(repo_id, filename, fetch_rev, cache, endpoint, offline, retry)
    commit = _commit_of(cache, repo_id, path)
    if entry is not None and commit is not None and commit != entry.revision:
        raise _lock_conflict(repo_id, filename, f"{fetch_rev} ({commit})", entry, lock)

    try:
        size, sha = _verify(path, entry, where, lock)
    except ModelError as first:
        _discard(path)
        if offline:
            raise
        log.warning("%s; deleted it, downloading it once more", first.finding.message)
        path = _fetch(repo_id, filename, fetch_rev, cache, endpoint, offline, retry)
        try:
            size, sha = _verify(path, entry, where, lock)
        except ModelError:
            _discard(path)
            raise

    findings: list[Finding] = []
    if validate:
        findings = _validate(path)

    recorded = False
    if entry is None:
        entry = LockEntry(repo=repo_id, revision=commit or fetch_rev, file=filename, size=size, sha256=sha)
        if lock is not None:
            # Re-read just before writing, to keep entries another process recorded meanwhile.
            fresh = ModelLock.load(lock.path)
            fresh.put(entry)
            fresh.save()
            recorded = True
    return DownloadResult(
        path=path,
        entry=entry,
        recorded=recorded,
        lock_path=lock.path if lock is not None else None,
        findings=findings,
    )


def _default_models_dir() -> Path:
    return models_dir()


# -- retries ----------------------------------------------------------------------------------------


@dataclass
class _Retry:
    retries: int
    backoff_s: float
    sleep: Callable[[float], None]

    def __call__(self, what: str, fn: Callable[[], object]):
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                if not _is_transient(e):
                    raise
                if attempt >= self.retries:
                    raise model_error(
                        "download-failed",
                        f"{what} failed after {attempt + 1} attempts: {_describe(e)}",
                        "check the network and HF_ENDPOINT, then run again (partial downloads are discarded, "
                        "nothing unverified is kept); set HF_HUB_OFFLINE=1 to use only files already on disk",
                    ) from e
                delay = min(self.backoff_s * (2**attempt), MAX_BACKOFF_S)
                log.warning("%s: %s; retrying in %.1fs", what, _describe(e), delay)
                self.sleep(delay)
                attempt += 1


def _transport_errors() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    for mod, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        types.extend(getattr(m, n) for n in names if isinstance(getattr(m, n, None), type))
    return tuple(types)


def _is_transient(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False
    if isinstance(e, _transport_errors()):
        return True
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is not None and (status in (408, 429) or status >= 500)
    if isinstance(e, LocalEntryNotFoundError):
        # The metadata request failed and nothing is cached. The client has already retried that request
        # with its own backoff (about 23 s): retrying it again here would multiply the wait.
        return False
    # A short body that the client's own size check caught.
    return isinstance(e, OSError) and "Consistency check failed" in str(e)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- hub calls ----------------------------------------------------------------------------------------


def _hub_errors(repo_id: str, filename: str | None, revision: str, cache: Path, offline: bool, e: Exception):
    """Turn a huggingface_hub exception into a ModelError (None when it is not one we know)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id}/{filename}" if filename else repo_id
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and offline:
        return model_error(
            "download-offline-missing",
            f"HF_HUB_OFFLINE is set and {what} at revision {revision!r} is not on disk in {cache}",
            "unset HF_HUB_OFFLINE to download it, or point BITNET_MODELS_DIR (or HF_HUB_CACHE) at the "
            "directory that holds it",
        )
    if isinstance(e, LocalEntryNotFoundError):
        cause = e.__cause__ or e.__context__
        return model_error(
            "download-failed",
            f"could not reach the hub ({hub_endpoint() or 'https://huggingface.co'}) for {what} at revision "
            f"{revision!r}, and it is not on disk in {cache}"
            + (f": {_describe(cause)}" if cause is not None else ""),
            "check the network, a proxy, and HF_ENDPOINT; or set HF_HUB_OFFLINE=1 and BITNET_MODELS_DIR to use "
            "a copy already on disk",
        )
    if isinstance(e, RemoteEntryNotFoundError):
        return model_error(
            "download-file-not-found",
            f"file {filename!r} not found in {repo_id} at revision {revision!r}",
            "check --file (the repo's files are listed on its page on the hub)",
        )
    if isinstance(e, RevisionNotFoundError):
        return model_error(
            "download-revision-not-found",
            f"revision {revision!r} not found in {repo_id}",
            "check --revision (a branch, tag or full commit sha)",
        )
    if isinstance(e, (RepositoryNotFoundError, GatedRepoError)):
        return model_error(
            "download-repo-not-found",
            f"repository {repo_id!r} not found (or not accessible: private or gated)",
            "check --id; for a private or gated repo log in (`hf auth login`) or set HF_TOKEN",
        )
    return None


def _call_hub(what: str, fn, repo_id, filename, revision, cache, offline, retry: _Retry):
    try:
        return retry(what, fn)
    except ModelError:
        raise
    except Exception as e:
        mapped = _hub_errors(repo_id, filename, revision, cache, offline, e)
        if mapped is not None:
            raise mapped from e
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(e, (HfHubHTTPError, OSError, ValueError)):
            raise model_error(
                "download-failed",
                f"{what} failed: {_describe(e)}",
                "check --id, --revision, --file and HF_ENDPOINT; run again",
            ) from e
        raise


def _fetch(repo_id, filename, revision, cache: Path, endpoint, offline, retry: _Retry) -> Path:
    from huggingface_hub import hf_hub_download

    def call():
        return hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=str(cache),
            endpoint=endpoint,
            local_files_only=offline,
        )

    what = f"downloading {repo_id}/{filename}@{revision}"
    return Path(_call_hub(what, call, repo_id, filename, revision, cache, offline, retry))


def _pick_file(repo_id, revision, lock, cache: Path, endpoint, offline, retry: _Retry) -> str:
    if lock is not None and revision is None:
        locked = sorted(e.file for e in lock.for_repo(repo_id) if e.file.lower().endswith(".gguf"))
        if len(locked) == 1:
            return locked[0]
        if len(locked) > 1:
            raise _ambiguous(repo_id, locked, f"{lock.path} has entries for")
    if offline:
        names = _cached_files(cache, repo_id, revision or "main")
        if names is None:
            raise model_error(
                "download-offline-missing",
                f"HF_HUB_OFFLINE is set and no snapshot of {repo_id} at revision {revision or 'main'!r} is on "
                f"disk in {cache}",
                "pass --file and make sure the model is in the cache, or unset HF_HUB_OFFLINE",
            )
    else:
        from huggingface_hub import HfApi

        def call():
            return HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)

        info = _call_hub(
            f"listing the files of {repo_id}", call, repo_id, None, revision or "main", cache, offline, retry
        )
        names = [s.rfilename for s in (info.siblings or [])]
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if not ggufs:
        raise model_error(
            "download-no-gguf",
            f"{repo_id} has no .gguf file at revision {revision or 'main'!r}",
            "pass --file to name the file to download",
        )
    if len(ggufs) > 1:
        raise _ambiguous(repo_id, ggufs, "several .gguf files in")
    return ggufs[0]


def _ambiguous(repo_id: str, names: Iterable[str], how: str) -> ModelError:
    listing = ", ".join(names)
    return model_error(
        "download-ambiguous-file",
        f"{how} {repo_id}: {listing}",
        "pass --file to choose one",
    )


def _lock_conflict(repo_id, filename, requested, entry: LockEntry, lock) -> ModelError:
    return model_error(
        "download-lock-conflict",
        f"{repo_id}/{filename}: revision {requested} is not the locked revision {entry.revision}",
        f"drop --revision to use the locked one, or delete the entry from {lock.path} to accept the new one",
        path=str(lock.path),
    )


# -- cache layout ---------------------------------------------------------------------------------------


def _storage_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _commit_of(cache: Path, repo_id: str, path: Path) -> str | None:
    """The commit sha of a snapshot path (`<cache>/models--org--name/snapshots/<sha>/<file>`)."""
    snapshots = Path(os.path.abspath(_storage_folder(cache, repo_id) / "snapshots"))
    try:
        rel = Path(os.path.abspath(path)).relative_to(snapshots)
    except ValueError:
        return None
    commit = rel.parts[0] if rel.parts else ""
    return commit if _SHA1.fullmatch(commit) else None


def _cached_files(cache: Path, repo_id: str, revision: str) -> list[str] | None:
    storage = _storage_folder(cache, repo_id)
    commit = revision
    if not _SHA1.fullmatch(revision):
        ref = storage / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = storage / "snapshots" / commit
    if not snap.is_dir():
        return None
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def _discard(path: Path) -> None:
    """Delete a snapshot entry and the blob it links to, so that no later run can pick the file up."""
    path = Path(path)
    blob = Path(os.path.realpath(path)) if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if blob is not None and blob != path:
        blob.unlink(missing_ok=True)
    log.warning("deleted %s%s", path, f" and {blob}" if blob is not None else "")


def _hub_etag(path: Path) -> str | None:
    """The hub's ETag for a cached file: the name of the blob its snapshot entry links to."""
    if not Path(path).is_symlink():
        return None
    return Path(os.path.realpath(path)).name


# -- verification ----------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike, *, git_blob: bool = False) -> tuple[int, str]:
    """(size, sha256) of a file; with git_blob, (size, git blob sha1)."""
    size = os.path.getsize(path)
    h = hashlib.sha1(b"blob %d\0" % size) if git_blob else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return size, h.hexdigest()


def _verify(path: Path, entry: LockEntry | None, where: str, lock) -> tuple[int, str]:
    size, sha = file_digest(path)
    hint = (
        "the file has been deleted from the cache. If the repo was legitimately rewritten, delete its entry "
        "from the lock file (or pin --revision) and download again; otherwise the mirror, the network or the "
        "disk is corrupting data"
    )
    if entry is not None:
        if size != entry.size:
            raise model_error(
                "download-size-mismatch",
                f"{where}: {size} bytes, but {lock.path} says {entry.size}",
                hint,
                path=str(path),
            )
        if sha != entry.sha256:
            raise model_error(
                "download-checksum-mismatch",
                f"{where}: sha256 {sha}, but {lock.path} says {entry.sha256}",
                hint,
                path=str(path),
            )
        return size, sha
    etag = _hub_etag(path)
    if etag is not None and _SHA256.fullmatch(etag) and etag != sha:
        raise model_error(
            "download-checksum-mismatch",
            f"{where}: sha256 {sha}, but the hub's ETag says {etag}",
            hint,
            path=str(path),
        )
    if etag is not None and _SHA1.fullmatch(etag):
        _, oid = file_digest(path, git_blob=True)
        if oid != etag:
            raise model_error(
                "download-checksum-mismatch",
                f"{where}: git blob id {oid}, but the hub's ETag says {etag}",
                hint,
                path=str(path),
            )
    return size, sha


def _validate(path: Path) -> list[Finding]:
    from .gguf.validate import validate_file  # lazy: the validator pulls in the GGUF reader

    try:
        findings = list(validate_file(path))
    except ModelError as e:
        findings = [e.finding]
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        shown = "; ".join(str(f) for f in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ModelError(
            Finding(
                code="download-validation-failed",
                severity=ERROR,
                message=f"{len(errors)} error finding(s): {shown}{more}",
                hint="the file matches what the hub serves, but is not a valid model for bitnet_ref; it was "
                "not recorded in the lock. Check that --file names the right file",
                path=str(path),
            )
        )
    return findings
