"""``artrt serve``: the runtime as a local HTTP service (the ``serve`` extra: starlette, uvicorn,
prometheus-client).

It speaks OpenAI's ``POST /v1/images/generations`` (plus artrt's own fields), batches concurrent
requests that share shape and settings into one engine call
(``Pipeline.generate_many(batch=True)``), bounds its queue, request sizes and
time per request (stopping a request past its deadline at its next step), and drains on SIGTERM.
Modules, one job each:

- ``protocol``: the request body into checked generation arguments; responses and error bodies.
- ``limits``: the server's limits on a request (n, pixels, steps, body, queue, deadline).
- ``batching``: the dynamic batcher: a bounded queue and the one worker thread that owns the engines.
- ``metrics``: Prometheus metrics of one server.
- ``service``: loading, warm-up, readiness, submission and drain.
- ``app``: the Starlette application (routes, auth, body limit, lifespan).
- ``server``: uvicorn with drain on SIGTERM / SIGINT.
"""
