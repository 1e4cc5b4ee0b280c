"""``visualglm web``: the Gradio web UI (image upload, streaming multi-turn chat, sampling sliders)."""

from __future__ import annotations

import argparse
import sys

from visualglm.cli.limits import add_limit_flags, limits_from_args
from visualglm.cli.options import add_model_flags, quantize_also
from visualglm.cli.serve import is_loopback


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("web", help="chat with a model in the browser (Gradio web UI)", description=__doc__)
    add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080, as the reference)")
    parser.add_argument("--share", action="store_true",
                        help="also publish a temporary public gradio.live link (needs internet access)")
    parser.add_argument("--seed", type=int, default=None, help="random seed: the same question gets the same "
                        "answer (default: a new sample each time)")
    add_limit_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from visualglm.serving import freeze_startup_objects, require_extra, show_logs

    require_extra("web")
    show_logs("info")
    limits = limits_from_args(args)
    from visualglm.serving.web import launch
    from visualglm.serving.worker import load_worker

    if not is_loopback(args.host) or args.share:
        print("warning: the web UI has no password: anyone who can reach it can use the model", file=sys.stderr)
    worker = load_worker(args.model, dtype=args.dtype, device=args.device, quantize=args.quant,
                         quantize_also=quantize_also(args), adapter=getattr(args, "adapter", None), limits=limits)
    freeze_startup_objects()
    try:
        launch(worker, host=args.host, port=args.port, share=args.share, seed=args.seed)
    finally:
        worker.stop()
    return 0
