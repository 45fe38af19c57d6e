"""Table ``group_leases``: which caller drives which actor group of a pool (issue #11).

One row per group of a pool (a route's variant, tier, plan and placement), made when a pool
first needs it. A caller owns a group while ``holder`` is its id and ``expires_at`` is in the
future; it renews with its heartbeat, and a caller that dies lets its lease run out. Leasing
touches only the rows of one pool (its primary key), never the whole table.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from farm.db.tables import Base


class GroupLease(Base):
    __tablename__ = "group_leases"

    pool: Mapped[str] = mapped_column(String(200), primary_key=True)  # farm/tasks/group_leases.py pool_key
    replica: Mapped[int] = mapped_column(Integer, primary_key=True)  # the group's g<N>
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)  # caller's id
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    segment_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    leased_at: Mapped[datetime | None] = mapped_column(nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
