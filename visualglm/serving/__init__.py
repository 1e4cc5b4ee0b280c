"""Serving the models: an HTTP API (reference ``api.py`` + OpenAI-compatible) and a Gradio web UI.

FastAPI/uvicorn (extra ``serve``) and Gradio (extra ``web``) are optional: import
:mod:`visualglm.serving.api` or :mod:`visualglm.serving.web` only after :func:`require_extra` said yes.
"""

from __future__ import annotations

import gc
import importlib.util
import logging

EXTRAS = {"serve": ("fastapi", "uvicorn"), "web": ("gradio",)}


def require_extra(extra: str) -> None:
    """Raise a RuntimeError naming the pip extra when one of its packages is not installed."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed: install the extra with "
                           f"pip install 'visualglm[{extra}]'")


def show_logs(level: str = "info") -> None:
    """Print the package's own log records (``visualglm.*``: model loading, the measured prefill chunk,
    failures) at ``level`` and above on stderr, in uvicorn's layout. Without it only warnings show."""
    logger = logging.getLogger("visualglm")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def freeze_startup_objects() -> None:
    """Move every object alive now (the imports, the model's modules, the tokenizer) out of the garbage
    collector's reach, once the model is loaded and before serving starts. A full collection walks every
    tracked object while holding the interpreter lock, and the worker issues the model's ops from Python:
    with the server's imports and a 151M model loaded (326,000 objects) one took 146-165 ms, six decode
    steps of every stream, against 0 ms once they are frozen. CPython runs one once the objects that
    survived younger collections reach a quarter of the long-lived ones: rare in a benchmark of a minute (none
    in a 37-second load run of ``serve_load``'s mix, start-up aside), bound to come in a server that runs
    for days. The objects made while serving are collected as before."""
    gc.collect()
    gc.freeze()
    logging.getLogger("visualglm.serving").info("%d objects of the start-up frozen out of the garbage collector's "
                                                "reach", gc.get_freeze_count())
