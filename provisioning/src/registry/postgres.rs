//! The PostgreSQL registry, for several provisioning nodes or CA services
//! sharing one registry (`--registry postgres://…`).
//!
//! The schema is the SQLite one in PostgreSQL's types, with the same
//! versions: version 0, then [`super::MIGRATE_V1`] word for word. The same
//! partial unique indexes make a second active certificate for one device
//! impossible whatever the application does.
//!
//! Writers serialize as they do on SQLite: every write transaction first
//! takes one transaction-scoped advisory lock, which another writer waits
//! for (up to `lock_timeout`). The isolation level is READ COMMITTED on
//! purpose: each statement then reads what the previous lock holder
//! committed. (REPEATABLE READ would fix its snapshot at the lock query,
//! before the wait, and read around the other writer's changes.)
//!
//! [`super::Store`] is synchronous, like the commands that use it; sqlx is
//! async, so the store owns a small current-thread runtime and blocks on
//! it. The CA service calls the store from `spawn_blocking`, where that is
//! allowed.

use std::cell::RefCell;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
// Every dynamic statement here is built from constant text and numbered
// placeholders only; values are always bound, hence `AssertSqlSafe`.
use sqlx::{AssertSqlSafe, Connection, Row};
use time::OffsetDateTime;
use tokio::runtime::Runtime;

use super::{
    COLUMNS, CertRecord, Filter, Kind, MIGRATE_V1, MIGRATE_V2, Membership, RawRow, Revocation,
    Store, StoreError, StoreTx, exactly_one, parse_serial, unix,
};
use crate::crl::Scope;
use crate::serial::Serial;

/// Version 0, as SQLite's first schema. `seq` stands for SQLite's rowid:
/// the order of insertion, for records issued in the same second.
const MIGRATE_V0: &str = "
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE certificates (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY,
    serial            TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    name              TEXT NOT NULL,
    identity          TEXT,
    not_before        BIGINT NOT NULL,
    not_after         BIGINT NOT NULL,
    fingerprint       TEXT NOT NULL UNIQUE,
    issued_at         BIGINT NOT NULL,
    revoked_at        BIGINT,
    revocation_reason TEXT,
    der               BYTEA NOT NULL
);
CREATE UNIQUE INDEX one_active_client_cert
    ON certificates (kind, name)
    WHERE revoked_at IS NULL AND kind IN ('device', 'service');
CREATE INDEX certificates_by_name ON certificates (name);
";

const MIGRATIONS: [&str; 3] = [MIGRATE_V0, MIGRATE_V1, MIGRATE_V2];

/// The advisory lock every writer takes (an arbitrary constant: "2fold"
/// in ASCII).
const WRITER_LOCK: i64 = 0x32_666f_6c64;

/// How long a command waits for another writer, as on SQLite.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// How long a call whose work grows with the registry may take: a
/// migration (a large table's new index), or reading every certificate
/// (`list`, `audit`, settling renewals). Reads still get
/// [`ANSWER_TIMEOUT`] for each row ([`fetch_rows`]), so a silent server
/// fails them as soon as it stops answering.
const LONG_CALL: Duration = Duration::from_secs(30 * 60);

/// How long the server may leave one exchange unanswered before the
/// connection counts as dead and is dropped. Without it, a silent network
/// partition (no RST, no FIN) hangs a call for TCP's retransmission time,
/// about 15 minutes, and the CA service with it. Taking the writer lock
/// gets [`LOCK_WAIT`] on top.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// How long connecting may take before the registry counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A registry in a PostgreSQL database.
pub struct PgStore {
    /// `Some` until drop, which shuts it down without blocking (the store
    /// may be dropped inside the CA service's runtime).
    rt: Option<Runtime>,
    options: PgConnectOptions,
    /// `None` after the connection broke; the next use reconnects, so a
    /// long-running CA service outlives a database restart.
    conn: RefCell<Option<PgConnection>>,
}

/// Where a PostgreSQL error came from, for the message.
fn backend(e: sqlx::Error) -> StoreError {
    if is_connection_error(&e) {
        return StoreError::Unavailable(match &e {
            sqlx::Error::Database(db) => db.message().to_owned(),
            _ => e.to_string(),
        });
    }
    if let sqlx::Error::Database(db) = &e {
        // 55P03 lock_not_available: lock_timeout ran out.
        if db.code().as_deref() == Some("55P03") {
            return StoreError::Busy;
        }
        // 28000: pg_hba.conf has no line for this connection; PostgreSQL
        // ends the message with "no encryption" when only TLS would do.
        if db.code().as_deref() == Some("28000") && db.message().ends_with("no encryption") {
            return StoreError::Backend(format!(
                "PostgreSQL: {}: the server takes TLS connections only; add \
                 sslmode=verify-full&sslrootcert=CA-FILE to the registry URL",
                db.message()
            ));
        }
        return StoreError::Backend(format!("PostgreSQL: {}", db.message()));
    }
    StoreError::Backend(e.to_string())
}

/// Why connecting failed. A server certificate that the URL's sslrootcert
/// and host do not verify, or a server without TLS where the URL asks for
/// it, is no outage: retrying will not help, the URL must change. (Only
/// here: a TLS error on an open connection is a connection lost.)
fn connect_error(e: sqlx::Error) -> StoreError {
    let tls = match &e {
        sqlx::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        sqlx::Error::Tls(inner) => inner.downcast_ref::<rustls::Error>(),
        _ => None,
    };
    match (tls, &e) {
        (Some(tls), _) => StoreError::Backend(format!(
            "TLS to the registry database failed: {tls}; check the URL's sslrootcert (the CA that \
             issued the server's certificate) and that its host is a name or address that \
             certificate carries"
        )),
        (None, sqlx::Error::Tls(inner)) => StoreError::Backend(format!(
            "TLS to the registry database failed: {inner}; check sslmode in the registry URL"
        )),
        _ => backend(e),
    }
}

/// An error after which the connection cannot be used again.
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now
        // (starting or shutting down), 57P05 idle_session_timeout; 25P03
        // idle_in_transaction_session_timeout (the server ended the
        // session); class 08, connection exceptions.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08") || c == "25P03"),
        _ => false,
    }
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL; PGPASSWORD
    /// and the other libpq variables fill what it leaves out) and brings
    /// its schema to the current version.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Backend(format!("registry URL: {e}")))?
            .application_name("twofold-provisioning")
            .options([
                ("lock_timeout", format!("{}s", LOCK_WAIT.as_secs())),
                // When this side gives up on a silent server (ANSWER_TIMEOUT)
                // its FIN may never arrive: the server must find the
                // connection dead on its own, or its open transaction
                // would keep the writer lock from every other node.
                (
                    "idle_in_transaction_session_timeout",
                    format!("{}s", ANSWER_TIMEOUT.as_secs() * 2),
                ),
                ("tcp_keepalives_idle", "10".to_owned()),
                ("tcp_keepalives_interval", "5".to_owned()),
                ("tcp_keepalives_count", "3".to_owned()),
                // Keepalives probe a quiet socket only; a backend stuck
                // sending a large result gives up after 25 s unacknowledged.
                ("tcp_user_timeout", "25000".to_owned()),
            ]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot start a runtime: {e}")))?;
        let store = PgStore {
            rt: Some(rt),
            options,
            conn: RefCell::new(None),
        };
        store.migrate()?;
        Ok(store)
    }

    fn rt(&self) -> &Runtime {
        // Taken only in drop.
        self.rt.as_ref().expect("runtime present until drop")
    }

    /// Runs `f` on the connection, connecting first if there is none
    /// (only when `reconnect`: inside a transaction a broken connection is
    /// final, since a new one would run the rest of the transaction's
    /// statements on their own), and forgets a connection that broke. `f`
    /// gets `limit` to finish; past it the connection is dropped and the
    /// call fails as unavailable. The server aborts any transaction on it
    /// when the close reaches it, or (a partition) when its keepalives or
    /// `idle_in_transaction_session_timeout` find the connection dead.
    fn run<T>(
        &self,
        reconnect: bool,
        limit: Duration,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        let mut slot = self.conn.borrow_mut();
        let rt = self.rt();
        if slot.is_none() {
            if !reconnect {
                return Err(StoreError::Unavailable(
                    "the connection broke during the transaction; none of it was recorded".into(),
                ));
            }
            let connect = PgConnection::connect_with(&self.options);
            let conn = rt
                .block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connect).await })
                .map_err(|_| {
                    StoreError::Unavailable(format!(
                        "no answer from {}:{} within {} s",
                        self.options.get_host(),
                        self.options.get_port(),
                        CONNECT_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(connect_error)?;
            *slot = Some(conn);
        }
        let conn = slot.as_mut().expect("connected above");
        match rt.block_on(async { tokio::time::timeout(limit, f(conn)).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    *slot = None;
                }
                Err(backend(e))
            }
            Err(_) => {
                *slot = None;
                Err(StoreError::Unavailable(format!(
                    "no answer from {}:{} within {} s; the connection was dropped",
                    self.options.get_host(),
                    self.options.get_port(),
                    limit.as_secs()
                )))
            }
        }
    }

    /// Brings the schema to the newest version, under the writer lock so
    /// that two nodes starting at once do not both migrate.
    fn migrate(&self) -> Result<(), StoreError> {
        self.run(true, LONG_CALL, async |conn| {
            // READ COMMITTED whatever the server's default: a second
            // node waiting on the lock must see the first one's schema.
            let mut tx = conn
                .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
                .await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITER_LOCK)
                .execute(&mut *tx)
                .await?;
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS twofold_schema (version BIGINT NOT NULL); \
                 INSERT INTO twofold_schema SELECT -1 WHERE NOT EXISTS (SELECT 1 FROM twofold_schema)",
            )
            .execute(&mut *tx)
            .await?;
            let version: i64 = sqlx::query_scalar("SELECT version FROM twofold_schema")
                .fetch_one(&mut *tx)
                .await?;
            for (v, sql) in MIGRATIONS.iter().enumerate().skip((version + 1).max(0) as usize) {
                sqlx::raw_sql(*sql).execute(&mut *tx).await?;
                sqlx::query("UPDATE twofold_schema SET version = $1")
                    .bind(v as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn read_row(row: &PgRow) -> Result<RawRow, sqlx::Error> {
    Ok(RawRow {
        serial: row.try_get(0)?,
        kind: row.try_get(1)?,
        name: row.try_get(2)?,
        identity: row.try_get(3)?,
        not_before: row.try_get(4)?,
        not_after: row.try_get(5)?,
        fingerprint: row.try_get(6)?,
        issued_at: row.try_get(7)?,
        revoked_at: row.try_get(8)?,
        reason: row.try_get(9)?,
        der: row.try_get(10)?,
        replaces: row.try_get(11)?,
    })
}

/// How long the first row of a read may take: the server sorts the whole
/// result before it sends it.
const FIRST_ROW_TIMEOUT: Duration = Duration::from_secs(120);

/// Reads every row of `query`, giving the server [`ANSWER_TIMEOUT`] for
/// each next row ([`FIRST_ROW_TIMEOUT`] for the first) rather than a limit
/// for the whole result: a large registry takes as long as it takes, a
/// silent one fails soon after it stops answering.
async fn fetch_rows(
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    conn: &mut PgConnection,
) -> Result<Vec<RawRow>, sqlx::Error> {
    use futures_util::TryStreamExt as _;
    let mut rows = query.fetch(conn);
    let mut out = Vec::new();
    loop {
        let limit = if out.is_empty() {
            FIRST_ROW_TIMEOUT
        } else {
            ANSWER_TIMEOUT
        };
        match tokio::time::timeout(limit, rows.try_next()).await {
            Ok(Ok(Some(row))) => out.push(read_row(&row)?),
            Ok(Ok(None)) => return Ok(out),
            Ok(Err(e)) => return Err(e),
            // An I/O error: the connection is dropped as broken.
            Err(_) => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {} s; the connection was dropped",
                        limit.as_secs()
                    ),
                )));
            }
        }
    }
}

fn find(store: &PgStore, reconnect: bool, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
    let mut sql = format!("SELECT {COLUMNS} FROM certificates WHERE true");
    let mut args: Vec<String> = Vec::new();
    let mut arg = |column: &str, value: String| {
        args.push(value);
        sql.push_str(&format!(" AND {column} = ${}", args.len()));
    };
    if let Some(kind) = filter.kind {
        arg("kind", kind.as_str().to_owned());
    }
    if let Some(name) = &filter.name {
        arg("name", name.clone());
    }
    if let Some(serial) = &filter.serial {
        arg("serial", serial.to_string());
    }
    if filter.unrevoked_only {
        sql.push_str(" AND revoked_at IS NULL");
    }
    sql.push_str(" ORDER BY issued_at DESC, seq DESC");
    let rows = store.run(reconnect, LONG_CALL, async |conn| {
        let mut query = sqlx::query(AssertSqlSafe(sql.as_str()));
        for a in &args {
            query = query.bind(a);
        }
        fetch_rows(query, conn).await
    })?;
    rows.into_iter().map(RawRow::into_record).collect()
}

fn setting(store: &PgStore, reconnect: bool, key: &str) -> Result<Option<String>, StoreError> {
    store.run(reconnect, ANSWER_TIMEOUT, async |conn| {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
    })
}

impl Store for PgStore {
    type Tx<'a> = PgTx<'a>;

    fn begin(&mut self) -> Result<PgTx<'_>, StoreError> {
        self.run(true, LOCK_WAIT + ANSWER_TIMEOUT, async |conn| {
            sqlx::raw_sql("BEGIN ISOLATION LEVEL READ COMMITTED")
                .execute(&mut *conn)
                .await?;
            let locked = sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITER_LOCK)
                .execute(&mut *conn)
                .await;
            if locked.is_err() {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            }
            locked.map(drop)
        })?;
        Ok(PgTx {
            store: self,
            open: true,
        })
    }

    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
        find(self, true, filter)
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        setting(self, true, key)
    }

    fn memberships(&self) -> Result<Vec<Membership>, StoreError> {
        let rows: Vec<(String, String, String)> = self.run(true, ANSWER_TIMEOUT, async |conn| {
            sqlx::query_as("SELECT grp, kind, name FROM memberships ORDER BY grp, kind, name")
                .fetch_all(&mut *conn)
                .await
        })?;
        rows.into_iter()
            .map(|(group, kind, name)| {
                Ok(Membership {
                    group,
                    kind: kind.parse()?,
                    name,
                })
            })
            .collect()
    }
}

/// An exclusive write transaction on the PostgreSQL registry. Dropped
/// without [`StoreTx::commit`], it rolls back.
pub struct PgTx<'a> {
    store: &'a PgStore,
    open: bool,
}

impl PgTx<'_> {
    /// Runs `f` inside the transaction.
    fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, StoreError> {
        self.store.run(false, ANSWER_TIMEOUT, f)
    }

    /// Runs one statement that changes rows, returning how many.
    fn execute(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64, StoreError> {
        self.run(async |conn| query.execute(&mut *conn).await.map(|r| r.rows_affected()))
    }
}

impl StoreTx for PgTx<'_> {
    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
        find(self.store, false, filter)
    }

    fn insert(&self, r: &CertRecord) -> Result<(), StoreError> {
        // A taken serial is answered by ON CONFLICT, not by an error: on
        // PostgreSQL a failed statement aborts the whole transaction, and
        // the caller retries with a new serial in the same one.
        let sql = format!(
            "INSERT INTO certificates ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (serial) DO NOTHING"
        );
        let query = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(r.serial.to_string())
            .bind(r.kind.as_str())
            .bind(&r.name)
            .bind(&r.identity)
            .bind(unix(r.not_before))
            .bind(unix(r.not_after))
            .bind(&r.fingerprint)
            .bind(unix(r.issued_at))
            .bind(r.revocation.map(|v| unix(v.at)))
            .bind(r.revocation.map(|v| v.reason.as_str()))
            .bind(&r.der)
            .bind(r.replaces.as_ref().map(Serial::to_string));
        // The unique violation is read here, where the record is known.
        let outcome = self.run(async |conn| Ok(query.execute(&mut *conn).await))?;
        match outcome {
            Ok(done) if done.rows_affected() == 0 => {
                Err(StoreError::DuplicateSerial(r.serial.clone()))
            }
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => match db.constraint() {
                Some("certificates_pkey") => Err(StoreError::DuplicateSerial(r.serial.clone())),
                Some("one_active_client_cert" | "one_pending_client_cert") => {
                    Err(StoreError::DuplicateActive {
                        kind: r.kind,
                        name: r.name.clone(),
                    })
                }
                _ => Err(StoreError::Backend(format!("PostgreSQL: {}", db.message()))),
            },
            Err(e) => {
                if is_connection_error(&e) {
                    self.store.conn.borrow_mut().take();
                }
                Err(backend(e))
            }
        }
    }

    fn revoke(&self, serial: &Serial, revocation: Revocation) -> Result<(), StoreError> {
        let changed = self.execute(
            sqlx::query(
                "UPDATE certificates SET revoked_at = $1, revocation_reason = $2 \
                 WHERE serial = $3 AND revoked_at IS NULL",
            )
            .bind(unix(revocation.at))
            .bind(revocation.reason.as_str())
            .bind(serial.to_string()),
        )?;
        exactly_one(changed, serial, "not revocable")
    }

    fn settle(&self, serial: &Serial) -> Result<(), StoreError> {
        let changed = self.execute(
            sqlx::query(
                "UPDATE certificates SET replaces = NULL \
                 WHERE serial = $1 AND replaces IS NOT NULL",
            )
            .bind(serial.to_string()),
        )?;
        exactly_one(changed, serial, "not awaiting commit")
    }

    fn renewal(
        &self,
        kind: Kind,
        name: &str,
        request_id: &str,
    ) -> Result<Option<Serial>, StoreError> {
        let serial: Option<String> = self.run(async |conn| {
            sqlx::query_scalar(
                "SELECT serial FROM renewals WHERE kind = $1 AND name = $2 AND request_id = $3",
            )
            .bind(kind.as_str())
            .bind(name)
            .bind(request_id)
            .fetch_optional(&mut *conn)
            .await
        })?;
        serial.as_deref().map(parse_serial).transpose()
    }

    fn record_renewal(
        &self,
        kind: Kind,
        name: &str,
        request_id: &str,
        serial: &Serial,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO renewals (kind, name, request_id, serial, at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(kind.as_str())
            .bind(name)
            .bind(request_id)
            .bind(serial.to_string())
            .bind(unix(at)),
        )?;
        Ok(())
    }

    fn revoked_unexpired(
        &self,
        scope: Scope,
        now: OffsetDateTime,
    ) -> Result<Vec<CertRecord>, StoreError> {
        let kinds: Vec<String> = scope.kinds().iter().map(|k| k.as_str().into()).collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM certificates WHERE revoked_at IS NOT NULL \
             AND kind = ANY($1) AND not_after > $2 ORDER BY revoked_at, serial"
        );
        let query = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(&kinds)
            .bind(unix(now));
        let rows = self
            .store
            .run(false, LONG_CALL, async |conn| fetch_rows(query, conn).await)?;
        rows.into_iter().map(RawRow::into_record).collect()
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        setting(self.store, false, key)
    }

    fn set_membership(&self, m: &Membership, member: bool) -> Result<bool, StoreError> {
        let sql = if member {
            "INSERT INTO memberships (grp, kind, name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM memberships WHERE grp = $1 AND kind = $2 AND name = $3"
        };
        let changed = self.execute(
            sqlx::query(sql)
                .bind(&m.group)
                .bind(m.kind.as_str())
                .bind(&m.name),
        )?;
        Ok(changed == 1)
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.execute(
            sqlx::query(
                "INSERT INTO settings (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value),
        )?;
        Ok(())
    }

    fn commit(mut self) -> Result<(), StoreError> {
        self.open = false;
        match self.execute(sqlx::query("COMMIT")) {
            // The COMMIT may or may not have reached the server.
            Err(StoreError::Unavailable(e)) => Err(StoreError::CommitUnknown(e)),
            other => other.map(drop),
        }
    }
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // A failed rollback leaves nothing behind either: the server
            // aborts the transaction of a connection that closes.
            if self.execute(sqlx::query("ROLLBACK")).is_err() {
                self.store.conn.borrow_mut().take();
            }
        }
    }
}
