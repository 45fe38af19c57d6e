"""Projects' API keys: random, shown once, stored as a sha256 (farm keys create/list/revoke).

A key reads ``farm_<id>_<secret>``: the id finds the row, the secret's hash is compared in
constant time. 32 random bytes of secret: a stored hash is useless without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select, update

from farm.db.tables import ApiKey, utcnow
from farm.db.session import session_scope

PREFIX = "farm_"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(db_url: str, project: str, name: str = "") -> tuple[ApiKey, str]:
    """-> (the record, the key in clear: shown once, never stored)."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    record = ApiKey(id=key_id, project=project, name=name, sha256=_hash(secret),
                    created_at=utcnow())
    with session_scope(db_url) as session:
        session.add(record)
    return record, f"{PREFIX}{key_id}_{secret}"


def list_keys(db_url: str, project: str | None = None) -> list[ApiKey]:
    with session_scope(db_url) as session:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if project:
            query = query.where(ApiKey.project == project)
        return list(session.scalars(query))


def revoke_key(db_url: str, key_id: str) -> bool:
    with session_scope(db_url) as session:
        return session.execute(update(ApiKey).where(ApiKey.id == key_id,
                                                    ApiKey.revoked_at.is_(None))
                               .values(revoked_at=utcnow())).rowcount == 1


def project_of(db_url: str, key: str) -> str | None:
    """The project of a valid, unrevoked key; None otherwise."""
    if not key.startswith(PREFIX) or key.count("_") < 2:
        return None
    key_id, _, secret = key[len(PREFIX):].partition("_")
    with session_scope(db_url) as session:
        record = session.get(ApiKey, key_id)
    if record is None or record.revoked_at is not None:
        return None
    return record.project if hmac.compare_digest(record.sha256, _hash(secret)) else None
