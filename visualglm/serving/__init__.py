"""Serving the models: an HTTP API (reference ``api.py`` + OpenAI-compatible) and a Gradio web UI.

FastAPI/uvicorn (extra ``serve``) and Gradio (extra ``web``) are optional: import
:mod:`visualglm.serving.api` or :mod:`visualglm.serving.web` only after :func:`require_extra` said yes.
"""

from __future__ import annotations

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
