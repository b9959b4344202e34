"""Which store an app's settings name: the one factory over both engines (`store.ChatStore`, SQLite, and
`store_pg.PostgresStore`, PostgreSQL). Boundary: a choice only; the engines live in their own modules, and this
module sits above both so that neither imports the other.
"""

from __future__ import annotations

import os

from .store import ChatStore, ConversationStore
from .store_pg import open_when_reachable  # psycopg itself is imported only when a PostgreSQL store opens


def open_store(data_dir: str | os.PathLike | None = None, *, database_url: str | None = None, persist: bool = True,
               database_wait_s: float = 0, say=None, **limits) -> ConversationStore:
    """The store an app's settings name: none at all without `persist`; PostgreSQL at `database_url` (shared by
    replicas; `store_pg.check_database_url` says what is accepted), waiting up to `database_wait_s` for an
    unreachable server (`store_pg.open_when_reachable`, reporting through `say`); else SQLite in `data_dir`
    (`ChatStore.open`)."""
    if not persist:
        return ChatStore(None, **limits)
    if database_url:
        return open_when_reachable(database_url, wait_s=database_wait_s, say=say, **limits)
    return ChatStore.open(data_dir, **limits)
