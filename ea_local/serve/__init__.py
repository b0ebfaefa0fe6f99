"""`ea-local serve`: an OpenAI-compatible HTTP server whose conversations live in compressed KV caches.

errors.py   OpenAI-shaped error responses
schemas.py  request bodies (pydantic) and their limits
slots.py    the slot pool: one Session per slot, the bounded queue, conversation (prefix) reuse
metrics.py  Prometheus counters and the per-slot gauges
app.py      the FastAPI routes, auth and body-size guard, SSE streaming
server.py   model loading, uvicorn, SIGTERM drain
"""
