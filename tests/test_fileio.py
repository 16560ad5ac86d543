"""JSON-lines appends survive a torn last line (a crash or a full disk mid-write)."""
from __future__ import annotations

from harness.fileio import append_jsonl, read_jsonl


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"step": 2}\n{"step": 4, "frechet')  # the step-4 row was cut off: no newline
    append_jsonl(path, {"step": 8})
    assert read_jsonl(path) == [{"step": 2}, {"step": 8}]
    assert path.read_text().endswith('"frechet\n{"step": 8}\n')


def test_append_adds_no_blank_line_to_an_intact_or_new_file(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    append_jsonl(path, {"a": 1})  # created, with its folder
    append_jsonl(path, {"a": 2})
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    append_jsonl(empty, {"b": 1})
    assert empty.read_bytes() == b'{"b": 1}\n'
