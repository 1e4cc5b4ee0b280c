"""Greedy tokens of the golden cases on a GPU in bfloat16 and float16, against the reference's (fp32) tokens.

Prints one JSON object per model, dtype and case: whether the greedy tokens are identical, and the largest
decode-score difference relative to the largest reference score. Never asserts (float32 parity is the
golden test's job: ``VISUALGLM_TEST_DEVICE=cuda pytest tests/test_golden.py``).

    .venv/bin/python -m benchmarks.gpu_golden_dtypes [--golden ../shared/golden] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import visualglm
from visualglm.config import read_config
from visualglm.generation.engine import generate_steps

ROOT = Path(__file__).resolve().parent.parent


def _case_inputs(model, family: str, directory: Path, case: dict, device: torch.device):
    """(prompts, inputs_embeds or None) of one golden case."""
    rows = case["input_ids"]
    if family == "chatglm":
        pad = model.config.pad_token_id
        starts = [next((i for i, t in enumerate(r) if t != pad), len(r)) for r in rows]  # strip left padding
        return [r[start:] for r, start in zip(rows, starts, strict=True)], None
    pixels = load_file(directory / "pixel_values.safetensors")["pixel_values"].to(device)
    with torch.no_grad():
        if family == "visualglm":
            ids = torch.tensor(rows, device=device)
            embeds = model.embed_with_images(ids, model.encode_images(pixels), [case["image_span"][0]])
            return ids.tolist(), embeds
        ids, start = model.expand_image_placeholders(rows[0])
        tokens = torch.tensor([ids], device=device)
        image = model.encode_images(pixels) if start is not None else None
        return [ids], model.embed_with_images(tokens, image, [start])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", default=str(ROOT.parent / "shared" / "golden"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    for directory in sorted(p for p in Path(args.golden).iterdir() if (p / "cases.json").is_file()):
        family = read_config(directory).family
        cases = json.loads((directory / "cases.json").read_text(encoding="utf-8"))["cases"]
        expected = load_file(directory / "expected.safetensors")
        for dtype in ("bfloat16", "float16"):
            model = visualglm.load(directory, dtype=dtype, device=device, progress=False)
            for case in cases:
                record = {"model": directory.name, "dtype": dtype, "case": case["name"]}
                try:
                    want = expected[f"{case['name']}.greedy_new_tokens"].long()
                    scores = expected[f"{case['name']}.decode_scores"]
                    prompts, embeds = _case_inputs(model, family, directory, case, device)
                    steps = list(generate_steps(model, prompts, max_new_tokens=want.shape[1], inputs_embeds=embeds))
                    got = torch.stack([s.tokens for s in steps], dim=1).cpu()
                    record["tokens_identical"] = got.tolist() == want.tolist()
                    got_scores = torch.stack([s.logits for s in steps], dim=1).cpu().float()
                    if got_scores.shape == scores.shape:
                        record["max_score_error_relative"] = ((got_scores - scores).abs().max()
                                                              / scores.abs().max()).item()
                except Exception as exc:  # report and go on with the next case
                    record["error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(json.dumps(record), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
