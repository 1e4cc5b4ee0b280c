"""The Ray path on a local cluster (``ray.init(num_cpus=2)``): two replicas give the local path's answers,
a restarted job skips the ids already in finished shards, and the command line's ``--ray`` works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'visualglm[ray]')")

from visualglm.batch import BatchSettings, RayOptions, read_results, run_batch, run_batch_on_ray  # noqa: E402
from visualglm.batch.output import ShardWriter  # noqa: E402

from .conftest import vqa_rows, write_rows  # noqa: E402

SETTINGS = BatchSettings(batch_size=4, seed=21, max_new_tokens=16)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_two_replicas_answer_as_the_local_path_and_resume(data_dir: Path, cluster) -> None:
    rows = vqa_rows(48, seed=2) + [{"id": "bad", "image": "missing.png", "prompt": "What shape?"}]
    source = write_rows(data_dir / "rows.jsonl", rows)
    run_batch(source, data_dir / "local.jsonl", settings=SETTINGS, progress=False)
    local = read_results(data_dir / "local.jsonl")

    shards = data_dir / "shards"
    with ShardWriter(shards) as writer:  # a previous run's shard: these ids must not run again
        for row in rows[:10]:
            writer.write({"id": row["id"], "answer": "from the earlier run", "finish_reason": "stop",
                          "prompt_tokens": 0, "completion_tokens": 0})
    summary = run_batch_on_ray(source, shards, settings=SETTINGS, progress=False,
                               options=RayOptions(replicas=2, cpus_per_replica=1, rows_per_task=8))
    assert (summary.rows, summary.skipped, summary.written, summary.errors) == (49, 10, 39, 1)
    on_ray = read_results(shards)
    assert set(on_ray) == set(local)
    earlier = {json.dumps(row["id"]) for row in rows[:10]}
    assert all(on_ray[key]["answer"] == "from the earlier run" for key in earlier)
    assert {key: on_ray[key] for key in on_ray if key not in earlier} == {
        key: local[key] for key in local if key not in earlier}
    assert "missing.png" in on_ray['"bad"']["error"]
    assert not list(shards.glob(".*.tmp")) and len(list(shards.glob("part-*.jsonl"))) >= 2


@pytest.mark.slow
def test_the_command_line_runs_on_ray(data_dir: Path, tmp_path: Path) -> None:
    source = write_rows(data_dir / "rows.jsonl", vqa_rows(12, seed=4))
    run_batch(source, data_dir / "local.jsonl", settings=SETTINGS, progress=False)
    result = subprocess.run([sys.executable, "-m", "visualglm", "batch", str(source), "-o", str(tmp_path / "out"),
                             "--ray", "--replicas", "2", "--batch-size", "4", "--seed", "21",
                             "--max-new-tokens", "16", "--no-progress"],
                            capture_output=True, text=True, timeout=300, check=False,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "RAY_ADDRESS": "",
                                 "RAY_USAGE_STATS_ENABLED": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "12 rows written to" in result.stderr
    assert read_results(tmp_path / "out") == read_results(data_dir / "local.jsonl")
