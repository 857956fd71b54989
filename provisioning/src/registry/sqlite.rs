//! The SQLite registry: one file in the PKI directory.
//!
//! Writers take SQLite's write lock at `BEGIN IMMEDIATE` and other
//! processes wait for it (busy timeout), so concurrent commands serialize.
//! A partial unique index makes a second active certificate for one device
//! impossible even if application logic were wrong.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{
    COLUMNS, CertRecord, Filter, Kind, MIGRATE_V1, MIGRATE_V2, Membership, RawRow, Revocation,
    Store, StoreError, StoreTx, exactly_one, parse_serial, unix,
};
use crate::crl::Scope;
use crate::serial::Serial;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial            TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    name              TEXT NOT NULL,
    identity          TEXT,
    not_before        INTEGER NOT NULL,
    not_after         INTEGER NOT NULL,
    fingerprint       TEXT NOT NULL UNIQUE,
    issued_at         INTEGER NOT NULL,
    revoked_at        INTEGER,
    revocation_reason TEXT,
    der               BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_client_cert
    ON certificates (kind, name)
    WHERE revoked_at IS NULL AND kind IN ('device', 'service');
CREATE INDEX IF NOT EXISTS certificates_by_name ON certificates (name);
";

/// How long a command waits for another one holding the write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// A registry in an SQLite database file.
pub struct SqliteStore {
    conn: Connection,
}

fn backend(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Busy
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

impl SqliteStore {
    /// Opens (and, if new, creates) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(backend)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(backend)?;
        // WAL keeps readers (list, show) from blocking writers; FULL sync
        // makes a committed enrollment survive power loss.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        // The version is read inside a write transaction: two commands
        // opening an old registry at once (the CA service and a cron
        // audit) must not both migrate it.
        let tx =
            rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(backend)?;
        if version < 1 {
            tx.execute_batch(MIGRATE_V1).map_err(backend)?;
        }
        if version < 2 {
            tx.execute_batch(MIGRATE_V2).map_err(backend)?;
            tx.execute_batch("PRAGMA user_version = 2")
                .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(SqliteStore { conn })
    }
}

fn read_row(row: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        serial: row.get(0)?,
        kind: row.get(1)?,
        name: row.get(2)?,
        identity: row.get(3)?,
        not_before: row.get(4)?,
        not_after: row.get(5)?,
        fingerprint: row.get(6)?,
        issued_at: row.get(7)?,
        revoked_at: row.get(8)?,
        reason: row.get(9)?,
        der: row.get(10)?,
        replaces: row.get(11)?,
    })
}

fn find(conn: &Connection, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
    let mut sql = format!("SELECT {COLUMNS} FROM certificates WHERE 1 = 1");
    let mut args: Vec<String> = Vec::new();
    if let Some(kind) = filter.kind {
        sql.push_str(" AND kind = ?");
        args.push(kind.as_str().to_owned());
    }
    if let Some(name) = &filter.name {
        sql.push_str(" AND name = ?");
        args.push(name.clone());
    }
    if let Some(serial) = &filter.serial {
        sql.push_str(" AND serial = ?");
        args.push(serial.to_string());
    }
    if filter.unrevoked_only {
        sql.push_str(" AND revoked_at IS NULL");
    }
    sql.push_str(" ORDER BY issued_at DESC, rowid DESC");
    let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args.iter()), read_row)
        .map_err(backend)?;
    rows.map(|r| r.map_err(backend)?.into_record()).collect()
}

fn setting(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
    .map_err(backend)
}

impl Store for SqliteStore {
    type Tx<'a> = SqliteTx<'a>;

    fn begin(&mut self) -> Result<SqliteTx<'_>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)?;
        Ok(SqliteTx { tx })
    }

    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
        find(&self.conn, filter)
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        setting(&self.conn, key)
    }

    fn memberships(&self) -> Result<Vec<Membership>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT grp, kind, name FROM memberships ORDER BY grp, kind, name")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (group, kind, name) = row.map_err(backend)?;
            out.push(Membership {
                group,
                kind: kind.parse()?,
                name,
            });
        }
        Ok(out)
    }
}

/// An exclusive write transaction on the SQLite registry.
pub struct SqliteTx<'a> {
    tx: rusqlite::Transaction<'a>,
}

impl StoreTx for SqliteTx<'_> {
    fn find(&self, filter: &Filter) -> Result<Vec<CertRecord>, StoreError> {
        find(&self.tx, filter)
    }

    fn insert(&self, r: &CertRecord) -> Result<(), StoreError> {
        let result = self.tx.execute(
            &format!("INSERT INTO certificates ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params![
                r.serial.to_string(),
                r.kind.as_str(),
                r.name,
                r.identity,
                unix(r.not_before),
                unix(r.not_after),
                r.fingerprint,
                unix(r.issued_at),
                r.revocation.map(|v| unix(v.at)),
                r.revocation.map(|v| v.reason.as_str()),
                r.der,
                r.replaces.as_ref().map(Serial::to_string),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, Some(msg)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                if msg.contains("certificates.serial") {
                    Err(StoreError::DuplicateSerial(r.serial.clone()))
                } else if msg.contains("certificates.kind") {
                    Err(StoreError::DuplicateActive {
                        kind: r.kind,
                        name: r.name.clone(),
                    })
                } else {
                    Err(StoreError::Backend(msg))
                }
            }
            Err(e) => Err(backend(e)),
        }
    }

    fn revoke(&self, serial: &Serial, revocation: Revocation) -> Result<(), StoreError> {
        let changed = self
            .tx
            .execute(
                "UPDATE certificates SET revoked_at = ?1, revocation_reason = ?2 \
                 WHERE serial = ?3 AND revoked_at IS NULL",
                params![
                    unix(revocation.at),
                    revocation.reason.as_str(),
                    serial.to_string()
                ],
            )
            .map_err(backend)?;
        exactly_one(changed as u64, serial, "not revocable")
    }

    fn settle(&self, serial: &Serial) -> Result<(), StoreError> {
        let changed = self
            .tx
            .execute(
                "UPDATE certificates SET replaces = NULL \
                 WHERE serial = ?1 AND replaces IS NOT NULL",
                [serial.to_string()],
            )
            .map_err(backend)?;
        exactly_one(changed as u64, serial, "not awaiting commit")
    }

    fn renewal(
        &self,
        kind: Kind,
        name: &str,
        request_id: &str,
    ) -> Result<Option<Serial>, StoreError> {
        let serial: Option<String> = self
            .tx
            .query_row(
                "SELECT serial FROM renewals WHERE kind = ?1 AND name = ?2 AND request_id = ?3",
                params![kind.as_str(), name, request_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
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
        self.tx
            .execute(
                "INSERT INTO renewals (kind, name, request_id, serial, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    kind.as_str(),
                    name,
                    request_id,
                    serial.to_string(),
                    unix(at)
                ],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn revoked_unexpired(
        &self,
        scope: Scope,
        now: OffsetDateTime,
    ) -> Result<Vec<CertRecord>, StoreError> {
        let kinds = scope
            .kinds()
            .iter()
            .map(|k| format!("'{}'", k.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM certificates WHERE revoked_at IS NOT NULL \
                 AND kind IN ({kinds}) AND not_after > ?1 ORDER BY revoked_at, serial"
            ))
            .map_err(backend)?;
        let rows = stmt.query_map([unix(now)], read_row).map_err(backend)?;
        rows.map(|r| r.map_err(backend)?.into_record()).collect()
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        setting(&self.tx, key)
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.tx
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn set_membership(&self, m: &Membership, member: bool) -> Result<bool, StoreError> {
        let sql = if member {
            "INSERT INTO memberships (grp, kind, name) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM memberships WHERE grp = ?1 AND kind = ?2 AND name = ?3"
        };
        let changed = self
            .tx
            .execute(sql, params![m.group, m.kind.as_str(), m.name])
            .map_err(backend)?;
        Ok(changed == 1)
    }

    fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RevocationReason;

    fn record(name: &str, kind: Kind) -> CertRecord {
        let serial = Serial::random();
        CertRecord {
            fingerprint: format!("fp-{serial}"),
            serial,
            kind,
            name: name.into(),
            identity: None,
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::UNIX_EPOCH + time::Duration::days(30000),
            issued_at: OffsetDateTime::UNIX_EPOCH,
            revocation: None,
            der: vec![1, 2, 3],
            replaces: None,
        }
    }

    #[test]
    fn one_active_certificate_per_device_is_enforced_by_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let tx = store.begin().unwrap();
        let first = record("a", Kind::Device);
        tx.insert(&first).unwrap();
        assert!(matches!(
            tx.insert(&record("a", Kind::Device)),
            Err(StoreError::DuplicateActive { .. })
        ));
        // Gateways may hold several (rotation overlap); services are separate names.
        tx.insert(&record("a", Kind::Service)).unwrap();
        let gateway = record("gw", Kind::Gateway);
        tx.insert(&gateway).unwrap();
        tx.insert(&record("gw", Kind::Gateway)).unwrap();
        let revocation = Revocation {
            at: crate::registry::now(),
            reason: RevocationReason::Superseded,
        };
        tx.revoke(&first.serial, revocation).unwrap();
        tx.revoke(&gateway.serial, revocation).unwrap();
        tx.insert(&record("a", Kind::Device)).unwrap();
        // Each CRL lists only its own CA's certificates.
        for (scope, serial) in [
            (Scope::Device, &first.serial),
            (Scope::Server, &gateway.serial),
        ] {
            let listed = tx
                .revoked_unexpired(scope, OffsetDateTime::UNIX_EPOCH)
                .unwrap();
            assert_eq!(listed.len(), 1, "{scope:?}");
            assert_eq!(&listed[0].serial, serial, "{scope:?}");
        }
        tx.commit().unwrap();
        let all = store
            .find(&Filter {
                name: Some("a".into()),
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(
            all.iter()
                .find(|r| r.serial == first.serial)
                .unwrap()
                .revocation,
            Some(revocation)
        );
    }

    #[test]
    fn duplicate_serial_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        let tx = store.begin().unwrap();
        let a = record("a", Kind::Device);
        tx.insert(&a).unwrap();
        let mut b = record("b", Kind::Device);
        b.serial = a.serial.clone();
        assert!(matches!(tx.insert(&b), Err(StoreError::DuplicateSerial(_))));
    }

    #[test]
    fn uncommitted_changes_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("r.db")).unwrap();
        {
            let tx = store.begin().unwrap();
            tx.insert(&record("a", Kind::Device)).unwrap();
            assert_eq!(tx.next_crl_number(Scope::Device, 0).unwrap(), 1);
            assert_eq!(tx.next_crl_number(Scope::Device, 7).unwrap(), 7);
            assert_eq!(tx.next_crl_number(Scope::Device, 0).unwrap(), 8);
            // The server CA's CRL counts on its own.
            assert_eq!(tx.next_crl_number(Scope::Server, 0).unwrap(), 1);
        }
        assert!(store.find(&Filter::default()).unwrap().is_empty());
        assert_eq!(store.setting("crl_number").unwrap(), None);
    }

    #[test]
    fn a_renewal_era_registry_gains_groups_and_migrates_once_when_opened_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            // Schema version 1, as the round-2 renewal left it.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute_batch(MIGRATE_V1).unwrap();
            conn.execute_batch("PRAGMA user_version = 1").unwrap();
        }
        // The CA service and a cron audit opening it at the same moment.
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || SqliteStore::open(&path).map(|_| ()))
            })
            .collect();
        for o in opened {
            o.join().unwrap().unwrap();
        }
        let mut store = SqliteStore::open(&path).unwrap();
        let m = Membership {
            group: "pumps".into(),
            kind: Kind::Device,
            name: "a".into(),
        };
        let tx = store.begin().unwrap();
        assert!(tx.set_membership(&m, true).unwrap());
        assert!(!tx.set_membership(&m, true).unwrap(), "already a member");
        tx.commit().unwrap();
        assert_eq!(store.memberships().unwrap(), vec![m]);
    }

    #[test]
    fn a_registry_from_before_renewal_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let old = record("a", Kind::Device);
        {
            // The round-1 schema, with one enrolled device.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO certificates (serial, kind, name, identity, not_before, not_after, \
                 fingerprint, issued_at, der) VALUES (?1, 'device', 'a', NULL, 0, 1, 'fp', 0, x'01')",
                [old.serial.to_string()],
            )
            .unwrap();
        }
        let mut store = SqliteStore::open(&path).unwrap();
        let found = store.find(&Filter::default()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].replaces, None);
        let tx = store.begin().unwrap();
        // A renewal may now sit beside the committed certificate, one at a time.
        let mut renewed = record("a", Kind::Device);
        renewed.replaces = Some(old.serial.clone());
        tx.insert(&renewed).unwrap();
        let mut another = record("a", Kind::Device);
        another.replaces = Some(old.serial.clone());
        assert!(matches!(
            tx.insert(&another),
            Err(StoreError::DuplicateActive { .. })
        ));
        assert!(matches!(
            tx.insert(&record("a", Kind::Device)),
            Err(StoreError::DuplicateActive { .. })
        ));
        tx.record_renewal(
            Kind::Device,
            "a",
            "r1",
            &renewed.serial,
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(
            tx.renewal(Kind::Device, "a", "r1").unwrap(),
            Some(renewed.serial.clone())
        );
        // Committing needs the predecessor revoked first: still one active.
        assert!(tx.settle(&renewed.serial).is_err());
        let revocation = Revocation {
            at: OffsetDateTime::UNIX_EPOCH,
            reason: RevocationReason::Superseded,
        };
        tx.revoke(&old.serial, revocation).unwrap();
        tx.settle(&renewed.serial).unwrap();
        assert!(tx.settle(&renewed.serial).is_err());
        tx.commit().unwrap();
        drop(store);
        // Opening again does not migrate twice.
        SqliteStore::open(&path).unwrap();
    }
}
