"""``visualglm serve``: the HTTP API (reference api.py ``POST /`` and OpenAI-compatible ``/v1``) over one model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from visualglm.cli.limits import add_limit_flags, limits_from_args
from visualglm.cli.options import add_model_flags, add_parallel_flags, quantize_also, relaunch_for_tp


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve a model over HTTP (reference api.py + OpenAI API)",
                                 description=__doc__)
    add_model_flags(parser)
    add_parallel_flags(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080, as the reference)")
    parser.add_argument("--api-key", default=os.environ.get("VISUALGLM_API_KEY"),
                        help="require `Authorization: Bearer KEY` on every route but /health (default: "
                        "$VISUALGLM_API_KEY, else no key)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="let clients pass http(s) image URLs for the server to fetch (public addresses "
                        "only; default: data: URLs and base64 only)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="server log level (default: info)")
    parser.add_argument("--scheduler", choices=("continuous", "static"), default="continuous",
                        help="continuous: requests join and leave the running batch at every step (default); "
                        "static: a batch starts only when the previous one has ended (for comparison)")
    parser.add_argument("--compile", action="store_true",
                        help="decode with torch.compile (fixed shapes; on CUDA with CUDA graphs, one per "
                        "batch-size bucket; slow start); not with --tp")
    add_limit_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from visualglm.serving import freeze_startup_objects, require_extra, show_logs

    require_extra("serve")
    show_logs(args.log_level)
    limits = limits_from_args(args)
    if (status := _relaunch_for_tp(args)) is not None:
        return status
    import uvicorn

    from visualglm.distributed.launch import init_from_env
    from visualglm.serving.api import create_app
    from visualglm.serving.connections import server_config
    from visualglm.serving.worker import Worker, load_model

    # Under torchrun (--tp N relaunches under it): every rank loads its shard; rank 0 serves HTTP and
    # leads, the others follow its batches (visualglm.serving.follower) and print nothing.
    parallel = init_from_env(args.device)
    if parallel is not None and args.compile:
        raise ValueError("--compile is not supported with tensor parallelism")
    if parallel is None or parallel.is_main:
        if not is_loopback(args.host) and not args.api_key:
            print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use the "
                  "model", file=sys.stderr)
    model, tokenizer, name = load_model(args.model, dtype=args.dtype,
                                        device=parallel.device if parallel else args.device,
                                        quantize=args.quant, quantize_also=quantize_also(args),
                                        adapter=getattr(args, "adapter", None), tensor_parallel=parallel is not None)
    if args.compile:
        from visualglm.generation.engine import compile_decode

        compile_decode(model)  # the worker's engine picks it up (visualglm.serving.worker.make_engine)
    channel = None
    if parallel is not None:
        from visualglm.serving.follower import Leader, follow

        if not parallel.is_main:
            freeze_startup_objects()  # a follower's pause would stall every rank's collectives
            follow(model, parallel.device)
            return 0
        channel = Leader(parallel.device)
    worker = Worker(model, tokenizer, name=name, limits=limits, channel=channel, scheduler=args.scheduler)
    app = create_app(worker, api_key=args.api_key, allow_remote_images=args.allow_remote_images)
    freeze_startup_objects()
    return run_beside_http(worker, uvicorn.Server(server_config(app, limits, host=args.host, port=args.port,
                                                                log_level=args.log_level)))


def run_beside_http(worker, server) -> int:
    """Run ``worker`` in this (the main) thread and the uvicorn ``server`` in another until Ctrl-C or
    SIGTERM; then the server shuts down gracefully and the worker stops (under tensor parallelism it also
    tells the other ranks to stop). The model runs in the main thread because that is the thread that
    loaded it: with OpenMP, another thread measured ~40% slower per decode step on a 2-core CPU. Returns
    the exit status: 1 when the server could not start (say, the port is taken)."""
    import signal
    import threading

    def on_signal(*_) -> None:
        server.should_exit = True
        worker.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    def serve_http() -> None:
        try:
            server.run()
        finally:
            worker.request_stop()  # the server ended (shut down, or never started): so does the worker

    http = threading.Thread(target=serve_http, name="visualglm-http", daemon=True)
    http.start()
    try:
        worker.run()
    finally:
        server.should_exit = True
        http.join(10)
    return 0 if server.started else 1


def _relaunch_for_tp(args: argparse.Namespace) -> int | None:
    """``relaunch_for_tp``, except that the launcher passes SIGTERM on to the ranks (a server is stopped by
    signals; the one-shot commands just end)."""
    from visualglm.distributed.launch import launched_by_torchrun, relaunch_forwarding_signals

    if args.tp is None or args.tp == 1 or args.tp < 1 or launched_by_torchrun():
        return relaunch_for_tp(args)  # its checks: --tp < 1, --tp against torchrun's world size
    if args.command not in sys.argv[1:]:
        raise ValueError("--tp relaunches the command line it was given; run `visualglm ...` or use torchrun")
    return relaunch_forwarding_signals(args.tp, sys.argv[1:])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
