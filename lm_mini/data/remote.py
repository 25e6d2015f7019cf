"""Where shard sets live and how their bytes are fetched: local paths, ``http(s)://`` and other fsspec URLs
(``s3://``, ``gs://``, ``az://``, ...) and WebDataset ``pipe:`` commands.

- Opening: local files and ``pipe:`` commands through WebDataset's ``gopen``; every other URL through
  fsspec (``http(s)`` streamed in one GET; object stores by their fsspec implementation, e.g. s3fs).
  WebDataset's own ``http`` handler runs ``curl --retry 30``, whose hidden retries would make
  ``data.remote.retries`` meaningless, so HTTP goes through fsspec too.
- Failures: :func:`retrying` retries a fetch a bounded number of times with exponential backoff and
  jitter; errors a retry cannot cure (not found, no credentials, unknown protocol) fail at once. The
  streaming reader (``shards.read_shard``) retries shards mid-read itself, re-reading from where it was.
- :class:`ShardCache`: whole shards downloaded once into a local folder and read from there in later
  epochs, least recently used first out (WebDataset's ``LRUCleanup``) to stay under a size bound.
- :func:`upload` copies a built shard set to a URL (``lm-mini shards build --out s3://...``).

Credentials never pass through lm_mini: each store reads its usual environment (``AWS_*`` variables,
profiles and ``AWS_ENDPOINT_URL`` for S3 and S3-compatible stores, ``~/.netrc`` for HTTP,
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS). A URL that carries a password or a signature is refused by
the config (it would be written to ``config.yaml`` and MLflow); messages show URLs :func:`redact`-ed.

Light at import (no torch, no webdataset): ``lm_mini.config`` checks shard set paths with it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
# Query parameters that carry a credential (S3/GCS presigned URLs, Azure SAS, API keys, tokens).
_SECRET_PARAM = re.compile(r"(?i)signature|sig$|token|secret|passw|credential|^key$|api[-_]?key|auth")
# What gives a credential to the command of a pipe: URL (curl -H 'Authorization: ...', --password, ...).
_SECRET_IN_COMMAND = re.compile(r"(?i)authorization\s*:|x-api-key\s*:|bearer\s|--password|--pass\b|--token|"
                                r"aws_secret_access_key|aws_session_token")
MAX_BACKOFF_S = 60.0  # one wait between tries never exceeds this, however many tries


# ------------------------------------------------------------------------------------- URLs
def scheme(path: str) -> str:
    """``''`` for a local path, ``'pipe'`` for a ``pipe:`` command, else the URL's scheme (``'s3'``, ``'file'``)."""
    path = str(path)
    if path.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(path)
    return m.group(1).lower() if m else ""


def is_remote(path: Any) -> bool:
    """Anything but a local path or a ``file://`` URL."""
    return scheme(str(path)) not in ("", "file")


def local_path(path: Any) -> str:
    """A local path as given, or the path of a ``file://`` URL."""
    path = str(path)
    return unquote(urlsplit(path).path) if scheme(path) == "file" else path


def _pipe_shard_word(command: str) -> Tuple[int, int]:
    """(start, end) in ``command`` of the shard path a ``pipe:`` command reads: its last word ending in a tar suffix."""
    for m in reversed(list(re.finditer(r"[^\s'\"]+", command))):
        if m.group(0).endswith(TAR_SUFFIXES):
            return m.span()
    raise ValueError(f"{redact(command)}: a pipe: shard command must name its shard (a word ending in "
                     f"{', '.join(TAR_SUFFIXES)}), e.g. 'pipe:aws s3 cp s3://bucket/set/shard-000000.tar -', so that "
                     "the set's index.json can be read the same way")


def split(url: str) -> Tuple[str, str]:
    """(folder, file name) of a shard URL; for ``pipe:`` those of the path in the command."""
    if scheme(url) == "pipe":
        start, end = _pipe_shard_word(url)
        folder, _, name = url[start:end].rpartition("/")
        return folder, name
    folder, _, name = url.rstrip("/").rpartition("/")
    return folder, name


def sibling(url: str, name: str) -> str:
    """The URL of the file ``name`` in the folder of shard ``url``; for a ``pipe:`` command, the same command
    reading that file instead (``pipe:aws s3 cp s3://b/set/shard-000001.tar -`` -> ``... s3://b/set/index.json -``)."""
    if scheme(url) == "pipe":
        start, end = _pipe_shard_word(url)
        folder = url[start:end].rpartition("/")[0]
        return url[:start] + (f"{folder}/{name}" if folder else name) + url[end:]
    return join(split(url)[0], name)


def join(folder: str, name: str) -> str:
    return f"{str(folder).rstrip('/')}/{name}"


def redact(text: str) -> str:
    """``text`` with every URL's password and credential-like query values, and a command's credential
    header or option values, replaced by ``***``."""
    def one(m: "re.Match[str]") -> str:
        parts = urlsplit(m.group(0))
        if parts.password is None and not any(_SECRET_PARAM.search(k) for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
            return m.group(0)  # nothing to hide: as written (urlunsplit would turn sqlite:////abs into sqlite://abs)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        query = "&".join(f"{k}=***" if _SECRET_PARAM.search(k) else f"{k}={v}"
                         for k, v in parse_qsl(parts.query, keep_blank_values=True))
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    text = _URL_IN_TEXT.sub(one, str(text))
    text = re.sub(r"(?i)((?:authorization|x-api-key)\s*:\s*)[^'\"]+", r"\1***", text)
    return re.sub(r"(?i)(--(?:password|pass|token)(?:\s+|=))(\S+)", r"\1***", text)


def without_credentials(url: str) -> str:
    """``url`` without its ``user:password@`` (what may be written to a file)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))


def secrets_in(path: str) -> List[str]:
    """What in ``path`` (a URL, or the URLs of a ``pipe:`` command) is a credential: a password, a signature,
    a token. Such a path would be written to ``config.yaml`` and MLflow; credentials belong in the environment."""
    found = []
    if scheme(str(path)) == "pipe" and _SECRET_IN_COMMAND.search(str(path)):
        found.append(f"a credential in the command ({_SECRET_IN_COMMAND.search(str(path)).group(0).strip()!r})")
    for url in _URL_IN_TEXT.findall(str(path)):
        parts = urlsplit(url)
        if parts.password is not None:
            found.append("a password in the URL")
        found += [f"the query parameter {k!r}" for k, _ in parse_qsl(parts.query) if _SECRET_PARAM.search(k)]
    return found


# ------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are fetched (``data.remote`` in the config)."""

    retries: int = 3  # tries after the first, per fetch (and per shard, counted anew after each sample read)
    backoff_s: float = 1.0  # wait before the first retry; doubled for each further one (max 60 s, with jitter)
    timeout_s: float = 60.0  # connecting, and waiting for the next bytes (HTTP, S3)
    cache_dir: Optional[str] = None  # None: stream every read
    cache_max_gb: float = 100.0  # the cache's size bound

    @classmethod
    def from_config(cls, cfg: Any) -> "RemoteOptions":
        if cfg is None:
            return cls()
        return cls(int(cfg.retries), float(cfg.backoff_s), float(cfg.timeout_s),
                   None if cfg.cache_dir is None else str(cfg.cache_dir), float(cfg.cache_max_gb))

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed tries in a row: doubling from ``backoff_s``, with jitter so
        that the ranks and workers of a job that failed together do not all retry at the same moment."""
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1)) * _JITTER.uniform(0.5, 1.0)


_JITTER = random.Random()  # its own generator: retries must not move the seeded global ones


class RemoteError(OSError):
    """A remote file that could not be read or written (after the retries); the message names the URL."""


# ------------------------------------------------------------------------------------- errors
def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception and the ones it was raised from (fsspec wraps an HTTP 503 in a
    ``FileNotFoundError``; the cause says what happened)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen and len(parts) < 4:
        seen.add(id(exc))
        first = exc.args[0] if len(exc.args) > 1 and isinstance(exc.args[0], str) else None  # webdataset appends args
        text = redact(" ".join(str(first if first is not None else exc).split()))
        parts.append(f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__)
        exc = exc.__cause__
    return " <- ".join(parts)


def _is_credentials_error(exc: BaseException) -> bool:
    return "Credentials" in type(exc).__name__ or "credentials" in str(exc).lower()[:200]


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot cure: not found, refused, no credentials, a URL no implementation reads, a 4xx
    answer (but 408 timeout and 429 slow down). fsspec reports a failed HTTP HEAD as ``FileNotFoundError``
    whatever the status, so a not-found whose cause is a connection error or a 5xx is transient."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None and not isinstance(cause, FileNotFoundError):
        if isinstance(getattr(cause, "status", None), int):
            return is_permanent(cause)
        connection = isinstance(cause, (OSError, TimeoutError)) or type(cause).__module__.startswith("aiohttp")
        return not connection
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                            ImportError)) or _is_credentials_error(exc)


_CREDENTIALS_HINT = {
    "s3": "S3 credentials come from the environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
          "~/.aws/credentials (AWS_ENDPOINT_URL for an S3-compatible store)",
    "gs": "GCS credentials come from the environment: GOOGLE_APPLICATION_CREDENTIALS or gcloud's login",
    "http": "HTTP credentials come from ~/.netrc",
}


def _failure(url: str, exc: BaseException, action: str, tries: int) -> OSError:
    """The error to raise for a fetch that failed for good: ``FileNotFoundError`` for a missing file, else
    ``RemoteError``; the message names the URL, what went wrong and what to do about credentials."""
    where = redact(url)
    proto = {"https": "http", "gcs": "gs", "s3a": "s3"}.get(scheme(url), scheme(url))
    tried = f" (tried {tries} times)" if tries > 1 else ""
    if isinstance(exc, ImportError):
        return RemoteError(f"cannot {action} {where}: {exc} (pip install 'lm_mini[remote]' brings fsspec and s3fs)")
    if _is_credentials_error(exc):
        return RemoteError(f"cannot {action} {where}: no usable credentials ({describe(exc)}). "
                           f"{_CREDENTIALS_HINT.get(proto, 'Credentials come from the store’s usual environment')}; "
                           "never from the config")
    if isinstance(exc, ValueError) and scheme(url) not in ("", "file", "pipe"):
        return RemoteError(f"cannot {action} {where}: {describe(exc)}. A shard set's path is a local path, an "
                           "http(s):// URL, another fsspec URL (s3://, gs://, ...) or a pipe: command")
    if isinstance(exc, FileNotFoundError) and is_permanent(exc):
        return FileNotFoundError(f"{where} not found ({describe(exc)})")
    return RemoteError(f"cannot {action} {where}{tried}: {describe(exc)}")


def retrying(fetch: Callable[[], T], url: str, options: RemoteOptions, action: str = "read") -> T:
    """``fetch()``, tried again after a transient failure up to ``options.retries`` times with backoff; a
    permanent failure or the last transient one raises :func:`_failure`'s error."""
    failures = 0
    while True:
        try:
            return fetch()
        except Exception as e:  # noqa: BLE001 - every store raises its own types; is_permanent sorts them
            failures += 1
            if is_permanent(e) or failures > options.retries:
                raise _failure(url, e, action, failures) from e
            delay = options.backoff(failures)
            log.warning("%s %s failed (%s); try %d of %d in %.1f s", action, redact(url), describe(e), failures + 1,
                        options.retries + 1, delay)
            time.sleep(delay)


# ------------------------------------------------------------------------------------- opening
def _storage_options(proto: str, timeout_s: float) -> Dict[str, Any]:
    """fsspec options that bound waits: connecting and each read (not the whole transfer: a shard is streamed
    while training consumes it, which may take longer than any fixed total)."""
    if proto in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        return {"client_kwargs": {"timeout": timeout, "trust_env": True}}  # trust_env: proxies and ~/.netrc
    if proto in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s}}
    return {}


def filesystem(url: str, options: RemoteOptions) -> Tuple[Any, str]:
    """(fsspec filesystem, path in it) for a URL."""
    import fsspec

    return fsspec.core.url_to_fs(url, **_storage_options(scheme(url), options.timeout_s))


def open_url(url: str, options: RemoteOptions, size: Optional[int] = None) -> BinaryIO:
    """A binary stream of ``url``'s bytes (one try). ``size`` (from the set's index): HTTP needs no HEAD first."""
    if scheme(url) == "pipe":
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if not is_remote(url):
        return open(local_path(url), "rb")
    fs, path = filesystem(url, options)
    if scheme(url) in ("http", "https"):
        return fs.open(path, "rb", block_size=0, size=size)  # block_size 0: streamed, not ranged
    return fs.open(path, "rb")


def read_bytes(url: str, options: RemoteOptions) -> bytes:
    """All of ``url``'s bytes (an ``index.json``), with retries."""
    def fetch() -> bytes:
        if is_remote(url) and scheme(url) != "pipe":
            fs, path = filesystem(url, options)
            return fs.cat_file(path)
        with open_url(url, options) as stream:  # a pipe's exit status is checked when it is closed
            return stream.read()

    return retrying(fetch, url, options)


# ------------------------------------------------------------------------------------- cache
class ShardCache:
    """Whole shards downloaded once into ``cache_dir`` and read from there (repeated epochs).

    A download lands under a temporary name and is renamed when complete (its size and sha256 checked
    against the index when it gives them), so a reader never opens half a shard. The least recently used
    cached shards are deleted to keep them under ``max_bytes`` (a hit touches its file). Only the cache's
    own files (:meth:`name`) are ever deleted: the folder may hold anything else (WebDataset's
    ``LRUCleanup`` deletes any file under the folder, the user's included), and another worker's download
    in progress is left alone. Several workers and ranks may share the folder: each download is written
    apart and renamed atomically.
    """

    OWN_FILE = re.compile(r"[0-9a-f]{16}-[^/]+")  # name(url); a download in progress ends in .<pid>.part

    def __init__(self, cache_dir: str, max_bytes: int):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def cleanup(self) -> None:
        """Delete the least recently used cached shards until the cache's files fit in ``max_bytes``."""
        files = []
        for path in self.dir.iterdir():
            if self.OWN_FILE.fullmatch(path.name) and not path.name.endswith(".part"):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted by another worker meanwhile
                    continue
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    @staticmethod
    def name(url: str) -> str:
        """Cache file name: the shard's name after a hash of its whole URL (two sets' shard-000000.tar differ)."""
        return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{split(url)[1][-100:]}"

    def open(self, url: str, options: RemoteOptions, size: Optional[int] = None,
             sha256: Optional[str] = None) -> BinaryIO:
        """The cached copy of ``url``, downloaded first if absent (one try; the reader retries)."""
        path = self.dir / self.name(url)
        try:
            os.utime(path)
            if size is None or path.stat().st_size == size:
                return open(path, "rb")
        except FileNotFoundError:  # absent, or just deleted by another worker's cleanup
            pass
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        try:
            digest, n = hashlib.sha256(), 0
            with open_url(url, options, size) as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
                    n += len(block)
            if size is not None and n != size:
                raise EOFError(f"{redact(url)}: downloaded {n} bytes, its index says {size}")
            if sha256 and digest.hexdigest() != sha256:
                raise OSError(f"{redact(url)}: downloaded bytes do not match the sha256 in its index")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        stream = open(path, "rb")  # opened before the cleanup, which may remove it if it alone exceeds the bound
        self.cleanup()
        return stream


def open_shard(url: str, options: RemoteOptions, size: Optional[int] = None, sha256: Optional[str] = None) -> BinaryIO:
    """A remote shard's bytes: from the cache when ``options.cache_dir`` is set, else streamed."""
    if options.cache_dir:
        return ShardCache(options.cache_dir, int(options.cache_max_gb * 1e9)).open(url, options, size, sha256)
    return open_url(url, options, size)


# ------------------------------------------------------------------------------------- upload
def check_writable(url: str, options: RemoteOptions) -> None:
    """Write and delete a small probe file under ``url``: a missing bucket or a lacking permission shows now,
    not after a long build."""
    fs, root = filesystem(url, options)
    probe = join(root, ".lm_mini-write-probe")
    fs.pipe_file(probe, b"lm_mini")
    fs.rm_file(probe)


def upload(local_dir: Path, names: Sequence[str], url: str, options: RemoteOptions) -> None:
    """Copy ``local_dir/<name>`` to ``<url>/<name>`` for each name, in the order given (the caller puts
    ``index.json`` last, so a reader never finds an index whose shards are not all there), each with retries
    and its stored size checked."""
    fs, root = filesystem(url, options)
    for name in names:
        src, dst = Path(local_dir) / name, join(root, name)

        def put() -> None:
            fs.put_file(str(src), dst)
            fs.invalidate_cache(dst)
            if fs.size(dst) != src.stat().st_size:
                raise OSError(f"{redact(join(url, name))}: the stored size differs from {src.stat().st_size} bytes")

        retrying(put, join(url, name), options, action="upload")
        log.info("uploaded %s", redact(join(url, name)))
