"""The web UI (Gradio): image upload, multi-turn chat with streaming, sampling sliders, clear.

Like the reference ``web_demo.py`` / ``web_demo_hf.py``: uploading (or removing) an image starts a new
conversation; sliders for maximum length (prompt + answer), top-p and temperature; "Clear" forgets the
conversation and the image. Generation goes through the same :class:`Worker` as the HTTP API (one model,
waiting requests batched, image encodings reused across turns); a page that is closed, or a Clear pressed
while an answer streams, cancels the job before its next token. Uploaded files are read with the server's byte
and pixel limits.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Gradio reports usage to its authors unless told not to; a local model server should not phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from visualglm.generation.chat import default_max_length, default_sampling  # noqa: E402
from visualglm.image import ImageError  # noqa: E402
from visualglm.serving.protocol import APIError, check_conversation  # noqa: E402
from visualglm.serving.worker import GenerationRequest, QueueFullError, Worker  # noqa: E402

WEB_JSON_BODY_BYTES = 1 << 20
BUSY_MESSAGE = "The server is busy: please try again in a moment."
# System fonts only: the page must render offline (the default theme pulls fonts from the internet).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def _defaults(worker: Worker) -> dict[str, float]:
    """The model's reference sampling defaults, shown on the sliders."""
    sampling = default_sampling(worker.spec)
    return {"max_length": default_max_length(worker.spec), "top_p": sampling.top_p,
            "temperature": sampling.temperature}


def _read_image(path: str | None, worker: Worker, decoding: threading.Semaphore) -> tuple[Any, str | None]:
    """An uploaded file -> (the model's pixel values, hash of its bytes), under the server's limits, while
    holding ``decoding`` (which bounds the decodes running at once)."""
    if not path:
        return None, None
    limits = worker.limits
    size = Path(path).stat().st_size
    if size > limits.max_image_bytes:
        raise ImageError(f"the image has {size} bytes, more than the {limits.max_image_bytes} allowed")
    with decoding:
        return worker.read_image(Path(path).read_bytes())


def make_respond(worker: Worker, seed: int | None = None) -> Callable[..., Iterator[tuple[list, list, str]]]:
    """The UI's answer function (a generator of (chat, history, query box) updates): the API's limits
    first, then the image (at most ``request_threads`` decoded at once), then the streamed answer."""
    decoding = threading.BoundedSemaphore(max(1, worker.limits.request_threads))

    def respond(query: str, image_path: str | None, chat: list[dict] | None, history: list | None,
                max_length: float, top_p: float, temperature: float) -> Iterator[tuple[list, list, str]]:
        chat, history = list(chat or []), list(history or [])
        if not query or not query.strip():
            yield chat, history, query
            return
        try:  # the API's limits, before anything is tokenized
            check_conversation([tuple(turn) for turn in history], query, worker.limits, "query")
        except APIError as exc:
            shown = query if len(query) <= 200 else query[:200] + "..."
            chat += [{"role": "user", "content": shown},
                     {"role": "assistant", "content": f"Error: {exc.message} (press Clear to start over)"}]
            yield chat, history, ""
            return
        chat += [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        yield chat, history, ""
        try:
            image, key = _read_image(image_path, worker, decoding)
        except (ImageError, OSError) as exc:
            chat[-1] = {"role": "assistant", "content": f"Cannot read the image: {exc}"}
            yield chat, history, ""
            return
        sampling: dict[str, Any] = {"top_p": max(float(top_p), 0.01)}
        sampling.update({"do_sample": False} if temperature <= 0 else {"temperature": float(temperature)})
        if seed is not None:
            sampling["seed"] = seed
        request = GenerationRequest(query=query, history=[tuple(turn) for turn in history], image=image,
                                    image_key=key, sampling=sampling, max_length=max(2, int(max_length)),
                                    max_new_tokens=worker.limits.max_new_tokens)
        events: queue.SimpleQueue = queue.SimpleQueue()
        try:
            job = worker.submit(request, events.put)
        except QueueFullError:
            chat[-1] = {"role": "assistant", "content": BUSY_MESSAGE}
            yield chat, history, ""
            return
        except APIError as exc:  # refused at admission (too long a conversation, ...)
            chat[-1] = {"role": "assistant", "content": f"Error: {exc.message}"}
            yield chat, history, ""
            return
        answer = ""
        try:
            while True:
                event = events.get()
                if event.kind == "delta":
                    answer += event.text
                    chat[-1] = {"role": "assistant", "content": answer}
                    yield chat, history, ""
                elif event.kind == "error":
                    chat[-1] = {"role": "assistant", "content": f"Error: {event.error.message}"}
                    yield chat, history, ""
                    return
                elif event.kind == "done":
                    break
            history.append([query, answer])
            yield chat, history, ""
        finally:
            job.cancel.set()  # no-op once done; stops the answer when the page leaves mid-stream

    return respond


def build_demo(worker: Worker, *, seed: int | None = None) -> gr.Blocks:
    """The Gradio app over ``worker`` (started by the caller). ``seed`` makes every answer reproducible."""
    defaults = _defaults(worker)
    respond = make_respond(worker, seed)

    def new_conversation() -> tuple[list, list]:
        return [], []

    def clear_all() -> tuple[list, list, None, str]:
        return [], [], None, ""

    with gr.Blocks(title=f"VisualGLM - {worker.name}") as demo:
        gr.Markdown(f"## VisualGLM web demo: `{worker.name}`")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image Prompt", sources=["upload", "clipboard"],
                                 elem_id="image", visible=worker.multimodal, height=260)
                max_length = gr.Slider(2, defaults["max_length"] * 2, value=defaults["max_length"], step=1,
                                       label="Maximum length", elem_id="max-length")
                top_p = gr.Slider(0.01, 1, value=defaults["top_p"], step=0.01, label="Top P", elem_id="top-p")
                temperature = gr.Slider(0, 1, value=min(defaults["temperature"], 1.0), step=0.01,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="Multi-round conversation", elem_id="chat", height=460)
                query = gr.Textbox(label="Input Text", placeholder="Ask about the image (Enter to send)",
                                   elem_id="query", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
        inputs = [query, image, chatbot, history, max_length, top_p, temperature]
        outputs = [chatbot, history, query]
        sent = send.click(respond, inputs, outputs)
        submitted = query.submit(respond, inputs, outputs)
        # A new (or removed) image starts a new conversation, and stops an answer still streaming.
        image.change(new_conversation, None, [chatbot, history], cancels=[sent, submitted])
        clear.click(clear_all, None, [chatbot, history, image, query], cancels=[sent, submitted])
    return demo


class WebServer:
    """A running web UI (``launch(block=False)``); ``close()`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def launch(worker: Worker, *, host: str = "127.0.0.1", port: int = 8080, share: bool = False,
           seed: int | None = None, block: bool = True) -> WebServer | None:
    """Serve the web UI with the same connection and body limits as the API (:mod:`visualglm.serving.guard`,
    :mod:`visualglm.serving.connections`); with ``block=False`` return a :class:`WebServer` once it is up
    (tests). ``share`` (a public gradio.live link) goes through Gradio's own launcher, which has neither."""
    demo = build_demo(worker, seed=seed)
    limits = worker.limits
    demo.queue(default_concurrency_limit=4, max_size=max(8, 2 * limits.max_queue))
    if share:
        demo.launch(server_name=host, server_port=port, share=True, max_file_size=limits.max_image_bytes,
                    prevent_thread_lock=not block, theme=THEME, quiet=not block, footer_links=[])
        return None
    import uvicorn
    from fastapi import FastAPI

    from visualglm.serving.connections import server_config
    from visualglm.serving.guard import Guard

    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, Any]:  # for monitoring, as the API's
        return {"status": "ok", "model": worker.name, "busy": worker.busy, "queued": worker.queued}

    app = gr.mount_gradio_app(app, demo, path="/", server_name=host, server_port=port, footer_links=[],
                              max_file_size=limits.max_image_bytes, theme=THEME)
    # Gradio's JSON routes carry text and events (images come as uploads) and are parsed on the event loop.
    app.add_middleware(Guard, api_key=None, limits=limits, json_body_bytes=WEB_JSON_BODY_BYTES)
    server = uvicorn.Server(server_config(app, limits, host=host, port=port,
                                          log_level="info" if block else "warning"))
    if block:
        print(f"web UI on http://{host}:{port}/", flush=True)
        server.run()
        return None
    thread = threading.Thread(target=server.run, name="visualglm-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the web UI did not start on {host}:{port}")
        time.sleep(0.02)
    return WebServer(server, thread)
