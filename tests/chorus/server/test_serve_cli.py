"""`chorus serve` refusals that need no running server, and one server per data dir."""

from __future__ import annotations

import pytest

from chorus import cli


@pytest.fixture(autouse=True)
def keep_pytest_logging(monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)


def test_serve_refuses_a_model_that_is_not_there(tmp_path, capsys):
    code = cli.main(["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "data")])
    assert code == 2
    assert "not 'builtin' and not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--max-queue", "0"], ["--fps", "0"], ["--threads", "-1"], ["--port", "70000"]])
def test_serve_refuses_bad_options(tmp_path, capsys, flag):
    assert cli.main(["serve", "--data-dir", str(tmp_path), *flag]) == 2
    assert "chorus serve: error" in capsys.readouterr().err


def test_one_server_per_data_dir(tiny_engine, tmp_path):
    from chorus.server import create_app
    from chorus.server.app import DataDirBusyError

    app = create_app(tiny_engine, tmp_path, model_id="tiny")
    try:
        with pytest.raises(DataDirBusyError):
            create_app(tiny_engine, tmp_path, model_id="tiny")
    finally:
        app.state.store.close()
        app.state.lock.close()
    again = create_app(tiny_engine, tmp_path, model_id="tiny")  # free again once the first is gone
    again.state.store.close()
    again.state.lock.close()
