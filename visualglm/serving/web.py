"""The web UI (Gradio): image upload, multi-turn chat with streaming, sampling sliders, clear.

Like the reference ``web_demo.py`` / ``web_demo_hf.py``: uploading (or removing) an image starts a new
conversation; sliders for maximum length (prompt + answer), top-p and temperature; "Clear" forgets the
conversation and the image. Generation goes through the same :class:`Worker` as the HTTP API (one model,
waiting requests batched, image encodings reused across turns); a page that is closed, or a Clear pressed
while an answer streams, cancels the job before its next token. Uploaded files are read with the server's byte
and pixel limits.
"""

from __future__ import annotations

import hashlib
import os
import queue
from pathlib import Path
from typing import Any

# Gradio reports usage to its authors unless told not to; a local model server should not phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from visualglm.generation.chat import FAMILY_SAMPLING  # noqa: E402
from visualglm.image import ImageError, load_image  # noqa: E402
from visualglm.serving.protocol import APIError  # noqa: E402
from visualglm.serving.worker import GenerationRequest, QueueFullError, Worker  # noqa: E402

BUSY_MESSAGE = "The server is busy: please try again in a moment."
# System fonts only: the page must render offline (the default theme pulls fonts from the internet).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def _defaults(worker: Worker) -> dict[str, float]:
    """The model's reference sampling defaults, shown on the sliders."""
    sampling = FAMILY_SAMPLING[worker.family]()
    return {"max_length": 8192 if worker.family == "glm4v" else 2048, "top_p": sampling.top_p,
            "temperature": sampling.temperature}


def _read_image(path: str | None, worker: Worker) -> tuple[Any, str | None]:
    """An uploaded file -> (PIL image, hash of its bytes), under the server's limits."""
    if not path:
        return None, None
    limits = worker.limits
    size = Path(path).stat().st_size
    if size > limits.max_image_bytes:
        raise ImageError(f"the image has {size} bytes, more than the {limits.max_image_bytes} allowed")
    data = Path(path).read_bytes()
    image = load_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    return image, hashlib.sha256(data).hexdigest()


def build_demo(worker: Worker, *, seed: int | None = None) -> gr.Blocks:
    """The Gradio app over ``worker`` (started by the caller). ``seed`` makes every answer reproducible."""
    defaults = _defaults(worker)

    def respond(query: str, image_path: str | None, chat: list[dict] | None, history: list | None,
                max_length: float, top_p: float, temperature: float):
        chat, history = list(chat or []), list(history or [])
        if not query or not query.strip():
            yield chat, history, query
            return
        chat += [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        yield chat, history, ""
        try:
            image, key = _read_image(image_path, worker)
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


def launch(worker: Worker, *, host: str = "127.0.0.1", port: int = 8080, share: bool = False,
           seed: int | None = None, block: bool = True) -> gr.Blocks:
    """Serve the web UI; with ``block=False`` return once it is up (tests)."""
    demo = build_demo(worker, seed=seed)
    demo.queue(default_concurrency_limit=4, max_size=max(8, 2 * worker.limits.max_queue))
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=worker.limits.max_image_bytes,
                prevent_thread_lock=not block, theme=THEME, quiet=not block, footer_links=[])
    return demo
