"""Benchmark scripts never overwrite a result file that was there before they ran."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402


def test_an_existing_result_file_is_kept_and_the_new_one_goes_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_TARGETS", {})
    old = tmp_path / "results.json"
    old.write_text('{"rows": ["an earlier run"]}')
    first = common.write_json(old, {"rows": [1]})
    again = common.write_json(old, {"rows": [1, 2]})        # the same run writing as it goes
    assert first == again == tmp_path / "results-2.json"
    assert json.loads(old.read_text()) == {"rows": ["an earlier run"]}
    assert json.loads(again.read_text())["rows"] == [1, 2]
    assert common.write_json(old, {"rows": [3]}, extends=True) == tmp_path / "results-2.json"
    monkeypatch.setattr(common, "_TARGETS", {})
    assert common.write_json(old, {"rows": ["read", "and more"]}, extends=True) == old     # a resumed run
    assert common.unused_path(old) == tmp_path / "results-3.json"
    (tmp_path / "autobot-0.5").mkdir()
    assert common.unused_path(tmp_path / "autobot-0.5") == tmp_path / "autobot-0.5-2"


def test_bad_input_exits_with_code_2(capsys):
    with pytest.raises(SystemExit) as stop:
        common.refuse("pass --data the shared data folder")
    assert stop.value.code == 2 and "pass --data" in capsys.readouterr().err
