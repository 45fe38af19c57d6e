import pytest

from farm.settings import Settings


def test_embedded_defaults_need_no_server(tmp_path, monkeypatch):
    for key in ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "STORAGE_URL", "RAY_ADDRESS",
                "MODELS_DIR", "WORK_DIR"):
        monkeypatch.delenv(f"FARM_{key}", raising=False)
    s = Settings(home=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path}/farm.db"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path}/broker.db"
    assert s.storage_url == f"file://{tmp_path}/storage"
    assert s.ray_address == "local" and s.api_host == "127.0.0.1"
    assert s.models_dir == tmp_path / "models"


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("FARM_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("FARM_API_PORT", "9001")
    s = Settings()
    assert s.database_url == "postgresql://u@h/db" and s.api_url.endswith(":9001")


def test_visibility_timeout_must_exceed_hard_limit():
    with pytest.raises(ValueError, match="visibility_timeout_s"):
        Settings(task_time_limit_s=100, visibility_timeout_s=50)
