"""``visualglm finetune``: LoRA, QLoRA or P-tuning v2 on a data file; writes an adapter in peft's layout.

Data: the VisualGLM-6B reference JSON list (``[{"img": ..., "prompt": ..., "label": ...}]``) or chat JSONL
(``{"messages": [{"role": "user", "content": ..., "image": ...}, {"role": "assistant", ...}]}``).
Data-parallel: ``torchrun --nproc-per-node N -m visualglm finetune ...`` (``--batch-size`` is the global
batch, so results match a single process). An interrupted run continues exactly with ``--resume``.
"""

from __future__ import annotations

import argparse
import sys

from visualglm.cli.options import add_hidden_alias


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("finetune", help="fine-tune with LoRA, QLoRA or P-tuning v2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base checkpoint (default: the shipped demo model)")
    parser.add_argument("--data", required=True, help="training data (reference JSON list or chat JSONL)")
    parser.add_argument("--eval-data", help="evaluation data, same formats (default: none)")
    parser.add_argument("--method", choices=("lora", "qlora", "ptuning"), default="lora",
                        help="lora, qlora (LoRA on an INT4 base) or ptuning (P-tuning v2) (default: lora)")
    parser.add_argument("--out", required=True, help="output folder: adapter, checkpoints/, metrics.jsonl, loss.png")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: 300, the reference's)")
    length.add_argument("--epochs", type=float, help="passes over the data instead of --steps")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step, all processes together "
                        "(default: 4)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="samples per forward pass on one process; gradients accumulate up to --batch-size "
                        "(default: --batch-size / processes)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-4; P-tuning 2e-2)")
    parser.add_argument("--warmup", type=float, default=0.02,
                        help="warmup: fraction of the steps, or steps when >= 1 (default: 0.02), then cosine")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: 1)")
    parser.add_argument("--layer-range", type=int, nargs="+", default=None, metavar="I",
                        help="LoRA: language-model layer INDICES to adapt, e.g. `0 14` = layers 0 and 14 "
                        "(default: all)")
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: 10; GLM-4V 8)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 1; GLM-4V 32)")
    parser.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default: 0; GLM-4V 0.1)")
    parser.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                        help="module names (or suffixes / fnmatch patterns) to adapt (default: attention "
                        "query_key_value and dense; GLM-4V query_key_value)")
    bits = parser.add_argument("--quantize", type=int, choices=(4, 8), default=4, dest="quant_bits",
                               help="QLoRA: precision of the frozen base (default: 4)")
    add_hidden_alias(parser, "--quant-bits", bits)  # the earlier spelling
    parser.add_argument("--pre-seq-len", type=int, default=128, help="P-tuning: prefix length (default: 128)")
    parser.add_argument("--prefix-projection", action="store_true", help="P-tuning: two-layer MLP prefix encoder")
    parser.add_argument("--max-source-length", type=int, default=512, help="prompt tokens at most (default: 512)")
    parser.add_argument("--max-target-length", type=int, default=512,
                        help="answer tokens at most, stop token included; longer answers are cut (default: 512)")
    parser.add_argument("--language", choices=("auto", "en", "zh"), default="auto",
                        help="VisualGLM prompt template: Q:/A: (en) or 问：/答： (zh); auto picks per prompt "
                        "like the chat (default: auto)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute decoder blocks in the backward pass (less memory, ~30%% slower)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after N steps with a checkpoint (continue later with --resume)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for adapter init and data order")
    parser.add_argument("--dtype", default=None, help="base model dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu; under torchrun with cuda, one "
                        "GPU per process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    import torch.distributed as dist

    import visualglm
    from visualglm.demo import resolve_model
    from visualglm.finetune.data import load_examples
    from visualglm.finetune.train import TrainConfig, init_distributed, train

    model_path = resolve_model(args.model)
    config = TrainConfig(
        method=args.method, steps=args.steps if args.steps is not None or args.epochs is not None else 300,
        epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        lr=args.lr if args.lr is not None else (2e-2 if args.method == "ptuning" else 1e-4),
        weight_decay=args.weight_decay, warmup=args.warmup, max_grad_norm=args.max_grad_norm,
        activation_checkpointing=args.activation_checkpointing, bf16=args.bf16, eval_every=args.eval_every,
        save_every=args.save_every, seed=args.seed, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=args.target_modules, layer_range=args.layer_range,
        quant_bits=args.quant_bits, pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection,
    ).validate()
    distributed = init_distributed()
    rank = dist.get_rank() if distributed else 0
    device = args.device
    if distributed and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        tokenizer = visualglm.load_tokenizer(model_path)
        model = visualglm.load(model_path, dtype=args.dtype, device=device, progress=rank == 0 and not args.quiet)
        english = {"auto": None, "en": True, "zh": False}[args.language]
        options = {"max_source_length": args.max_source_length, "max_target_length": args.max_target_length,
                   "english": english}
        examples, cut = load_examples(args.data, tokenizer, model.config, **options)
        eval_examples = load_examples(args.eval_data, tokenizer, model.config, **options)[0] if args.eval_data else None
        if rank == 0:
            note = f" ({cut} answer(s) cut to --max-target-length)" if cut else ""
            print(f"{len(examples)} training examples{note}", file=sys.stderr)
        summary = train(model, tokenizer, examples, args.out, config, eval_examples=eval_examples,
                        resume=args.resume, base_model=str(model_path), stop_after=args.stop_after,
                        progress=not args.quiet)
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        share = 100.0 * summary["trainable_parameters"] / max(summary["parameters"], 1)
        done = summary["steps"] == summary["total_steps"]
        print(f"{args.method}: {summary['trainable_parameters']:,} trainable parameters ({share:.3f}% of "
              f"{summary['parameters']:,}); step {summary['steps']}/{summary['total_steps']}, "
              f"loss {summary['loss']:.4f}"
              + (f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "")
              + f", {summary['seconds']:.1f} s", file=sys.stderr)
        print(f"adapter: {args.out}" if done else f"checkpoint in {args.out}/checkpoints (continue with --resume)")
    return 0
