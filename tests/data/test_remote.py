"""Shard sets read from where clusters keep them: a real HTTP server and a real S3-compatible server (moto) on
127.0.0.1, and ``pipe:`` commands. The same samples in the same order as from the local files, exact
mid-epoch resume, retries that cost no sample, a shard that stays down skipped and counted, the shard cache
and its size bound, clear errors at start, and ``shards build --out s3://...``."""
import json
import logging
import re
import tarfile
from pathlib import Path

import pytest

from lm_mini.cli import main as cli_main
from lm_mini.config import ConfigError, ShardSetConfig, flatten, load_config
from lm_mini.data.datamodule import build_datamodule, check_data_paths
from lm_mini.data.remote import RemoteOptions, redact, secrets_in, sibling, split
from lm_mini.data.shard_builder import build_shards
from lm_mini.data.shard_reader import Shard, list_shards, read_index, read_shard
from lm_mini.data.streaming import ShardSet
from remote_servers import ShardServer, clear_s3_clients, closed_port, put_tree, s3_server
from test_datamodule import MIX, Preempt, Recorder, _trainer, corpus, ids_of, make_cfg  # noqa: F401 (corpus: fixture)

SETS = ("img", "cap", "text")
FAST = {"data.remote.backoff_s": 0.01}  # retries wait 10-20 ms, not seconds


@pytest.fixture(scope="module")
def http(corpus):
    with ShardServer(Path(corpus["img"]).parent) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_server(request):
    if "http" in request.fixturenames:
        request.getfixturevalue("http").reset()
    yield


@pytest.fixture(scope="module")
def s3(corpus):
    with s3_server() as bucket:
        for name in SETS:
            put_tree(Path(corpus[name]), f"{bucket}/corpus/{name}")
        yield bucket


def located(corpus, where, http=None, s3=None):
    """The corpus's sets as the config names them when they live at ``where``."""
    if where == "local":
        return corpus
    if where == "http":
        return dict(corpus, **{n: http.url(n) for n in SETS})
    if where == "s3":
        return dict(corpus, **{n: f"{s3}/corpus/{n}" for n in SETS})
    # pipe: a command per shard; its index.json is read by the same command
    counts = {n: len(read_index(corpus[n])["shards"]) for n in SETS}
    return dict(corpus, **{n: f"pipe:cat {corpus[n]}/shard-{{000000..{counts[n] - 1:06d}}}.tar" for n in SETS})


def whole_fit(cfg):
    recorder = Recorder()
    _trainer().fit(recorder, datamodule=build_datamodule(cfg))
    return recorder.seen


_LOCAL_FITS = {}


def local_fit(corpus, workers):
    if workers not in _LOCAL_FITS:
        _LOCAL_FITS[workers] = whole_fit(make_cfg(corpus, MIX, **{"data.num_workers": workers}))
    return _LOCAL_FITS[workers]


# ----------------------------------------------------------------------------- same samples, exact resume
@pytest.mark.parametrize("where,workers", [("http", 0), ("http", 2), ("s3", 0), ("s3", 2), ("pipe", 0)])
def test_remote_sets_give_the_local_ledger_and_resume_mid_epoch_exactly(corpus, http, s3, tmp_path, where, workers):
    sets = located(corpus, where, http, s3)
    cfg = make_cfg(sets, MIX, **{"data.num_workers": workers})
    assert ShardSet.from_config(ShardSetConfig(sets["img"])).counts == (7, 0, 10)  # from the remote index.json
    local = local_fit(corpus, workers)
    assert len(local) == 20  # 2 epochs x 10 batches
    assert whole_fit(cfg) == local  # same samples, same order, same padding

    first, second, ckpt = Recorder(), Recorder(), tmp_path / "mid.ckpt"
    _trainer(callbacks=[Preempt(13, ckpt)]).fit(first, datamodule=build_datamodule(cfg))
    _trainer().fit(second, datamodule=build_datamodule(cfg), ckpt_path=ckpt)
    assert len(first.seen) == 13 and first.seen + second.seen == local


# ----------------------------------------------------------------------------- transient failures
def _epoch(cfg):
    dm = build_datamodule(cfg)
    return ids_of(dm.train_dataloader()), dm.skip_counts()


def test_dropped_connections_and_503s_cost_retries_not_samples(corpus, http, caplog):
    local, _ = _epoch(make_cfg(corpus, MIX))
    http.faults = {
        "/img/shard-000000.tar": ["cut", "503"],  # the connection drops mid-shard, then one 503, then served
        "/img/shard-000002.tar": ["503", "503", "short", "short"],  # 3 failures in a row at most (retries), then a read
        "/cap/index.json": ["503"],  # at start too
    }
    cfg = make_cfg(located(corpus, "http", http), MIX, **FAST, **{"data.remote.retries": 3})
    with caplog.at_level(logging.WARNING, logger="lm_mini"):
        ids, skips = _epoch(cfg)
    assert ids == local and skips == {}
    assert http.requests["/img/shard-000000.tar"] == 3 and http.requests["/img/shard-000002.tar"] == 5
    assert http.requests["/cap/index.json"] == 2
    assert re.search(rf"{re.escape(http.url('img/shard-000000.tar'))} failed after \d+ samples \(ClientPayloadError",
                     caplog.text)
    # a shard cut short after samples had been read: the retry went on from there, neither repeating nor losing one
    assert re.search(rf"{re.escape(http.url('img/shard-000002.tar'))} failed after [1-9]\d* samples \(ReadError",
                     caplog.text)
    assert "503, message='Service Unavailable'" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_that_stays_down_is_skipped_and_counted_with_its_url(corpus, http, caplog, workers):
    local, _ = _epoch(make_cfg(corpus, MIX, **{"data.num_workers": workers}))
    http.faults = {"/img/shard-000002.tar": ["down"]}  # records 20..29 of img
    cfg = make_cfg(located(corpus, "http", http), MIX, **FAST, **{"data.remote.retries": 2, "data.num_workers": workers})
    with caplog.at_level(logging.WARNING, logger="lm_mini"):
        ids, skips = _epoch(cfg)
    lost = [f"img/{k:09d}" for k in range(20, 30)]
    assert len(ids) == len(local)  # every batch still comes: padding stands in, so ranks stay in step
    assert [i for i in ids if i is not None] == [i for i in local if i is not None and i not in lost]
    assert skips == {"shard_unavailable": 10}  # each lost sample once, under its own reason
    if workers == 0:  # (worker processes log to their own stderr)
        url = http.url("img/shard-000002.tar")
        assert f"{url}: unreadable after 3 tries in a row" in caplog.text and "shard_unavailable" in caplog.text


def test_pipe_command_that_fails_is_retried_then_counted(corpus, tmp_path):
    cut = tmp_path / "text"
    cut.mkdir()
    (cut / "index.json").write_text(Path(corpus["text"], "index.json").read_text())
    cfg = make_cfg(dict(corpus, text=f"pipe:cat {cut}/shard-000000.tar"), [("text", 1.0, None)], **FAST,
                   **{"data.remote.retries": 1})
    ids, skips = _epoch(cfg)  # cat exits 1 (no such file): the pipe's exit status is the error
    assert [i for i in ids if i is not None] == [] and skips == {"shard_unavailable": 3}


def test_a_remote_shard_that_ends_short_of_its_index_count_is_retried_then_counted(corpus, caplog):
    """A stream that ends cleanly at a record boundary has no read error: only the index's count tells."""
    src = Path(corpus["img"]) / "shard-000002.tar"  # 10 samples of 2 members (jpg, json)
    with tarfile.open(src) as tar:
        boundary = tar.getmembers()[6].offset  # where the 4th sample begins
    shard = Shard(f"pipe:head -c {boundary} {src}", samples=10)
    with caplog.at_level(logging.WARNING, logger="lm_mini"):
        items = list(read_shard(shard, RemoteOptions(retries=1, backoff_s=0.01)))
    assert [i.key for i in items[:3]] == ["000000020", "000000021", "000000022"] and len(items) == 4
    assert items[3].reason == "truncated_tar" and "the shard ended after 3 of its 10 samples" in str(items[3])
    assert "unreadable after 2 tries in a row" in str(items[3]) and "retry 1 of 1" in caplog.text


# ----------------------------------------------------------------------------- cache
def test_cache_fetches_each_shard_once_and_keeps_its_size_bound(corpus, http, tmp_path):
    local_cfg = make_cfg(corpus, MIX)
    loader = build_datamodule(local_cfg).train_dataloader()
    local = [ids_of(loader), ids_of(loader)]  # two epochs

    http.faults = {"/img/shard-000000.tar": ["cut"]}  # a download cut off is retried, never kept half
    cache = tmp_path / "cache"
    cfg = make_cfg(located(corpus, "http", http), MIX, **FAST, **{"data.remote.cache_dir": str(cache)})
    loader = build_datamodule(cfg).train_dataloader()
    assert [ids_of(loader), ids_of(loader)] == local
    read = [p for p in http.requests if p.endswith(".tar")]
    assert read and all(http.requests[p] == 1 for p in read if p != "/img/shard-000000.tar")
    assert http.requests["/img/shard-000000.tar"] == 2 and not list(cache.glob("*.part"))
    assert len(list(cache.iterdir())) == len(read)

    # a bound of about one and a half shards: least recently used shards go, the samples stay the same
    shard_bytes = [s.bytes for n in SETS for s in list_shards(http.url(n))]
    bound = int(max(shard_bytes) * 1.5)
    http.reset()
    small = tmp_path / "small"  # a folder the user also keeps other files in: the cleanup deletes only cached shards
    (small / "results").mkdir(parents=True)
    (small / "results" / "weights.bin").write_bytes(b"w" * (2 * bound))
    (small / "notes.txt").write_text("mine")
    (small / "0123456789abcdef-shard-000000.tar.77.part").write_bytes(b"another worker's download in progress")
    cfg = make_cfg(located(corpus, "http", http), MIX, **{"data.remote.cache_dir": str(small),
                                                         "data.remote.cache_max_gb": bound / 1e9})
    loader = build_datamodule(cfg).train_dataloader()
    assert [ids_of(loader), ids_of(loader)] == local
    assert (small / "notes.txt").read_text() == "mine" and (small / "results" / "weights.bin").stat().st_size == 2 * bound
    assert (small / "0123456789abcdef-shard-000000.tar.77.part").exists()
    cached = [p for p in small.iterdir() if p.suffix == ".tar"]
    assert cached and sum(p.stat().st_size for p in cached) <= bound
    assert sum(http.requests[p] for p in read) > len(read)  # evicted shards were fetched again


# ----------------------------------------------------------------------------- errors at start
def _start_error(corpus, path, **data):
    cfg = make_cfg(dict(corpus, bad=path), [("bad", 1.0, None)], **FAST, **{"data.remote.retries": 1}, **data)
    with pytest.raises(FileNotFoundError) as e:
        check_data_paths(cfg)
    return str(e.value)


def test_bad_urls_and_missing_index_fail_at_start_naming_the_set(corpus, http):
    port = closed_port()
    cases = {
        http.url("nothere"): r"no index\.json at http://127\.0\.0\.1:\d+/nothere/index\.json.*lm-mini shards build",
        http.url("img/shard-000099.tar"): r"shard-000099\.tar: no such shard in http://.*/img/index\.json \(it lists 3",
        f"http://127.0.0.1:{port}/set": rf"cannot read http://127\.0\.0\.1:{port}/set/index\.json \(tried 2 times\): "
                                        r"ClientConnectorError",
        "nosuchproto://host/set": r"cannot read nosuchproto://host/set/index\.json: ValueError: Protocol not known",
        "pipe:cat /no/such/dir": r"a pipe: shard command must name its shard",
    }
    for path, expected in cases.items():
        message = _start_error(corpus, path)
        assert message.startswith("data.train[0].path: ") and re.search(expected, message), (path, message)
        assert "relative to the working directory" not in message  # that hint is for local paths


def test_s3_without_credentials_or_bucket_fails_at_start_naming_the_set(corpus, s3, monkeypatch):
    message = _start_error(corpus, "s3://no-such-bucket-here/set")
    assert "no index.json at s3://no-such-bucket-here/set/index.json" in message and "bucket does not exist" in message
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    clear_s3_clients()
    try:
        message = _start_error(corpus, f"{s3}/corpus/img")
    finally:
        clear_s3_clients()
    assert message.startswith(f"data.train[0].path: cannot read {s3}/corpus/img/index.json: no usable credentials")
    assert "AWS_ACCESS_KEY_ID" in message and "never from the config" in message


def test_lm_mini_train_refuses_an_unreachable_set_before_making_a_run(corpus, http, tmp_path, capsys):
    rc = cli_main(["train", str(Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"), f"data.train=[{{path: '{http.url('gone')}'}}]",
                   f"data.tokenizer={corpus['tok']}", f"logging.runs_dir={tmp_path / 'runs'}",
                   f"logging.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert rc != 0 and f"data.train[0].path: no index.json at {http.url('gone')}/index.json" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# ----------------------------------------------------------------------------- credentials never in the config
def test_a_url_holding_credentials_is_refused_and_params_never_show_one():
    for path, what in (("https://user:hunter2@host/set", "a password"), ("s3://b/set?X-Amz-Signature=abc", "Signature"),
                       ("pipe:curl -s https://host/set/shard-000000.tar?token=abc", "'token'"),
                       ("pipe:curl -s -H 'Authorization: Bearer abc' https://host/set/shard-000000.tar", "command")):
        assert secrets_in(path)
        with pytest.raises(ConfigError, match=rf"data\.train\.0\.path.*{what}.*environment") as e:
            load_config(overrides=[f'data.train=[{{path: "{path}"}}]'])
        assert "hunter2" not in str(e.value) and "abc" not in str(e.value)
    with pytest.raises(ConfigError, match=r"logging\.tracking_uri.*password.*MLFLOW_TRACKING_PASSWORD") as e:
        load_config(overrides=["logging.tracking_uri=https://me:secret@mlflow.example/"])
    assert "secret" not in str(e.value)
    cfg = load_config(overrides=['data.train=[{path: "s3://bucket/set"}]'])
    cfg.logging.tracking_uri = "https://me:secret@mlflow.example/"  # set in code, past the checks: params still hide it
    params = flatten(cfg)
    assert params["data.train.0.path"] == "s3://bucket/set"
    assert params["logging.tracking_uri"] == "https://me:***@mlflow.example/" and "secret" not in json.dumps(params)
    assert redact("pipe:curl https://u:p@h/x.tar?sig=1&n=2") == "pipe:curl https://u:***@h/x.tar?sig=***&n=2"


@pytest.mark.parametrize("key,value", [("retries", -1), ("backoff_s", -0.5), ("timeout_s", 0), ("cache_max_gb", 0)])
def test_remote_options_are_checked_at_load(key, value):
    with pytest.raises(ConfigError, match=rf"data\.remote\.{key}"):
        load_config(overrides=[f"data.remote.{key}={value}"])


def test_pipe_index_is_read_by_the_same_command_and_backoff_is_bounded():
    url = "pipe:aws s3 cp 's3://b/mix/shard-000003.tar' - --quiet"
    assert sibling(url, "index.json") == "pipe:aws s3 cp 's3://b/mix/index.json' - --quiet"
    assert split(url) == ("s3://b/mix", "shard-000003.tar")
    assert sibling("https://h/a/b/shard-1.tar", "index.json") == "https://h/a/b/index.json"
    waits = [RemoteOptions(backoff_s=1.0).backoff(k) for k in range(1, 12)]
    assert 0.5 <= waits[0] <= 1.0 and 2.0 <= waits[2] <= 4.0 and max(waits) <= 60.0


# ----------------------------------------------------------------------------- publishing a build
def test_shards_build_out_s3_uploads_the_set_as_built_locally(corpus, s3, tmp_path, capsys):
    import fsspec

    src = Path(corpus["cap"]).parent / "cap-src"
    args = ["shards", "build", "--json", str(src / "data.json"), "--media-root", str(src), "--shard-size", "4"]
    assert cli_main([*args, "--out", f"{s3}/built/cap"]) == 0
    assert f"{s3}/built/cap: 8 samples in 2 shards" in capsys.readouterr().out
    fs = fsspec.filesystem("s3")
    stored = {Path(p).name: fs.cat_file(p) for p in fs.find(f"{s3}/built/cap")}
    local = {p.name: p.read_bytes() for p in Path(corpus["cap"]).iterdir() if p.is_file()}
    assert stored == local  # byte for byte: the build is deterministic and nothing is lost on the way
    assert ShardSet.from_config(ShardSetConfig(f"{s3}/built/cap")).counts == (4, 4)

    assert cli_main([*args, "--out", f"{s3}/built/cap"]) == 1  # a finished set is never overwritten
    assert "already holds a finished shard set" in capsys.readouterr().out
    assert cli_main([*args, "--out", f"{s3}/built/cap", "--resume"]) == 0  # the same build: reported done


def test_shards_build_out_a_bucket_that_does_not_exist_fails_before_building(corpus, s3, tmp_path, capsys):
    src = Path(corpus["cap"]).parent / "cap-src"
    stage = tmp_path / "stage"
    assert cli_main(["shards", "build", "--json", str(src / "data.json"), "--media-root", str(src),
                     "--out", "s3://no-such-bucket/cap", "--staging", str(stage)]) == 1
    assert "cannot write the shard set to s3://no-such-bucket/cap" in capsys.readouterr().out
    assert not stage.exists()  # nothing was built


def test_an_upload_that_fails_publishes_no_index_and_resumes_from_the_staging_folder(corpus, tmp_path, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    src = Path(corpus["img"]).parent / "img-src"
    url, stage, options = "memory://published/img", tmp_path / "stage", RemoteOptions(retries=1, backoff_s=0.01)
    real_put, calls = MemoryFileSystem.put_file, []

    def failing(self, lpath, rpath, **kw):  # the second shard never gets through
        calls.append(Path(rpath).name)
        if Path(rpath).name == "shard-000001.tar":
            raise ConnectionResetError("connection reset by peer")
        return real_put(self, lpath, rpath, **kw)

    monkeypatch.setattr(MemoryFileSystem, "put_file", failing)
    with pytest.raises(Exception, match=rf"cannot upload {url}/shard-000001\.tar \(tried 2 times\).*--staging {stage} --resume"):
        build_shards([src / "data.json"], src, url, shard_size=10, staging=stage, remote=options)
    assert calls == ["shard-000000.tar", "shard-000001.tar", "shard-000001.tar"]  # retried, index never sent
    with pytest.raises(FileNotFoundError, match="no index.json at memory://published/img"):
        list_shards(url)

    monkeypatch.setattr(MemoryFileSystem, "put_file", real_put)
    report = build_shards([src / "data.json"], src, url, shard_size=10, staging=stage, resume=True, remote=options)
    assert report.num_samples == 17 and report.shards_written == 0  # built before; uploaded now, index last
    assert [s.samples for s in list_shards(url)] == [7, 0, 10]
    fs = MemoryFileSystem()
    assert fs.cat_file("/published/img/shard-000002.tar") == (Path(corpus["img"]) / "shard-000002.tar").read_bytes()
    fs.rm("/published", recursive=True)


def test_inspect_reads_a_remote_set(corpus, http, capsys):
    assert cli_main(["shards", "inspect", http.url("img"), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{http.url('img')}: 17 samples in 3 shards" in out and "id=img-0" in out
    assert cli_main(["shards", "inspect", http.url("img/shard-{000000..000002}.tar"), "-n", "0"]) == 0
    assert "17 samples in 3 shards (counts from their index.json)" in capsys.readouterr().out
