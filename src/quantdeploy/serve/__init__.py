"""Serving: an OpenAI-compatible HTTP server with continuous batching, streaming, metrics and
backpressure (``app.py``, ``scheduler.py``, ``metrics.py``, ``schemas.py``). Needs the ``[serve]`` extra;
importing ``quantdeploy`` never imports this package."""
