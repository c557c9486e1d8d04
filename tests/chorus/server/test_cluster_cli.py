"""`chorus serve --replicas`'s flags: mistakes are refused with exit 2 and a message, before Ray starts."""

from __future__ import annotations

from chorus.cli import main

from .conftest import free_port


def test_store_and_ray_address_need_replicas(capsys):
    assert main(["serve", "--store", "redis://127.0.0.1:1/0"]) == 2
    assert "--replicas" in capsys.readouterr().err
    assert main(["serve", "--replicas", "0"]) == 2


def test_a_store_that_is_not_redis_or_cannot_be_reached_is_refused(capsys):
    assert main(["serve", "--replicas", "2", "--store", "postgres://db/0"]) == 2
    assert "expected redis://" in capsys.readouterr().err
    assert main(["serve", "--replicas", "2", "--store", f"redis://127.0.0.1:{free_port()}/0"]) == 2
    assert "cannot reach Redis" in capsys.readouterr().err


def test_an_unknown_model_is_refused_before_ray_starts(capsys, redis_server, tmp_path):
    assert main(["serve", "--replicas", "2", "--store", redis_server.url, "--model", str(tmp_path / "none")]) == 2
    assert "error" in capsys.readouterr().err


def test_placement_flags_are_checked_before_redis_or_ray(capsys):
    for flags, named in (
        (["--dtype", "float8"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--threads", "-1"], "--threads"),
    ):
        assert main(["serve", "--replicas", "2", "--store", "redis://127.0.0.1:1/0", *flags]) == 2
        assert named in capsys.readouterr().err
