"""``visualglm bench``: prefill/decode speed against the machine's memory-bandwidth limit."""

from __future__ import annotations

import argparse

from visualglm.cli.options import add_quant_flags, quantize_also


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="measure prefill/decode speed",
                                 description="Measure time to first token, prefill and decode throughput, "
                                 "peak RSS and the bandwidth-bound decode limit, on a checkpoint or on a "
                                 "named config with random weights.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory to benchmark")
    source.add_argument("--config", default="chatglm-6b",
                        help="named config to build with random weights (default: chatglm-6b)")
    parser.add_argument("--random", action="store_true", help="use random weights for --config (the default "
                        "when no --model is given)")
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default bfloat16)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--compile", action="store_true", help="decode with torch.compile (fixed shapes; on "
                        "CUDA with CUDA graphs, mode reduce-overhead)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--image", action="store_true", help="also time one image encode (VisualGLM-6B, "
                        "GLM-4V-9B)")
    add_quant_flags(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from visualglm.bench import format_result, run_bench

    result = run_bench(args.model, None if args.model else args.config, args.dtype, args.batch,
                       args.prompt_tokens, args.new_tokens, compile=args.compile, quant=args.quant,
                       quant_also=quantize_also(args), device=args.device, image=args.image)
    print(format_result(result, args.json))
    return 0
