"""Where sweeps and searches live: an Optuna RDB storage plus a claim table beside it.

Optuna keeps one trial per attempt: params, value (test loss), the full summary and the
zlib-compressed per-epoch history and probe rows as user attributes. The claim table
``widedeep_claims`` (same database) has one row per grid point x seed, primary key
(study, key). A worker owns a row only after one conditional UPDATE moved it to ``running``
with the worker's token -- atomic on SQLite and PostgreSQL alike -- and renews ``heartbeat``
while it trains; a running row whose heartbeat is older than the grace period belongs to a
lost worker and may be claimed again.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import time
import uuid
import zlib

import optuna
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from widedeep.errors import UserError

CHUNK_CHARS = 60_000  # per user attribute: below MySQL's 64 KiB TEXT, the tightest RDB limit
SQLITE_TIMEOUT_S = 60
TERMINAL = ("complete", "diverged", "failed")
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")

CLAIMS = sa.Table(
    "widedeep_claims", sa.MetaData(),
    sa.Column("study", sa.String(255), primary_key=True),
    sa.Column("key", sa.String(40), primary_key=True),  # sha1 of point + seed
    sa.Column("idx", sa.Integer, nullable=False),  # grid order
    sa.Column("point_key", sa.String(40), nullable=False),  # sha1 of point: seeds share it
    sa.Column("point", sa.Text, nullable=False),  # canonical JSON of the grid values
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending running + TERMINAL
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("token", sa.String(32)),
    sa.Column("worker", sa.String(255)),
    sa.Column("heartbeat", sa.Float),
    sa.Column("trial_number", sa.Integer),
    sa.Column("reason", sa.Text),
)
C = CLAIMS.c


def _immediate_transactions(engine: sa.Engine) -> None:
    """SQLite: take the write lock at BEGIN, so concurrent writers wait instead of failing;
    write-ahead log with synchronous=NORMAL, so a commit costs no fsync.

    NOTE: WAL keeps the database consistent after a crash and lets several processes of one
    machine share it; a power cut may lose the last commits -- at most the trials in flight,
    which the next run re-claims. Never put a SQLite study on a network file system.
    """
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections made before the listeners are dropped


def check_url(url: str) -> str:
    """A database URL; plain ``postgresql://`` gets whichever driver is installed."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in RDB_SCHEMES:
        raise UserError(f"storage must be a database URL ({', '.join(RDB_SCHEMES)}), "
                        f"got {url!r}")
    if scheme == "sqlite" and url.split("://", 1)[1] in ("", "/", "/:memory:"):
        raise UserError(f"storage {url!r} is an in-memory SQLite database, which no other "
                        "connection or worker sees: name a file, sqlite:///path/to/file")
    if url.startswith("postgresql://"):  # SQLAlchemy 2.1 defaults to psycopg (3)
        for driver in ("psycopg", "psycopg2"):
            if importlib.util.find_spec(driver) is not None:
                return url.replace("postgresql://", f"postgresql+{driver}://", 1)
        raise UserError(f"storage {url!r} needs a PostgreSQL driver: "
                        "pip install 'widedeep[postgres]'")
    return url


class Store:
    """One open storage: ``optuna`` (RDBStorage) and ``engine`` for the claim table."""

    def __init__(self, url: str, **optuna_kwargs):
        self.url = url
        self._study_ids: dict[str, int] = {}
        url = check_url(url)
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") \
            else {"pool_pre_ping": True}
        try:
            self.optuna = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **optuna_kwargs)
            self.engine = sa.create_engine(url, **kwargs)
            if url.startswith("sqlite"):
                _immediate_transactions(self.engine)
                _immediate_transactions(self.optuna.engine)
            self._create_table()
        except sa.exc.OperationalError as e:
            self.close()
            first = str(e.orig).strip().splitlines()[0]
            raise UserError(f"cannot open storage {self.url!r}: {first}") from None

    def _create_table(self) -> None:
        try:
            CLAIMS.metadata.create_all(self.engine)
        except sa.exc.DatabaseError:  # another process created it between check and CREATE
            if not sa.inspect(self.engine).has_table(CLAIMS.name):
                raise

    def close(self) -> None:
        for owner in ("optuna", "engine"):
            obj = getattr(self, owner, None)
            if obj is not None:
                (obj.engine if owner == "optuna" else obj).dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ studies and trials

    def study(self, name: str, *, create: bool = False, **kwargs) -> optuna.Study:
        if create:
            return optuna.create_study(study_name=name, storage=self.optuna,
                                       load_if_exists=True, **kwargs)
        try:
            return optuna.load_study(study_name=name, storage=self.optuna, **kwargs)
        except KeyError:
            raise UserError(f"no study named {name!r} in {self.url}") from None

    def study_id(self, name: str) -> int:
        """The storage's id of study ``name`` (asked once: it never changes)."""
        if name not in self._study_ids:
            self._study_ids[name] = self.optuna.get_study_id_from_name(name)
        return self._study_ids[name]

    def trial_id(self, study: optuna.Study, number: int) -> int:
        return self.optuna.get_trial_id_from_study_id_trial_number(
            self.study_id(study.study_name), number)

    # ------------------------------------------------------------------ the claim table

    def add_claims(self, study: str, rows: list[dict]) -> None:
        """Insert pending rows; rows already there (an earlier run) are left as they are."""
        rows = [{"study": study, "state": "pending", "attempts": 0} | r for r in rows]
        dialect = self.engine.dialect.name
        with self.engine.begin() as conn:
            if dialect in ("sqlite", "postgresql"):
                insert = (sqlite if dialect == "sqlite" else postgresql).insert
                for i in range(0, len(rows), 500):
                    conn.execute(insert(CLAIMS).on_conflict_do_nothing(), rows[i:i + 500])
                return
            have = set(conn.execute(sa.select(C.key).where(C.study == study)).scalars())
            new = [r for r in rows if r["key"] not in have]
            if new:
                conn.execute(sa.insert(CLAIMS), new)

    def _claimable(self, study: str, grace_s: float, max_attempts: int):
        stale = sa.and_(C.state == "running", C.heartbeat < time.time() - grace_s)
        return sa.and_(C.study == study, C.attempts < max_attempts,
                       sa.or_(C.state == "pending", stale))

    def claim(self, study: str, worker: str, *, group: int, grace_s: float,
              max_attempts: int) -> tuple[str | None, list[dict]]:
        """Claim up to ``group`` rows of one grid point: (token, rows), or (None, [])."""
        token = uuid.uuid4().hex
        for _ in range(20):  # lost a race for a point: try the next one
            with self.engine.begin() as conn:
                claimable = self._claimable(study, grace_s, max_attempts)
                first = conn.execute(sa.select(C.point_key).where(claimable)
                                     .order_by(C.idx).limit(1)).scalar()
                if first is None:
                    return None, []
                keys = list(conn.execute(sa.select(C.key).where(claimable, C.point_key == first)
                                         .order_by(C.idx).limit(group)).scalars())
                conn.execute(sa.update(CLAIMS).where(claimable, C.key.in_(keys)).values(
                    state="running", token=token, worker=worker, heartbeat=time.time(),
                    attempts=C.attempts + 1))
                rows = conn.execute(sa.select(CLAIMS).where(C.study == study, C.token == token)
                                    .order_by(C.idx)).mappings().all()
            if rows:
                return token, [dict(r) for r in rows]
        return None, []

    def expire_exhausted(self, study: str, grace_s: float, max_attempts: int) -> None:
        """Lost-worker rows with no attempts left become failed, not retried forever."""
        stale = sa.and_(C.study == study, C.state == "running", C.attempts >= max_attempts,
                        C.heartbeat < time.time() - grace_s)
        with self.engine.begin() as conn:
            conn.execute(sa.update(CLAIMS).where(stale).values(
                state="failed", token=None,
                reason=f"worker lost on all {max_attempts} attempts"))

    def heartbeat(self, token: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(CLAIMS).where(C.token == token, C.state == "running")
                         .values(heartbeat=time.time()))

    def update(self, study: str, key: str, owner: str, **values) -> bool:
        """Change a row the token ``owner`` still holds; False when the lease was lost."""
        return self.update_many(study, [(key, owner, values)])[0]

    def update_many(self, study: str, changes: list[tuple[str, str, dict]]) -> list[bool]:
        """:meth:`update` for several (key, owner, values), in one transaction."""
        with self.engine.begin() as conn:
            return [conn.execute(sa.update(CLAIMS).where(
                C.study == study, C.key == key, C.token == owner).values(**values)).rowcount == 1
                for key, owner, values in changes]

    def release(self, token: str) -> None:
        """Give back rows still running under ``token`` (Ctrl-C): this attempt does not count."""
        with self.engine.begin() as conn:
            conn.execute(sa.update(CLAIMS).where(C.token == token, C.state == "running")
                         .values(state="pending", token=None, attempts=C.attempts - 1))

    def rows(self, study: str) -> list[dict]:
        with self.engine.connect() as conn:
            result = conn.execute(sa.select(CLAIMS).where(C.study == study).order_by(C.idx))
            return [dict(r) for r in result.mappings()]

    def counts(self, study: str, worker_prefix: str | None = None) -> dict[str, int]:
        """Rows per state; with ``worker_prefix``, only rows finished by those workers."""
        query = sa.select(C.state, sa.func.count()).where(C.study == study)
        if worker_prefix is not None:
            query = query.where(C.worker.startswith(worker_prefix, autoescape=True))
        with self.engine.connect() as conn:
            return dict(conn.execute(query.group_by(C.state)).all())


# ---------------------------------------------------------------------- large attributes


def blob_attrs(name: str, obj) -> dict[str, object]:
    """The user attributes that store ``obj`` as base64 zlib JSON: ``name`` alone, inline,
    when it fits in one chunk; else ``name.0``, ``name.1``, ... with ``name`` counting them."""
    text = base64.b64encode(zlib.compress(json.dumps(obj).encode(), 6)).decode("ascii")
    meta = {"chunks": 0, "encoding": "zlib+b64"}
    if len(text) <= CHUNK_CHARS:
        return {name: meta | {"data": text}}
    chunks = [text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]
    return {f"{name}.{i}": chunk for i, chunk in enumerate(chunks)} | {
        name: meta | {"chunks": len(chunks)}}


def get_blob(user_attrs: dict, name: str):
    """The object :func:`blob_attrs` stored under ``name`` (None when absent)."""
    meta = user_attrs.get(name)
    if meta is None:
        return None
    text = meta.get("data") or "".join(user_attrs[f"{name}.{i}"] for i in range(meta["chunks"]))
    return json.loads(zlib.decompress(base64.b64decode(text))) if text else None
