"""Real servers on 127.0.0.1 for the remote-shard tests: an HTTP file server that fails on request, and an
S3-compatible server (moto in server mode) reached through s3fs / boto3 with credentials from the environment."""
from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

BUCKET = "lm-mini-shards"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        server: "ShardServer" = self.server.owner
        path = self.path.split("?")[0]
        with server.lock:
            server.requests[path] += 1
            plan = server.faults.get(path, [])
            action = plan[0] if plan else None
            if plan and action != "down":
                plan.pop(0)
        if action in ("503", "down"):
            self.send_error(503, "Service Unavailable")
            return
        if action in ("cut", "short"):
            data = Path(self.translate_path(path)).read_bytes()
            sent = data[: len(data) * 3 // 5]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data if action == "cut" else sent)))
            self.end_headers()
            self.wfile.write(sent)
            self.wfile.flush()
            if action == "cut":
                time.sleep(0.3)  # let the client read what came before the connection drops
            self.close_connection = True
            return
        super().do_GET()


class ShardServer:
    """``http.server`` on 127.0.0.1 (in a thread) serving ``root``.

    ``faults[path]`` lists what the next GETs of ``path`` (e.g. ``/img/shard-000000.tar``) get, in order:
    ``"503"``; ``"cut"`` (headers for the whole file, 60% of its bytes, then the connection drops); ``"short"``
    (60% of the file, sent as a complete response: only the index's sample count tells it is cut short);
    ``"down"`` (503 for this and every later request). ``requests[path]`` counts the GETs.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.faults: Dict[str, List[str]] = {}
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.httpd.owner = self
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, rel: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{rel}".rstrip("/")

    def reset(self) -> None:
        with self.lock:
            self.faults, self.requests = {}, Counter()

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# Never ask the EC2 metadata address (not on this machine) and never read a developer's own AWS files.
S3_ISOLATION = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with one bucket; the environment points the AWS SDKs at it
    (``AWS_ENDPOINT_URL``) with test credentials. Yields ``s3://<bucket>``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(key, raising=False)
            for key, value in {**S3_ENV, **S3_ISOLATION, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
                mp.setenv(key, value)
            clear_s3_clients()
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        clear_s3_clients()
        server.stop()


def clear_s3_clients() -> None:
    """s3fs keeps one client per option set; a test that changes the environment needs new ones."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def put_tree(local: Path, url: str) -> None:
    """Copy a local folder's files to ``url`` (an s3:// prefix)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
