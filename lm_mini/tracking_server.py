"""Talking to an MLflow tracking *server* over HTTP(S), apart from MLflow's client where its behaviour does not fit.

- :func:`check_tracking_server`: the server must answer ``/health`` within ``logging.connect_timeout_s`` before
  any work starts, else :class:`~lm_mini.tracking_store.TrackingUnavailable` with what to do about it.
- :class:`ShortRequestClient`: the few calls the training metric sender makes, one attempt each (MLflow's own
  client retries one call for about two minutes, set process-wide from the environment).
- :func:`how_to_view`: where a user looks at a run.

Light: MLflow is imported when a :class:`ShortRequestClient` is made.
"""
from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

from lm_mini.data.remote import redact
from lm_mini.tracking_store import TrackingUnavailable


def is_server(uri: str) -> bool:
    """Whether a tracking URI names a server (``http(s)://``), not a local store."""
    return uri.startswith(("http://", "https://"))


def _health_request(uri: str) -> urllib.request.Request:
    """``GET <server>/health`` with the credentials MLflow itself would send: a ``user:password@`` in the URI
    (basic auth; urllib cannot open such a URL), else MLFLOW_TRACKING_USERNAME / _PASSWORD or MLFLOW_TRACKING_TOKEN."""
    parts = urllib.parse.urlsplit(uri)
    user, password = parts.username, parts.password
    host = parts.netloc.rpartition("@")[2]
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(url)
    user = user if user is not None else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password if password is not None else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None and password is not None:
        token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    return request


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before any work, when an ``http(s)`` tracking server is not reachable."""
    if not is_server(uri):
        return
    request = _health_request(uri)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}" + (" (credentials: MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN)" if e.code in (401, 403) else "")
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise TrackingUnavailable(
        f"MLflow tracking server {redact(uri)} is not reachable ({request.full_url}: {problem}). Start it "
        f"(mlflow server --host ... --port ...), fix MLFLOW_TRACKING_URI / logging.tracking_uri, "
        f"or unset both to log to the local store sqlite:///mlflow.db."
    )


def how_to_view(uri: str, experiment_id: Optional[str] = None, run_id: Optional[str] = None) -> str:
    """Where to look at a run: the server's page for an http(s) store, else the ``mlflow ui`` command for it."""
    if is_server(uri):
        page = f"#/experiments/{experiment_id}/runs/{run_id}" if experiment_id and run_id else ""
        return f"open {redact(uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}"


class ShortRequestClient:
    """The calls the metric sender makes to a tracking *server* (``log_batch``, ``set_tag``, ``delete_tag``,
    ``set_terminated``, as :class:`mlflow.MlflowClient` names them), one attempt each, at most ``timeout`` seconds.

    MLflow retries every request itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7, backoff factor 2: about two
    minutes for one call), read from the environment, for the whole process: it has no per-client setting.
    A sender inside such a call did not see a server that came back, and the run ended with its metrics
    spilled. The sender retries with its own backoff, so here a request that fails, fails at once.
    """

    def __init__(self, uri: str, timeout: float):
        from functools import partial

        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.credentials import get_default_host_creds

        class OneAttemptRestStore(RestStore):
            def _call_endpoint(self, api: Any, json_body: Any = None, endpoint: Any = None, retry_timeout_seconds: Any = None,
                               response_proto: Any = None) -> Any:
                # RestStore._call_endpoint -> rest_utils.call_endpoint, with the retry policy as an argument
                from mlflow.utils.proto_json_utils import parse_dict
                from mlflow.utils.rest_utils import http_request, verify_rest_response

                default, method = (self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO)[api]
                endpoint = endpoint or default
                body = json.loads(json_body) if json_body is not None else None
                response = http_request(self.get_host_creds(), endpoint, method, max_retries=0, backoff_factor=0,
                                        timeout=timeout, **({"params": body} if method == "GET" else {"json": body}))
                response = verify_rest_response(response, endpoint)
                proto = response_proto or api.Response()
                if response.status_code != 204:
                    parse_dict(js_dict=response.json(), message=proto)
                return proto

        self.store = OneAttemptRestStore(partial(get_default_host_creds, uri))

    def log_batch(self, run_id: str, metrics: Any = ()) -> None:
        self.store.log_batch(run_id, metrics=list(metrics), params=[], tags=[])

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        from mlflow.entities import RunTag

        self.store.set_tag(run_id, RunTag(key, str(value)))

    def delete_tag(self, run_id: str, key: str) -> None:
        self.store.delete_tag(run_id, key)

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        from mlflow.entities import RunStatus

        self.store.update_run_info(run_id, run_status=RunStatus.from_string(status), end_time=int(time.time() * 1000),
                                   run_name=None)
