"""Output files: whole lines only, what a restart finds done, one writer at a time, shards renamed into place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visualglm.batch.output import AppendWriter, ShardWriter, read_results


def test_lines_reach_the_file_in_chunks_of_flush_rows(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with AppendWriter(path, flush_rows=3, flush_seconds=1e9) as writer:
        for i in range(2):
            writer.write({"id": i, "answer": "x"})
        assert path.read_bytes() == b""  # buffered: not a chunk yet
        writer.write({"id": 2, "answer": "é"})
        assert path.read_text(encoding="utf-8").splitlines()[2] == '{"id": 2, "answer": "é"}'
        writer.write({"id": 3, "error": "bad"})
    assert len(path.read_bytes().splitlines()) == 4  # close() wrote the rest


def test_a_torn_tail_is_cut_and_those_rows_run_again(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a", "answer": "1"}\n{"id": 7, "error": "x"}\n{"id": "b", "ans')
    with AppendWriter(path) as writer:
        assert writer.done_keys() == {'"a"', "7"}
        writer.write({"id": "b", "answer": "2"})
    assert path.read_bytes() == b'{"id": "a", "answer": "1"}\n{"id": 7, "error": "x"}\n{"id": "b", "answer": "2"}\n'


def test_a_file_that_is_not_batch_output_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_bytes(b'{"id": 1}\n{"name": "not ours"}\n')
    with pytest.raises(ValueError, match="notes.jsonl:2: not a batch output line"):
        AppendWriter(path)
    assert path.read_bytes() == b'{"id": 1}\n{"name": "not ours"}\n'


def test_a_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    with AppendWriter(tmp_path / "out.jsonl"):
        with pytest.raises(ValueError, match="another batch run is writing"):
            AppendWriter(tmp_path / "out.jsonl")
    AppendWriter(tmp_path / "out.jsonl").close()  # free again once the first one closed


def test_shards_appear_whole_and_stale_temporaries_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / ".part-old-00001.jsonl.tmp").write_bytes(b'{"id": "half')
    with ShardWriter(folder, flush_rows=2, flush_seconds=1e9) as writer:
        assert not list(folder.glob(".*.tmp"))
        for i in range(5):
            writer.write({"id": i, "answer": str(i)})
        assert len(list(folder.glob("part-*.jsonl"))) == 2
    shards = sorted(folder.glob("part-*.jsonl"))
    assert [len(s.read_bytes().splitlines()) for s in shards] == [2, 2, 1]
    again = ShardWriter(folder)
    assert again.done_keys() == {str(i) for i in range(5)}
    assert read_results(folder)["3"] == {"id": 3, "answer": "3"}
    with pytest.raises(ValueError, match="is a file"):
        ShardWriter(shards[0])


def test_read_results_keeps_the_first_record_of_an_id(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"id": 1, "answer": "a"}, {"id": 1, "answer": "b"}]) + "\n")
    assert read_results(path) == {"1": {"id": 1, "answer": "a"}}
