"""Secrets come from settings and never reach a log: API keys (good, revoked or mistyped),
the Flower password and the database password, in every log the session's services wrote."""

from __future__ import annotations

import httpx
import pytest

from farm.jobs import keys
from tests.conftest import DB_PASSWORD, TMP, api_client

pytestmark = pytest.mark.e2e


def assert_logs_hold_none_of(secrets: list[str], logs: list) -> None:
    assert logs, "no logs to read"
    for log in logs:
        text = log.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{log.name} shows a secret ({secret[:6]}...)"


def test_no_service_logs_a_secret(api_url, flower_url, settings, db_url, api_key):
    record, revoked = keys.create_key(db_url, "default", "to revoke in the secrets test")
    keys.revoke_key(db_url, record.id)
    mistyped = api_key[:-4] + "zzzz"
    with api_client(api_url) as client:  # the key in both headers, failing and succeeding
        assert client.get("/v1/jobs").status_code == 200
        assert httpx.get(f"{api_url}/v1/jobs", headers={"X-API-Key": api_key}).status_code == 200
    for key in (revoked, mistyped):
        with api_client(api_url, key) as client:
            assert client.get("/v1/jobs").status_code == 401
    password = settings.flower_password.get_secret_value()
    assert httpx.get(f"{flower_url}/api/workers", auth=("admin", password)).status_code == 200
    assert httpx.get(f"{flower_url}/api/workers", auth=("admin", password + "x")).status_code == 401
    assert password not in repr(settings)  # settings print their secrets masked
    secrets = [api_key, revoked, mistyped, password]
    if DB_PASSWORD in settings.database_url:  # not when FARM_TEST_PG names another server
        secrets.append(DB_PASSWORD)
    assert_logs_hold_none_of(secrets, sorted(TMP.glob("*.log")))
