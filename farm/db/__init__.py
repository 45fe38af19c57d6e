"""The database: every table on one ``Base.metadata`` (tables, leases), sessions, migrations."""

from farm.db import leases, tables  # noqa: F401  (registers every table on Base.metadata)
