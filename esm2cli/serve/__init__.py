"""The HTTP server: the FastAPI app and its thin routes (app) over the service that owns readiness, checks, the
per-client cache and the answers (service), the dynamic batcher and its slots, API-key auth, the request guard
(body size, timeouts), connection bounds behind one seam over uvicorn (connections), the OpenAI-style routes,
HTTP error bodies and Prometheus metrics.

May import runtime, model, io, config and errors; never jobs, api or cli.
"""
