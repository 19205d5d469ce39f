"""What politeness costs, on a corpus served as many hosts: img2dataset, and img2ds_dagster with its
politeness off and on (``download()``, and the Dagster path with it on), side by side.

::

    python -m benchmarks.polite --corpus benchmarks/.corpus-jpeg-heavy --count 10000 --rounds 3 \\
        --json benchmarks/results/polite_10k.json

One nginx serves the corpus on ``--hosts`` loopback addresses (127.0.0.2, 127.0.0.3, ...), each a host
of its own, and the URL list spreads over them with a Zipf-like share (host k gets a share
proportional to 1 / k ** 0.5: the top host about 7% of the URLs with 64 hosts, as in LAION-style
lists). Most hosts have a robots.txt: a few disallow ``/img/001/`` (a known set of corpus images), one
answers 503, one 404, the last quarter have none; two hosts answer 429 with ``Retry-After: 1`` to a
tenth of their requests. Each connection is served at 4 MB/s, so that downloads take a while and
overlap as they do on the internet. From nginx's access log, each run reports the most requests in flight at
once to one host, the busiest host's peak requests per second, and the 429s served; from the shards'
stats, the samples each opt-out kind refused. "Off" is img2ds_dagster with every site signal but
X-Robots-Tag (which img2dataset also honours) turned off and no cap per host below ``thread_count``;
the pause of a host that answers 429 twice in a row cannot be turned off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import corpus_dir, load_corpus, url_rows
from benchmarks.measure import machine, run_measured
from benchmarks.server import _answers, _stop, ensure_nginx, free_port, launch, root_user
from benchmarks.side_by_side import ROOT, SETTLE_SECONDS, command, ensure_img2dataset, outcome

DISALLOWED = "/img/001/"
OFF = {
    "respect_robots_txt": False,
    "respect_tdm_reservation": False,
    "respect_content_usage": False,
    "respect_xmp_data_mining": False,
    "max_connections_per_host": 100_000,
    "host_failure_limit": 0,
}
TOOLS = {  # name -> (the command's tool, its options on top of the common ones)
    "img2dataset": ("img2dataset", {}),
    "off": ("download", OFF),
    "on": ("download", {}),
    "dagster_on": ("dagster", {}),
    # Politeness on but for the cap of connections per host: what the cap costs (not run by default).
    "on_uncapped": ("download", {"max_connections_per_host": 100_000}),
}
DEFAULT_TOOLS = "img2dataset,off,on,dagster_on"
# The options every tool gets (distributors.py uses them too).
COMMON: dict[str, Any] = {
    "image_size": 256,
    "resize_mode": "border",
    "output_format": "webdataset",
    "encode_format": "jpg",
    "encode_quality": 95,
    "number_sample_per_shard": 1000,
    "processes_count": 2,
    "thread_count": 64,
    "input_format": "parquet",
    "caption_col": "caption",
    "timeout": 10,
}

CONFIG = """\
{user}worker_processes 1;
pid "{prefix}/nginx.pid";
error_log "{prefix}/error.log" warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    types {{ image/jpeg jpg jpeg; image/png png; image/webp webp; text/html html; }}
    default_type application/octet-stream;
    log_format polite '$msec $request_time $server_addr $status $request_uri';
    access_log "{prefix}/access.log" polite;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    # 4 MB/s per connection: a download takes a while, as on the internet, so requests in flight
    # overlap and the server can see them (a 100 KB image in 25 ms).
    limit_rate 4m;
    open_file_cache max=50000 inactive=120s;
    open_file_cache_errors on;
    server_tokens off;
    client_body_temp_path "{prefix}/client_body";
    proxy_temp_path "{prefix}/proxy";
    fastcgi_temp_path "{prefix}/fastcgi";
    uwsgi_temp_path "{prefix}/uwsgi";
    scgi_temp_path "{prefix}/scgi";
    split_clients "${{request_id}}" $limited {{ 10% 1; * ""; }}
{servers}
}}
"""
LIMIT = "if ($limited) { add_header Retry-After 1 always; return 429; }"
# The hosts (by rank: 0 has the most URLs) that answer 10% of their requests with a 429 and
# Retry-After: 1, whatever the rate. Two in a row pause the host for a second (about one answer in a
# hundred); pausing it at each one held such a host to about max_connections_per_host requests a
# second, and on 10,000 URLs the 2nd and 6th hosts' ~760 requests set the run's length.
RATE_LIMITED = (1, 5)
SERVER = """\
    server {{
        listen {address}:{port};
        root "{root}";
        location = /robots.txt {{ {robots} }}
        location / {{ {limit} }}
        location /noai/ {{ add_header X-Robots-Tag noai always; }}
    }}
"""


def host_plan(hosts: int, rate_limited: tuple[int, ...] = RATE_LIMITED) -> dict[int, dict[str, Any]]:
    """What each host does: its robots.txt and whether it rate-limits."""
    plan: dict[int, dict[str, Any]] = {}
    for h in range(hosts):
        robots: str | int
        if h in (3, 7, 11, 15):
            robots = f"User-agent: *\nDisallow: {DISALLOWED}\n"
        elif h == 20:
            robots = 503
        elif h == 21 or h >= hosts * 3 // 4:
            robots = 404
        else:
            robots = "User-agent: *\nAllow: /\n"
        plan[h] = {"robots": robots, "limited": h in rate_limited}
    return plan


def address(h: int) -> str:
    return f"127.0.0.{2 + h}"


@contextlib.contextmanager
def serve_hosts(
    corpus: Path, hosts: int, rate_limited: tuple[int, ...] = RATE_LIMITED
) -> Iterator[tuple[int, Path, dict[int, dict[str, Any]]]]:
    """nginx on ``hosts`` loopback addresses; yields the port, the access log and the plan."""
    nginx = ensure_nginx()
    plan = host_plan(hosts, rate_limited)
    with tempfile.TemporaryDirectory(prefix="img2ds-polite-") as tmp:
        prefix = Path(tmp)
        port = free_port()
        servers = []
        for h, what in plan.items():
            robots = what["robots"]
            if isinstance(robots, int):
                rule = f"return {robots};"
            else:
                (prefix / f"robots-{h}.txt").write_text(robots)
                rule = f'alias "{prefix}/robots-{h}.txt";'
            limit = LIMIT if what["limited"] else ""
            servers.append(
                SERVER.format(address=address(h), port=port, root=corpus, robots=rule, limit=limit)
            )
        proc = launch(nginx, prefix, CONFIG.format(user=root_user(), prefix=prefix, servers="".join(servers)))
        try:
            deadline = time.monotonic() + 10
            while (
                proc.poll() is None
                and time.monotonic() < deadline
                and not _answers(port, address(0), "/robots.txt")
            ):
                time.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError((prefix / "error.log").read_text())
            yield port, prefix / "access.log", plan
        finally:
            _stop(proc)


def url_list(corpus: Path, port: int, hosts: int, count: int, out: Path) -> list[int]:
    """The URL list, spread over the hosts (Zipf-like); returns each row's host."""
    entries = load_corpus(corpus)
    rows = url_rows(entries, "", count)
    weights = 1 / np.arange(1, hosts + 1) ** 0.5
    owner = np.random.default_rng(1).choice(hosts, size=count, p=weights / weights.sum())
    urls = [f"http://{address(int(h))}:{port}{path}" for (path, _), h in zip(rows, owner, strict=True)]
    pq.write_table(pa.table({"url": urls, "caption": [c for _, c in rows]}), out)
    return [int(h) for h in owner]


def log_lines(log: Path, offset: int) -> list[tuple[float, float, str, int, str]]:
    lines = []
    with log.open("rb") as f:
        f.seek(offset)
        for raw in f.read().decode(errors="replace").splitlines():
            end, took, host, status, uri = raw.split(" ", 4)
            lines.append((float(end) - float(took), float(end), host, int(status), uri))
    return lines


def server_view(lines: list[tuple[float, float, str, int, str]]) -> dict[str, Any]:
    """Most requests in flight to one host, the busiest host's peak requests in one second."""
    events: dict[str, list[tuple[float, int]]] = defaultdict(list)
    per_second: Counter[tuple[str, int]] = Counter()
    for start, end, host, _, _ in lines:
        events[host] += [(start, 1), (end, -1)]
        per_second[(host, int(start))] += 1
    most = {}
    for host, marks in events.items():
        now = peak = 0
        for _, step in sorted(marks, key=lambda m: (m[0], m[1])):
            now += step
            peak = max(peak, now)
        most[host] = peak
    requests = Counter(host for _, _, host, _, _ in lines)
    top = requests.most_common(1)[0][0] if requests else ""
    return {
        "requests": len(lines),
        "max_in_flight_one_host": max(most.values(), default=0),
        "busiest_host_share": requests[top] / max(1, len(lines)),
        "busiest_host_peak_requests_per_second": max(
            (n for (h, _), n in per_second.items() if h == top), default=0
        ),
        "peak_requests_per_second_one_host": max(per_second.values(), default=0),
        "robots_txt_requests": sum(1 for *_, uri in lines if uri == "/robots.txt"),
        "status_429_served": sum(1 for _, _, _, status, _ in lines if status == 429),
    }


def refusals(out: Path) -> dict[str, int]:
    found: Counter[str] = Counter()
    for stats in out.glob("*_stats.json"):
        found.update(json.loads(stats.read_text()).get("opt_outs", {}))
    return dict(sorted(found.items()))


def disallowed_downloaded(out: Path, plan: dict[int, dict[str, Any]]) -> int:
    """Successes that the hosts' robots.txt disallow (img2dataset does not read it): the disallowed
    path on the hosts whose robots.txt names it, and everything on the host whose robots.txt is a
    503."""
    refusing = {
        address(h) for h, p in plan.items() if isinstance(p["robots"], str) and "Disallow" in p["robots"]
    }
    closed = {address(h) for h, p in plan.items() if p["robots"] == 503}
    count = 0
    for path in out.glob("*.parquet"):
        for row in pq.read_table(path, columns=["url", "status"]).to_pylist():
            host = row["url"].split("/")[2].split(":")[0]
            disallowed = host in closed or (host in refusing and DISALLOWED in row["url"])
            count += row["status"] == "success" and disallowed
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(ROOT / ".corpus-jpeg-heavy"))
    parser.add_argument("--work", default=str(ROOT / ".work"))
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--hosts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tools", default=DEFAULT_TOOLS, help=f"some of {', '.join(TOOLS)}")
    parser.add_argument(
        "--rate-limited",
        default=",".join(map(str, RATE_LIMITED)),
        help="the ranks of the hosts that answer 10%% of requests with a 429 (empty: none)",
    )
    parser.add_argument("--img2dataset-venv", default=str(ROOT / ".venv-img2dataset"))
    parser.add_argument("--json")
    args = parser.parse_args()
    corpus = corpus_dir(args.corpus).resolve()
    work = Path(args.work) / "polite"
    work.mkdir(parents=True, exist_ok=True)
    names = args.tools.split(",")
    python = ensure_img2dataset(Path(args.img2dataset_venv)) if "img2dataset" in names else Path()
    runs: list[dict[str, Any]] = []
    rate_limited = tuple(int(h) for h in args.rate_limited.split(",") if h)
    with serve_hosts(corpus, args.hosts, rate_limited) as (port, log, plan):
        urls = work / "urls.parquet"
        owners = url_list(corpus, port, args.hosts, args.count, urls)
        shares = Counter(owners)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                tool, extra = TOOLS[name]
                out = work / name
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                time.sleep(SETTLE_SECONDS)
                offset = log.stat().st_size if log.exists() else 0
                options = {**COMMON, **extra, "url_list": str(urls), "output_folder": str(out)}
                env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
                measured = run_measured(command(tool, options, python), env=env, cwd=ROOT.parent)
                if measured.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{measured.output}")
                time.sleep(0.5)  # nginx writes a log line once the response is sent
                counts = outcome(out)
                run = {
                    "tool": name,
                    "round": round_,
                    "wall_seconds": measured.wall_seconds,
                    "cpu_seconds": measured.cpu_seconds,
                    "peak_rss_mb": measured.peak_rss_mb,
                    "successes": counts["success"],
                    "images_per_second": counts["success"] / measured.wall_seconds,
                    "rows_per_second": sum(counts.values()) / measured.wall_seconds,
                    "opt_outs": refusals(out),
                    "robots_disallowed_downloaded": disallowed_downloaded(out, plan),
                    "server": server_view(log_lines(log, offset)),
                }
                runs.append(run)
                print(
                    f"round {round_} {name:<12} {run['images_per_second']:6.1f} images/s "
                    f"{counts['success']} ok, opt-outs {run['opt_outs']}, "
                    f"max in flight to a host {run['server']['max_in_flight_one_host']}, "
                    f"busiest host {run['server']['busiest_host_peak_requests_per_second']} req/s, "
                    f"429s {run['server']['status_429_served']}",
                    flush=True,
                )
    summary = {}
    baseline = {r["round"]: r for r in runs if r["tool"] == "img2dataset"}
    for name in names:
        mine = [r for r in runs if r["tool"] == name]
        ratios = [
            r["images_per_second"] / baseline[r["round"]]["images_per_second"] for r in mine if baseline
        ]
        summary[name] = {
            "images_per_second_median": statistics.median(r["images_per_second"] for r in mine),
            "rows_per_second_median": statistics.median(r["rows_per_second"] for r in mine),
            "successes": mine[-1]["successes"],
            "opt_outs": mine[-1]["opt_outs"],
            "cpu_ms_per_image_median": statistics.median(
                1000 * r["cpu_seconds"] / max(1, r["successes"]) for r in mine
            ),
            "ratio_to_img2dataset": [min(ratios), statistics.median(ratios), max(ratios)] if ratios else None,
            "max_in_flight_one_host": max(r["server"]["max_in_flight_one_host"] for r in mine),
        }
    if "on" in summary and "off" in summary:
        summary["politeness_cost"] = (
            1 - summary["on"]["images_per_second_median"] / summary["off"]["images_per_second_median"]
        )
    for name, row in summary.items():
        print(name, json.dumps(row))
    if args.json:
        result = {
            "machine": machine(),
            "hosts": args.hosts,
            "count": args.count,
            "top_host_share": max(shares.values()) / args.count,
            "rate_limited_hosts": list(rate_limited),
            "plan": {address(h): p for h, p in plan.items()},
            "runs": runs,
            "summary": summary,
        }
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
