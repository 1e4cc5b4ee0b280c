"""SwissArmyTransformer (sat) checkpoints of ChatGLM-6B and VisualGLM-6B: read (merging model-parallel
ranks, fixing the QKV row order) and write.

Directory layout (sat ``training/model_io.py``)::

    model_config.json                       sat argument names (see ``config_from_sat``)
    latest                                  text: the iteration to load ("300") or "release"
    <iter>/mp_rank_00_model_states.pt       torch.save({"module": state_dict, ...}), one per
    <iter>/mp_rank_01_model_states.pt       model-parallel rank
    ...

Three things differ from the Hugging Face layout:

1. Tensor names: the family's ``keymaps["sat"]`` (data, ``visualglm.families``).
2. Model-parallel pieces: with N ranks each file holds a slice of the split layers; ``MP_SPLIT_RULES``
   (data) says how each tensor was split by sat's ``mpu`` and so how the pieces go back together.
3. The row order of ChatGLM's fused ``query_key_value``: the HF checkpoint (and our model) interleave it
   per head (``[q_h|k_h|v_h]`` for each head h), sat >= 0.4.1 (2023-07-12, "chatglm model parallel")
   stores it contiguous (``[Q|K|V]``), older sat interleaved like HF. Nothing in the checkpoint records
   which; see ``resolve_qkv_layout`` for what ``qkv_layout="auto"`` can and cannot decide. The ViT and
   Q-Former of VisualGLM always use the contiguous layout, as our modules do.

Loading builds the model on the meta device and assigns tensor by tensor from memory-mapped files; a split
tensor is concatenated from its rank pieces just before assignment, so no second copy of the model exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visualglm.checkpoint.cpu_kernels import apply_cpu_kernels
from visualglm.checkpoint.io import (
    CheckpointError,
    assign_weights,
    build_model,
    check_device,
    preview,
    safe_torch_load,
    target_dtype_for,
)
from visualglm.checkpoint.keymaps import UnknownKeyError, invert, map_key
from visualglm.checkpoint.sat_config import config_from_sat, sat_model_config
from visualglm.checkpoint.staging import staged_directory
from visualglm.config import read_json_object
from visualglm.families import family_spec

QKV_LAYOUTS = ("auto", "contiguous", "interleaved")

_RANK_FILE = re.compile(r"^mp_rank_(\d{2})_model_states\.pt$")

# ---- model-parallel split rules (sat mpu), as data -------------------------------------------------------
# (pattern on the sat key, kind, stride). First match wins; anything else is replicated on every rank.
#   column: ColumnParallelLinear, output rows split; with stride k the rows are k equal blocks (Q|K|V, K|V)
#           each split separately, so rank r stores [block_0 part r | block_1 part r | ...].
#   vocab:  VocabParallelEmbedding, vocabulary rows split. sat uses it only for vocabularies of 1000 or
#           more; smaller ones (the ViT's CLS table, the Q-Former queries) are a replicated nn.Embedding.
#   row:    RowParallelLinear weight, input columns split.
#   same:   RowParallelLinear bias: kept whole and identical on every rank (checked).
# The same names occur in the ChatGLM layers and in VisualGLM's ViT / Q-Former, which are sat transformers
# too; ``attention.dense`` also matches ``cross_attention.dense``.
MP_SPLIT_RULES: tuple[tuple[str, str, int], ...] = (
    (r"(^|\.)attention\.query_key_value\.(weight|bias)$", "column", 3),
    (r"\.cross_attention\.key_value\.(weight|bias)$", "column", 2),
    (r"\.cross_attention\.query\.(weight|bias)$", "column", 1),
    (r"\.mlp\.dense_h_to_4h\.(weight|bias)$", "column", 1),
    (r"(^|\.)lm_head\.weight$", "column", 1),
    (r"(^|\.)word_embeddings\.weight$", "vocab", 1),
    (r"attention\.dense\.weight$", "row", 1),
    (r"\.mlp\.dense_4h_to_h\.weight$", "row", 1),
    (r"attention\.dense\.bias$", "same", 1),
    (r"\.mlp\.dense_4h_to_h\.bias$", "same", 1),
)
_COMPILED_RULES = tuple((re.compile(pattern), kind, stride) for pattern, kind, stride in MP_SPLIT_RULES)
SAT_MIN_PARALLEL_VOCAB = 1000  # sat BaseTransformer: vocab_size < 1000 -> plain (replicated) nn.Embedding

# The ChatGLM layers' fused QKV (not the ViT's / Q-Former's, which live under ``mixins.eva.``).
_LM_QKV = re.compile(r"^transformer\.layers\.\d+\.attention\.query_key_value\.(weight|bias)$")


def split_kind(key: str) -> tuple[str, int]:
    """(kind, stride) of a sat tensor under model parallelism; see ``MP_SPLIT_RULES``."""
    for pattern, kind, stride in _COMPILED_RULES:
        if pattern.search(key):
            return kind, stride
    return "replicated", 1


# ---- QKV row order --------------------------------------------------------------------------------------
def qkv_row_permutation(num_heads: int, head_dim: int, source: str, target: str) -> torch.Tensor:
    """Row indices ``idx`` with ``tensor_in_target_layout = tensor_in_source_layout[idx]``.

    interleaved row ``h*3*hd + s*hd + d``  <->  contiguous row ``s*H*hd + h*hd + d``  (s = q, k, v).
    """
    for layout in (source, target):
        if layout not in ("contiguous", "interleaved"):
            raise ValueError(f"QKV layout must be 'contiguous' or 'interleaved', got {layout!r}")
    rows = torch.arange(3 * num_heads * head_dim)
    if source == target:
        return rows
    if source == "contiguous":  # target position (h, s, d) reads contiguous row s*H*hd + h*hd + d
        return rows.view(3, num_heads, head_dim).transpose(0, 1).reshape(-1)
    return rows.view(num_heads, 3, head_dim).transpose(0, 1).reshape(-1)  # target (s, h, d) <- h*3*hd+s*hd+d


def convert_qkv_layout(tensor: torch.Tensor, num_heads: int, source: str, target: str) -> torch.Tensor:
    """A fused QKV weight ``[3*H*hd, in]`` or bias ``[3*H*hd]`` with its rows reordered."""
    if tensor.shape[0] % (3 * num_heads):
        raise ValueError(f"{tensor.shape[0]} QKV rows do not split into 3 x {num_heads} heads")
    if source == target:
        return tensor
    index = qkv_row_permutation(num_heads, tensor.shape[0] // (3 * num_heads), source, target)
    return tensor.index_select(0, index.to(tensor.device))


# ---- the checkpoint directory (model_config.json <-> our config: visualglm.checkpoint.sat_config) -----------
@dataclass
class SatCheckpoint:
    """What a sat directory holds, before any weight is read."""

    directory: Path
    model_config: dict[str, Any]
    iteration_dir: Path
    rank_files: list[Path]

    @property
    def mp_size(self) -> int:
        return len(self.rank_files)


def open_sat(directory: str | Path) -> SatCheckpoint:
    """Read ``model_config.json`` and ``latest`` and find the rank files; errors name what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    config_path = directory / "model_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no model_config.json: not a sat checkpoint directory")
    model_config = read_json_object(config_path, CheckpointError)
    latest = directory / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{directory} has model_config.json but no 'latest' file (the text file naming "
                              "the iteration directory to load, e.g. '300'): not a complete sat checkpoint")
    tag = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not (tag.isdigit() or tag == "release"):
        raise CheckpointError(f"{latest} must hold an iteration number or 'release', found {tag[:40]!r}")
    iteration_dir = directory / tag
    if not iteration_dir.is_dir() and tag.isdigit():
        iteration_dir = directory / str(int(tag))  # sat writes the number without leading zeros
    if not iteration_dir.is_dir():
        raise CheckpointError(f"{latest} names iteration {tag!r} but {directory / tag} does not exist")
    ranks = {}
    for path in iteration_dir.iterdir():
        match = _RANK_FILE.match(path.name)
        if match:
            ranks[int(match.group(1))] = path
    if not ranks:
        raise CheckpointError(f"no mp_rank_XX_model_states.pt file in {iteration_dir}")
    declared = model_config.get("model_parallel_size")
    count = declared if isinstance(declared, int) and declared > 0 else max(ranks) + 1
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(count) if r not in ranks]
    if missing:
        raise CheckpointError(f"{iteration_dir} is missing model-parallel rank file(s) {', '.join(missing)} "
                              f"(expected {count} rank(s))")
    extra = sorted(r for r in ranks if r >= count)
    if extra:
        raise CheckpointError(f"{iteration_dir} has {len(ranks)} rank files but model_config.json says "
                              f"model_parallel_size {declared}: inconsistent model-parallel ranks")
    return SatCheckpoint(directory, model_config, iteration_dir, [ranks[r] for r in range(count)])


def _read_rank(path: Path) -> dict[str, torch.Tensor]:
    """The ``module`` state dict of one rank file (memory-mapped; other entries, e.g. optimizer or
    iteration bookkeeping, are ignored)."""
    saved = safe_torch_load(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
        found = ", ".join(map(str, list(saved)[:5])) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{path}: expected torch.save({{'module': state_dict}}) (sat layout), found {found}")
    state = saved["module"]
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return state


def resolve_qkv_layout(requested: str, model_config: dict[str, Any], mp_size: int) -> tuple[str, str]:
    """(layout, reason) of the ChatGLM QKV rows. ``requested`` "auto" decides only where it can:

    1. ``model_config.json`` has ``qkv_layout`` (written by our ``save_sat``): it says so.
    2. More than one model-parallel rank: contiguous. sat splits the fused QKV with stride 3 into
       per-rank ``[Q_r|K_r|V_r]``; only the contiguous attention code (sat >= 0.4.1, the commit that
       introduced ChatGLM model parallelism) reads that correctly, so a model-parallel ChatGLM checkpoint
       cannot come from the interleaved era.
    3. ``model_config.json`` has a ``pad_token_id`` key (even null): contiguous. sat saves every
       model-specific argument, and ChatGLM's ``--pad-token-id`` argument arrived in the same release
       (0.4.0 -> 0.4.1) as the switch to the contiguous layout; before, sat hard-coded pad id 3.
       (Assumes the checkpoint was written by a released sat; a git checkout between the two changes, or
       a hand-edited model_config.json, would defeat it.)
    Otherwise it refuses: nothing stored distinguishes an old interleaved checkpoint (e.g. converted
    with sat's transform_param.py before 2023-07-12) from a new one written without ``pad_token_id``, and
    a wrong guess would load without error and produce garbage.
    """
    if requested not in QKV_LAYOUTS:
        raise ValueError(f"qkv_layout must be one of {', '.join(QKV_LAYOUTS)}; got {requested!r}")
    if requested != "auto":
        return requested, "given"
    recorded = model_config.get("qkv_layout")
    if recorded in ("contiguous", "interleaved"):
        return recorded, "recorded in model_config.json"
    if mp_size > 1:
        return "contiguous", f"{mp_size} model-parallel ranks (only sat >= 0.4.1 splits ChatGLM)"
    if "pad_token_id" in model_config:
        return "contiguous", "model_config.json has pad_token_id (written by sat >= 0.4.1)"
    raise CheckpointError(
        "cannot tell the QKV row order of this sat checkpoint: it has one model-parallel rank and its "
        "model_config.json does not show which sat version wrote it. sat before 0.4.1 (2023-07-12) stored "
        "ChatGLM's query_key_value per-head interleaved, later versions contiguous [Q|K|V]; a wrong choice "
        "loads but produces garbage. Pass qkv_layout='interleaved' for checkpoints made before July 2023 "
        "(e.g. the first VisualGLM-6B sat release) or qkv_layout='contiguous' for later ones "
        "(command line: --qkv-layout).")


def detect_qkv_layout(directory: str | Path) -> tuple[str, str]:
    """What ``qkv_layout="auto"`` decides for a sat directory, and why (raises when it cannot decide)."""
    checkpoint = open_sat(directory)
    return resolve_qkv_layout("auto", checkpoint.model_config, checkpoint.mp_size)


# ---- merging model-parallel pieces --------------------------------------------------------------------------
def merge_model_parallel(key: str, pieces: list[torch.Tensor], full_shape: tuple[int, ...] | None = None,
                         where: str = "") -> torch.Tensor:
    """One tensor from its per-rank pieces, following ``MP_SPLIT_RULES``.

    ``full_shape`` is the model's parameter shape, when known: a vocabulary under 1000 rows was kept whole
    on every rank by sat. The merged shape itself is checked by the caller (``assign_weights``)."""
    first = pieces[0]
    if len(pieces) == 1:
        return first
    kind, stride = split_kind(key)
    if kind == "vocab" and full_shape is not None and full_shape[0] < SAT_MIN_PARALLEL_VOCAB:
        kind = "replicated"
    shapes = [tuple(p.shape) for p in pieces]
    if len(set(shapes)) != 1:
        raise CheckpointError(f"{where}: {key} has different shapes on the model-parallel ranks "
                              f"({', '.join(map(str, shapes))}): inconsistent ranks")
    if kind in ("replicated", "same"):
        if kind == "same":
            for rank, piece in enumerate(pieces[1:], start=1):
                if not torch.equal(piece, first):
                    raise CheckpointError(f"{where}: {key} differs between rank 0 and rank {rank} (a "
                                          "row-parallel bias must be identical on every rank): inconsistent ranks")
        return first
    if kind == "row":
        if first.dim() != 2:
            raise CheckpointError(f"{where}: {key} should be a matrix, has shape {shapes[0]}")
        return torch.cat(pieces, dim=1)
    if stride == 1:
        return torch.cat(pieces, dim=0)
    if shapes[0][0] % stride:
        raise CheckpointError(f"{where}: {key} has {shapes[0][0]} rows per rank, not divisible into "
                              f"{stride} blocks")
    blocks = [piece.chunk(stride, dim=0) for piece in pieces]
    return torch.cat([blocks[rank][block] for block in range(stride) for rank in range(len(pieces))], dim=0)


def split_model_parallel(key: str, tensor: torch.Tensor, mp_size: int) -> list[torch.Tensor]:
    """The per-rank pieces sat's mpu stores for a full tensor (inverse of ``merge_model_parallel``)."""
    if mp_size == 1:
        return [tensor]
    kind, stride = split_kind(key)
    if kind == "vocab" and tensor.shape[0] < SAT_MIN_PARALLEL_VOCAB:
        kind = "replicated"
    if kind in ("replicated", "same"):
        return [tensor] * mp_size
    dim = 1 if kind == "row" else 0
    if tensor.shape[dim] % (stride * mp_size):
        raise ValueError(f"{key}: dimension {dim} of size {tensor.shape[dim]} does not split into "
                         f"{mp_size} model-parallel ranks" + (f" x {stride} blocks" if stride > 1 else ""))
    blocks = [block.chunk(mp_size, dim=dim) for block in tensor.chunk(stride, dim=dim)]
    return [torch.cat([blocks[b][rank] for b in range(stride)], dim=dim) for rank in range(mp_size)]


def _merged_tensors(checkpoint: SatCheckpoint, states: list[dict[str, torch.Tensor]], model: nn.Module,
                    keymap: dict, qkv_layout: str, num_heads: int) -> Iterator[tuple[str, str, torch.Tensor]]:
    where = str(checkpoint.rank_files[0] if checkpoint.mp_size == 1
                else checkpoint.iteration_dir / f"mp_rank_00..{checkpoint.mp_size - 1:02d}_model_states.pt")
    keys = list(states[0])
    for rank, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            lacks = sorted(set(keys) - set(state))
            has = sorted(set(state) - set(keys))
            detail = "; ".join(part for part in (lacks and f"lacks {preview(lacks, 4)}",
                                                 has and f"has extra {preview(has, 4)}") if part)
            raise CheckpointError(f"{checkpoint.rank_files[rank]}: {detail} compared with rank 0: "
                                  "inconsistent model-parallel ranks")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    for key in keys:
        try:
            name = map_key(key, keymap)
        except UnknownKeyError:
            yield where, key, states[0][key]  # reported as unexpected by assign_weights
            continue
        if name is None:
            continue  # dropped (rotary buffer, unused position table): never read
        tensor = merge_model_parallel(key, [state[key] for state in states], shapes.get(name), where)
        if qkv_layout == "contiguous" and _LM_QKV.match(key):
            tensor = convert_qkv_layout(tensor, num_heads, "contiguous", "interleaved")
        yield where, key, tensor


def _stored_dtype(state: dict[str, torch.Tensor]) -> str | None:
    tensor = state.get("transformer.word_embeddings.weight")
    if tensor is None:
        tensor = next((t for t in state.values() if t.is_floating_point()), None)
    return None if tensor is None else str(tensor.dtype).removeprefix("torch.")


def _tie_if_equal(model: nn.Module) -> None:
    """sat stores ``lm_head`` separately; when it equals the embedding (as in ChatGLM-6B, whose HF model
    ties them) share one matrix, like the HF checkpoint's config says."""
    config = model.config
    if config.tie_word_embeddings:
        return
    embedding, head = model.get_input_embeddings().weight, model.lm_head.weight
    if embedding.shape == head.shape and embedding.dtype == head.dtype and torch.equal(embedding, head):
        config.tie_word_embeddings = True
        model.tie_weights()


def load_sat(directory: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
             qkv_layout: str = "auto", progress: bool = True, fast_cpu_kernels: bool = True) -> nn.Module:
    """Load a sat checkpoint directory into our model (eval mode, ``.config``, ``.checkpoint_dir``).

    Model-parallel ranks are merged; ChatGLM's QKV rows are brought to our per-head interleaved order
    from ``qkv_layout`` ("contiguous", "interleaved" or "auto", see ``resolve_qkv_layout``). ``dtype`` as
    in ``visualglm.load`` (default: the stored dtype, float16 becoming bfloat16 on CPU; "stored" keeps it).
    """
    if qkv_layout not in QKV_LAYOUTS:
        raise ValueError(f"qkv_layout must be one of {', '.join(QKV_LAYOUTS)}; got {qkv_layout!r}")
    device = check_device(device)
    checkpoint = open_sat(directory)
    where = str(checkpoint.directory / "model_config.json")
    states = [_read_rank(path) for path in checkpoint.rank_files]
    config = config_from_sat(checkpoint.model_config, where=where, torch_dtype=_stored_dtype(states[0]))
    layout, _ = resolve_qkv_layout(qkv_layout, checkpoint.model_config, checkpoint.mp_size)
    model = build_model(config)
    tensors = _merged_tensors(checkpoint, states, model, family_spec(config).keymap("sat"), layout,
                              config.num_attention_heads)
    assign_weights(model, tensors, family_spec(config).keymap("sat"), target_dtype_for(dtype, config, device),
                   device, progress, where=checkpoint.iteration_dir)
    del states, tensors
    model.config = config
    _tie_if_equal(model)
    model.checkpoint_dir = checkpoint.directory
    if fast_cpu_kernels:
        apply_cpu_kernels(model)
    return model.eval()


# ---- writing ------------------------------------------------------------------------------------------------
def _sat_state(model: nn.Module, qkv_layout: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    config = model.config
    to_sat = invert(family_spec(config).keymap("sat"))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = map_key(name, to_sat)
        if key is None:
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if _LM_QKV.match(key):
            tensor = convert_qkv_layout(tensor, config.num_attention_heads, "interleaved", qkv_layout)
        state[key] = tensor
    # What sat itself keeps besides the weights: the rotary buffer (RotaryEmbedding over half a head) and,
    # in the interleaved era, BaseTransformer's unused learned position table. Both are dropped on load.
    rotary_dim = config.head_dim // 2
    state["mixins.chatglm-attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (
        torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    if qkv_layout == "interleaved":
        reference = state["transformer.word_embeddings.weight"]
        state["transformer.position_embeddings.weight"] = torch.zeros(
            config.max_sequence_length, config.hidden_size, dtype=reference.dtype)
    return state


def save_sat(model: nn.Module, directory: str | Path, *, mp_size: int = 1, qkv_layout: str = "contiguous",
             iteration: int = 1, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` in sat's layout, split into ``mp_size`` model-parallel ranks by sat's mpu rules.

    ``qkv_layout`` "contiguous" is what sat >= 0.4.1 writes, "interleaved" what older sat wrote. Files are
    written beside the target and renamed into place, so an interrupted save leaves no partial directory.
    """
    if qkv_layout not in ("contiguous", "interleaved"):
        raise ValueError(f"qkv_layout must be 'contiguous' or 'interleaved'; got {qkv_layout!r}")
    if not isinstance(mp_size, int) or mp_size < 1:
        raise ValueError(f"mp_size must be a positive integer, got {mp_size!r}")
    if model.config.num_attention_heads % mp_size:
        raise ValueError(f"{model.config.num_attention_heads} attention heads do not split into {mp_size} ranks")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace it)")
    state = _sat_state(model, qkv_layout, dtype)
    pieces = {key: split_model_parallel(key, tensor, mp_size) for key, tensor in state.items()}  # views
    directory.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(directory) as staging:
        (staging / str(iteration)).mkdir()
        for rank in range(mp_size):
            # contiguous copies: torch.save of a view would store the whole underlying storage
            module = {key: parts[rank].contiguous().clone() for key, parts in pieces.items()}
            torch.save({"module": module}, staging / str(iteration) / f"mp_rank_{rank:02d}_model_states.pt")
            del module
        (staging / "latest").write_text(str(iteration))
        data = sat_model_config(model.config, mp_size=mp_size, qkv_layout=qkv_layout)
        (staging / "model_config.json").write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n")
    return directory


__all__ = [
    "MP_SPLIT_RULES", "QKV_LAYOUTS", "SatCheckpoint", "config_from_sat", "convert_qkv_layout",
    "detect_qkv_layout", "load_sat", "merge_model_parallel", "open_sat", "qkv_row_permutation",
    "resolve_qkv_layout", "sat_model_config", "save_sat", "split_kind", "split_model_parallel",
]
