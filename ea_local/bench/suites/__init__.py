"""The bench suites: quality, speed, memory. Each returns plain dicts for results.json."""
