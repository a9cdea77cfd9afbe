"""The HTTP server: the FastAPI app and its lifespan (app), the dynamic batcher, API-key auth, the request guard
(body size, timeouts), connection bounds, the OpenAI-style routes, HTTP error bodies and Prometheus metrics.

May import runtime, model, io, config and errors; never jobs, api or cli.
"""
