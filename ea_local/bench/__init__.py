"""`ea-local bench`: quality, speed and memory under a KV budget, written as results.json,
report.md and PNG plots (see docs/bench.md)."""
