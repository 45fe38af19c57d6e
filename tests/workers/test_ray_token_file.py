"""FARM_RAY_AUTH_TOKEN_FILE (issue #14): the one token file a head and every host's nodes
and drivers share; it becomes Ray's RAY_AUTH_TOKEN_PATH, and a head writes it if absent."""

from __future__ import annotations

import os
import stat

from farm.settings import Settings
from workers import ray_cluster


def test_the_token_file_setting_becomes_rays_token_path_and_is_written_once(tmp_path,
                                                                            monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token = tmp_path / "shared" / "ray-auth-token"
    monkeypatch.setenv("FARM_RAY_AUTH_TOKEN_FILE", str(token))
    settings = Settings()
    assert settings.ray_auth_token_file == token
    ray_cluster.quiet_ray_env("127.0.0.1", settings.ray_auth_token_file)
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert ray_cluster.ensure_auth_token() == token
    first = token.read_text()
    assert len(first) == 64 and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert ray_cluster.ensure_auth_token() == token and token.read_text() == first  # kept


def test_without_the_setting_rays_own_token_path_is_left_alone(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/elsewhere/token")
    monkeypatch.delenv("FARM_RAY_AUTH_TOKEN_FILE", raising=False)
    ray_cluster.quiet_ray_env("127.0.0.1", Settings().ray_auth_token_file)
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == "/elsewhere/token"
