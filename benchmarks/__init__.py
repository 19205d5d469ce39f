"""Benchmarks for img2ds_dagster: a web-like photo corpus, a static server for it, and CPU ceilings."""
