"""Serve a benchmark corpus over HTTP on 127.0.0.1 with nginx, fast enough never to be the bottleneck.

::

    python -m benchmarks.server --corpus benchmarks/.corpus             # prints the base URL; Ctrl-C stops
    python -m benchmarks.server --corpus benchmarks/.corpus --load-test 10   # wrk against every corpus URL

From Python::

    with serve_corpus("benchmarks/.corpus") as base_url:  # "http://127.0.0.1:<free port>"
        ...

nginx (Debian's package; ``ensure_nginx()`` installs it when it is missing) runs in the foreground with
a private configuration and prefix in a temporary folder: static files with sendfile, keep-alive
connections that are never closed for their request count, no access log, an open-file cache, the
corpus's content types by extension (so the HTML pages saved as ``.jpg`` come back as ``image/jpeg``,
as a misconfigured site sends them), a 404 for the corpus's missing files, and
``X-Robots-Tag: noai`` on everything under ``/noai/``. Query strings are ignored, so the URL lists'
``?r=<n>`` repeats hit the same files.

Measured on this machine (2 cores, nginx 1.22.1 from Debian 12; ``--load-test 10``: wrk 4.1 with one
thread and 64 keep-alive connections cycling through the 5000 URLs of the seed-0 corpus, whose mean
response is about 170 KiB and 3% of which are 404s; three runs at saturation, one paced):

=================================  ================  =============  ==========  ==============
run                                requests/s        MiB/s          nginx CPU   nginx CPU/req
=================================  ================  =============  ==========  ==============
1 worker, as fast as wrk can       8,600 - 14,900    1,450 - 2,510  0.52-0.94   60-67 us
2 workers, as fast as wrk can      9,300 - 11,400    1,580 - 1,930  0.59-0.80   60-70 us
1 worker, ``--rate 3000``          2,630             443            0.17 cores  64 us
2 workers, ``--rate 3000``         2,480             419            0.15 cores  61 us
1 worker, ``--rate 6000``          5,330             901            0.33 cores  62 us
=================================  ================  =============  ==========  ==============

(``--rate`` paces each connection; the achieved rate falls a little short of the target because the
pause does not count the response time.) Serving costs nginx about 60 us of CPU per request, mostly
copying the body through the loopback, with one worker or two alike; at saturation the limit is the
two cores that wrk (0.6-0.9 of a core) and the kernel share with nginx, not nginx's worker count. A
downloader that processes a few hundred images per second here therefore costs nginx about 0.02 of a
core. One worker is the default: it leaves the most CPU to the process under test.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.corpus import corpus_dir, load_corpus

DEFAULT_WORKERS = 1
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

CONFIG = """\
# Written by benchmarks/server.py for one run; everything nginx writes stays in this folder.
{user}worker_processes {workers};
pid "{prefix}/nginx.pid";
error_log "{prefix}/error.log" warn;

events {{
    worker_connections 4096;
    multi_accept on;
}}

http {{
    types {{
        image/jpeg jpg jpeg;
        image/png png;
        image/webp webp;
        text/html html htm;
        application/json json;
    }}
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    # A download run opens every file once or a few times; caching the descriptors (and the misses, for
    # the 404s) saves an open() and stat() per request.
    open_file_cache max=50000 inactive=120s;
    open_file_cache_valid 120s;
    open_file_cache_errors on;
    server_tokens off;
    client_body_temp_path "{prefix}/client_body";
    proxy_temp_path "{prefix}/proxy";
    fastcgi_temp_path "{prefix}/fastcgi";
    uwsgi_temp_path "{prefix}/uwsgi";
    scgi_temp_path "{prefix}/scgi";

    server {{
        listen 127.0.0.1:{port};
        server_name _;
        root "{root}";
        location / {{
        }}
        location /noai/ {{
            add_header X-Robots-Tag noai always;
        }}
    }}
}}
"""


def _apt_install(package: str) -> None:
    print(f"{package} is not installed: running apt-get install -y {package}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if subprocess.run([*sudo, "apt-get", "install", "-y", package], env=env, check=False).returncode != 0:
        # A fresh machine may have no package lists yet.
        print("apt-get install failed: running apt-get update and trying again", flush=True)
        subprocess.run([*sudo, "apt-get", "update"], env=env, check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", package], env=env, check=True)


def _ensure_tool(command: str, package: str) -> str:
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        _apt_install(package)
        found = shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise RuntimeError(f"{command} is still missing after installing {package}")
    return found


def ensure_nginx() -> str:
    """Path of the nginx binary, installed from Debian's package first if it is missing."""
    return _ensure_tool("nginx", "nginx")


def ensure_wrk() -> str:
    """Path of the wrk load generator, installed from Debian's package first if it is missing."""
    return _ensure_tool("wrk", "wrk")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int, host: str = "127.0.0.1", path: str = "/") -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGQUIT (graceful), then SIGKILL, to nginx's whole process group; returns once it is gone."""
    pgid = proc.pid  # start_new_session made the master the leader of its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGQUIT)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
    # The master is reaped; its workers must be gone too before the port and folder are given back.
    deadline = time.monotonic() + STOP_TIMEOUT
    while _group_alive(pgid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)
    if _group_alive(pgid):
        print(f"warning: nginx process group {pgid} is still alive", file=sys.stderr)


def _start(nginx: str, root: Path, prefix: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    conf = CONFIG.format(user=root_user(), workers=workers, prefix=prefix, port=port, root=root)
    return launch(nginx, prefix, conf)


def root_user() -> str:
    """As root, nginx would run its workers as "nobody", who may not be allowed to read the corpus."""
    return "user root;\n" if os.geteuid() == 0 else ""


def launch(nginx: str, prefix: Path, config: str) -> subprocess.Popen[bytes]:
    """nginx in the foreground with ``config`` (written to ``prefix``), its error log in ``prefix``."""
    conf = prefix / "nginx.conf"
    conf.write_text(config)
    # A new session: signals sent to the caller's terminal group do not reach nginx, and nginx's
    # workers share a group that can be stopped as one.
    command = [
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    ]
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        # If this process dies without stopping nginx, the kernel sends the master SIGQUIT (a graceful
        # stop that takes the workers along), so a killed benchmark leaves no server behind.
        command = [setpriv, "--pdeathsig", "QUIT", *command]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)


@contextlib.contextmanager
def serve_corpus(
    corpus: str | os.PathLike[str], port: int = 0, workers: int = DEFAULT_WORKERS
) -> Iterator[str]:
    """Serve the corpus folder (or the folder of a corpus.json) on 127.0.0.1; yields the base URL."""
    with _serve(corpus, port, workers) as (base, _master):
        yield base


@contextlib.contextmanager
def _serve(
    corpus: str | os.PathLike[str], port: int, workers: int
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    root = corpus_dir(corpus).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no corpus folder at {root}")
    nginx = ensure_nginx()
    with tempfile.TemporaryDirectory(prefix="img2ds-nginx-") as tmp:
        prefix = Path(tmp)
        proc = None
        # A free port found by binding can be taken before nginx binds it: try a few.
        for _attempt in range(5 if port == 0 else 1):
            chosen = port or free_port()
            proc = _start(nginx, root, prefix, chosen, workers)
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline and not _answers(chosen):
                time.sleep(0.02)
            if proc.poll() is None and _answers(chosen):
                break
            _stop(proc)
            proc = None
        if proc is None:
            log = prefix / "error.log"
            detail = log.read_text() if log.exists() else ""
            raise RuntimeError(f"nginx did not start:\n{detail}")
        try:
            yield f"http://127.0.0.1:{chosen}", proc
        finally:
            _stop(proc)


# --------------------------------------------------------------------------------------------------
# Load test

WRK_SCRIPT = """\
-- Cycle through the corpus's URL paths, one request each, in the order of the list.
local paths = {{}}
for line in io.lines("{paths}") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
{delay}"""
# With --rate, each connection waits this long before each request: connections / rate seconds.
WRK_DELAY = """\
delay = function()
  return {ms}
end
"""


def _nginx_pids(master: int) -> list[int]:
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == master:
                    pids.append(int(entry.name))
    return pids


def _cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def load_test(
    corpus: str | os.PathLike[str],
    *,
    seconds: float = 10.0,
    connections: int = 64,
    threads: int = 1,
    workers: int = DEFAULT_WORKERS,
    rate: float | None = None,
) -> dict[str, Any]:
    """Serve the corpus and hit every one of its URLs in turn with wrk; requests/s and CPU of each side.

    Without ``rate`` wrk sends as fast as it can (the server's ceiling on this machine, where wrk takes
    a core of its own); with it, about ``rate`` requests/s in all, to see what serving that costs.
    """
    wrk = ensure_wrk()
    entries = load_corpus(corpus)
    with (
        tempfile.TemporaryDirectory(prefix="img2ds-wrk-") as tmp,
        _serve(corpus, 0, workers) as (base, master),
    ):
        paths = Path(tmp) / "paths.txt"
        paths.write_text("".join(f"/{e.path}\n" for e in entries))
        script = Path(tmp) / "cycle.lua"
        delay = WRK_DELAY.format(ms=round(1000 * connections / rate, 3)) if rate else ""
        script.write_text(WRK_SCRIPT.format(paths=paths, delay=delay))
        pids = _nginx_pids(master.pid)
        before_nginx = _cpu_seconds(pids)
        before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        out = subprocess.run(
            [
                wrk,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "-s",
                str(script),
                base + "/",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        wall = time.perf_counter() - started
        nginx_cpu = _cpu_seconds(pids) - before_nginx
        after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after_children.ru_utime - before_children.ru_utime) + (
        after_children.ru_stime - before_children.ru_stime
    )
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
    done = re.search(r"(\d+) requests in", out)
    requests = int(done.group(1)) if done else 0
    return {
        "nginx_workers": workers,
        "target_rate": rate,
        "connections": connections,
        "wrk_threads": threads,
        "seconds": round(wall, 2),
        "requests": requests,
        "requests_per_second": float(rps.group(1)) if rps else None,
        "mib_per_second": round(float(transfer.group(1)) * scale[transfer.group(2)], 1) if transfer else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "nginx_cpu_cores": round(nginx_cpu / wall, 3),
        "nginx_cpu_us_per_request": round(1e6 * nginx_cpu / requests, 1) if requests else None,
        "wrk_cpu_cores": round(wrk_cpu / wall, 3),
        "wrk_output": out,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("benchmarks/.corpus"))
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="nginx worker_processes")
    parser.add_argument(
        "--load-test", type=float, metavar="SECONDS", help="run wrk for this long instead of serving"
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--rate", type=float, help="with --load-test: about this many requests/s in all")
    args = parser.parse_args(argv)

    if args.load_test:
        result = load_test(
            args.corpus,
            seconds=args.load_test,
            connections=args.connections,
            threads=args.wrk_threads,
            workers=args.workers,
            rate=args.rate,
        )
        print(result.pop("wrk_output"))
        for key, value in result.items():
            print(f"{key:>20}: {value}")
        return 0
    # SIGTERM stops the server as cleanly as Ctrl-C does; SIGINT is set again because a shell starts
    # background commands with it ignored, and then Python does not install its handler.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with serve_corpus(args.corpus, args.port, args.workers) as base:
        print(base, flush=True)
        print("serving; Ctrl-C stops", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
