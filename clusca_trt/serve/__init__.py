"""``clusca-trt serve``: engines behind an HTTP API on Ray Serve, requests batched into the static batch.

    protocol.py   a POST /generate body -> a validated ``GenerateRequest`` (and its batching key);
                  one-line JSON errors. No Ray.
    worker.py     one replica's work: a ``Pipeline`` run by one thread; a batch of compatible
                  requests -> one engine run -> one reply per request; the batcher that forms
                  batches when the engine is free. No Ray.
    app.py        the Ray Serve application: an ``Api`` ingress (the page, validation, admission,
                  errors, /compare) in front of ``Engine`` replicas (Serve's deployments, routing,
                  health checks).
    proxy.py      what Serve's HTTP proxy runs of ours: whole bodies within a time limit (slow
                  clients), its own errors as one line of JSON; the one-line messages. No Ray.
    page.html     GET /: one self-contained page that talks to the JSON API.
    server.py     start Ray (local, or join a cluster), deploy, run until Ctrl-C, shut down.

Ray is an optional dependency (``pip install 'clusca-trt[serve]'``): this package imports it only in
``app.py`` and inside ``server.py``'s functions, so ``import clusca_trt.serve`` works without it.
"""

from __future__ import annotations

from ..errors import BackendUnavailableError

INSTALL_HINT = "pip install 'clusca-trt[serve]'"


def require_ray() -> None:
    """Raise a one-line error saying how to install Ray Serve, where it is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"clusca-trt serve needs Ray Serve, got none ({e}); {INSTALL_HINT}") from None
