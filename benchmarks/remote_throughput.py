"""Streaming throughput from local files vs from an HTTP server (127.0.0.1), side by side in one run.

    .venv/bin/python benchmarks/remote_throughput.py [--n 2000] [--workers 2] [--batch-size 16] [--rounds 3]

The same ``--n`` generated JPEG records (``data_throughput.make_data``: ``--source-size`` px, resized to
``--image-size``) are built into shards once, then read

- ``local``: from the shard directory (``data.train[0].path: /tmp/.../shards``);
- ``http``: from ``http://127.0.0.1:PORT/shards``, served by Python's ``http.server`` in a process of its
  own (a threaded server: one thread per connection), through fsspec's HTTP streaming. A loader worker
  streams a shard from its start and steps over the records that belong to other workers (the plan gives
  each worker a contiguous range), as it does with local files;
- ``http + cache``: the same URL with ``data.remote.cache_dir`` set, timed on passes after the first
  (shards read from the local cache, as in every epoch after the first).

Two measures for each: raw shard reads (every record of every shard parsed, no decoding: MB/s of shard
bytes, one process) isolate the transport; the full training loader (``build_loader``: read, decode,
resize, tokenize, collate in ``--workers`` worker processes; samples/s, and samples per CPU-second of
this process, its workers and the server, which other load on the machine hardly moves) shows what a
run sees. Each is timed over full passes, ``--rounds`` times in alternating order, and its best pass is
kept (other processes share the machine). The page cache is warm for both: the loopback server reads the same files
from memory, so the ``http`` rows measure the cost of the HTTP transport itself, not of a network or a
remote disk.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from data_throughput import count_samples, cpu_seconds, make_data  # noqa: E402
from lm_mini.config import ShardSetConfig, load_config  # noqa: E402
from lm_mini.data.remote import RemoteOptions  # noqa: E402
from lm_mini.data.shard_reader import list_shards, read_shard  # noqa: E402
from lm_mini.data.streaming import build_loader, build_processor  # noqa: E402

LOCAL, HTTP, CACHED = "local files", "http 127.0.0.1", "http + cache (later epochs)"
# A file server in its own process, so that serving does not compete for this process's interpreter lock.
SERVER = """
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a worker that has read its share closes the stream early
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)
server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=sys.argv[1]))
print(server.server_port, flush=True)
server.serve_forever()
"""


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a running process, from /proc (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_read(path: str, remote: RemoteOptions) -> tuple:
    """(records, bytes) of every shard of a set, read and parsed, nothing decoded."""
    shards = list_shards(path, remote)
    records = sum(1 for shard in shards for _ in read_shard(shard, remote))
    return records, sum(s.bytes for s in shards)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--source-size", type=int, default=336)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_data(root, args.n, args.source_size)
        print(f"made {args.n} JPEGs of {args.source_size}px in {len(list((root / 'shards').glob('*.tar')))} shards, "
              f"in {time.perf_counter() - t0:.1f} s")
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(root)], stdout=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{server.stdout.readline().strip()}/shards"
            cache = root / "cache"
            paths = {LOCAL: (str(root / "shards"), RemoteOptions()), HTTP: (url, RemoteOptions()),
                     CACHED: (url, RemoteOptions(cache_dir=str(cache)))}
            cfg = load_config(overrides=["model.encoder.name=hf_clip", f"model.encoder.config.image_size={args.image_size}",
                                         "model.encoder.config.patch_size=14"])
            cfg.data.tokenizer, cfg.data.template = str(root / "tok"), "vicuna_v1"
            cfg.data.batch_size, cfg.data.num_workers = args.batch_size, args.workers
            processor = build_processor(cfg)

            def loader(name: str):
                cfg.data.train = [ShardSetConfig(paths[name][0])]
                cfg.data.remote.cache_dir = paths[name][1].cache_dir
                return build_loader(cfg, train=True, processor=processor)

            def cpu() -> float:  # this process, its finished loader workers and the server
                return cpu_seconds() + process_cpu_seconds(server.pid)

            raw_read(*paths[CACHED])  # fills the cache: the cached rows time later epochs
            mb_s, samples_s, per_cpu = {}, {}, {}
            for r in range(args.rounds):
                for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
                    t = time.perf_counter()
                    records, size = raw_read(*paths[name])
                    assert records == args.n, f"{name}: {records} of {args.n} records"
                    mb_s[name] = max(mb_s.get(name, 0.0), size / 1e6 / (time.perf_counter() - t))
                    t, c = time.perf_counter(), cpu()
                    n = count_samples(loader(name), processor.images)
                    assert n == args.n, f"{name} delivered {n} of {args.n} samples"
                    samples_s[name] = max(samples_s.get(name, 0.0), n / (time.perf_counter() - t))
                    per_cpu[name] = max(per_cpu.get(name, 0.0), n / (cpu() - c))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"\n{args.n} images {args.source_size}px -> {args.image_size}px, batch {args.batch_size}, workers "
          f"{args.workers}, {os.cpu_count()} CPUs, warm page cache; best of {args.rounds} passes")
    print(f"{'source':30s} {'raw MB/s':>9s} {'vs local':>9s} {'loader samples/s':>17s} {'vs local':>9s} "
          f"{'per CPU-s':>10s} {'vs local':>9s}")
    for name in paths:
        print(f"{name:30s} {mb_s[name]:9.1f} {mb_s[name] / mb_s[LOCAL]:9.2f} {samples_s[name]:17.1f} "
              f"{samples_s[name] / samples_s[LOCAL]:9.2f} {per_cpu[name]:10.1f} {per_cpu[name] / per_cpu[LOCAL]:9.2f}")
    print(f"\nhttp / local: raw shard reads {mb_s[HTTP] / mb_s[LOCAL]:.2f}x, training loader "
          f"{samples_s[HTTP] / samples_s[LOCAL]:.2f}x ({per_cpu[HTTP] / per_cpu[LOCAL]:.2f}x per CPU-second); "
          f"with the cache: {samples_s[CACHED] / samples_s[LOCAL]:.2f}x ({per_cpu[CACHED] / per_cpu[LOCAL]:.2f}x)")


if __name__ == "__main__":
    main()
