"""CPU per URL of the fetch layer alone: a Fetcher downloading the corpus from nginx on loopback, with
``--in-flight`` downloads at once in one process, and nothing done with the bodies.

::

    python -m benchmarks.fetch_cpu --corpus benchmarks/.corpus-jpeg-heavy --count 4000 --rounds 3
    PYTHONPATH=/path/to/an/older/checkout python -m benchmarks.fetch_cpu ...   # the same on other code

Reports the process's CPU time (user + system) per URL over each round, the wall time, and, with
``--guard``, the cost of the address guard's per-hop check on a cached host (what every URL pays on
top of the download), in microseconds per call. Its CPU is measured with ``time.process_time`` over
the whole process, so the event loop's thread and getaddrinfo's are all counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.corpus import load_corpus, url_rows
from benchmarks.server import serve_corpus


def measure(urls: Sequence[str], in_flight: int) -> dict[str, float]:
    from img2ds_dagster.engine.fetch import Fetcher
    from img2ds_dagster.engine.settings import FetchSettings

    fetcher = Fetcher(FetchSettings(timeout=10.0))
    try:

        async def run_all() -> int:
            queue = iter(urls)
            failures = 0

            async def worker() -> None:
                nonlocal failures
                for url in queue:
                    if (await fetcher.fetch_async(url)).data is None:
                        failures += 1

            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return failures

        fetcher.run(run_all())  # warm: connections, DNS cache, code paths
        cpu, wall = time.process_time(), time.perf_counter()
        failures = fetcher.run(run_all())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        fetcher.close()
    return {"cpu_ms_per_url": 1000 * cpu / len(urls), "wall_s": wall, "failures": failures}


def guard_cost(calls: int) -> float:
    """Microseconds per ``check_hop`` of a host whose addresses are cached (the common case)."""
    from img2ds_dagster.engine.guard import AddressPolicy, GuardedResolver, Hop

    resolver, hop = GuardedResolver(), Hop(AddressPolicy())

    async def loop() -> float:
        await resolver.check_hop("localhost", 80, hop, False, False)  # fills the cache
        start = time.perf_counter()
        for _ in range(calls):
            await resolver.check_hop("localhost", 80, hop, False, False)
        return (time.perf_counter() - start) / calls * 1e6

    return asyncio.run(loop())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="benchmarks/.corpus-jpeg-heavy")
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guard", action="store_true", help="also time the guard's per-hop check")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    entries = load_corpus(args.corpus)
    results: dict[str, object] = {"count": args.count, "in_flight": args.in_flight, "rounds": []}
    with serve_corpus(args.corpus) as base:
        urls = [url for url, _ in url_rows(entries, base, args.count)]
        for i in range(args.rounds):
            found = measure(urls, args.in_flight)
            results["rounds"].append(found)  # type: ignore[attr-defined]
            print(
                f"round {i}: {found['cpu_ms_per_url']:.3f} CPU ms per URL, {found['wall_s']:.1f} s, "
                f"{found['failures']:.0f} failures",
                flush=True,
            )
    if args.guard:
        results["guard_us_per_check"] = guard_cost(100_000)
        print(f"guard: {results['guard_us_per_check']:.2f} us per check of a cached host")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
