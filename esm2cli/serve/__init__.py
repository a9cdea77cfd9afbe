"""The HTTP server: the FastAPI app and its thin routes (app) over the service that owns readiness, checks, the
per-client cache and the answers (service), the dynamic batcher and its slots, API-key auth, the request guard
(body size, timeouts), connection bounds behind one seam over uvicorn (connections), the OpenAI-style routes,
HTTP error bodies, Prometheus metrics, and POST /search over a search database (search_routes).

May import search (the database /search answers from), runtime, model, io, config and errors; never jobs, api or
cli.
"""
