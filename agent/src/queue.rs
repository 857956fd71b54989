//! The offline queue: every QoS 1 message is committed to SQLite before it
//! is sent and deleted only when the gateway acknowledges it.
//!
//! SQLite in WAL mode with `synchronous = FULL`: a commit is on disk when
//! it returns, and a power cut mid-write leaves the last committed state.
//! When the queue is full the oldest messages are dropped, in the same
//! transaction as the insert, and counted.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

/// One stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub seq: i64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What an enqueue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub seq: i64,
    /// Oldest messages dropped to make room.
    pub dropped: u64,
}

/// Why the queue failed.
#[derive(Debug, thiserror::Error)]
#[error("queue {path}: {source}")]
pub struct QueueError {
    path: String,
    source: rusqlite::Error,
}

/// The queue; cheap to clone. Calls block on disk: call them from
/// `spawn_blocking` or a thread in async code.
#[derive(Clone)]
pub struct Queue {
    db: Arc<Mutex<Connection>>,
    path: String,
    max: u64,
}

impl Queue {
    /// Opens (creating if needed) the queue at `path`, holding at most
    /// `max` messages.
    pub fn open(path: &Path, max: u64) -> Result<Queue, QueueError> {
        let name = path.display().to_string();
        let wrap = |source| QueueError {
            path: name.clone(),
            source,
        };
        let db = Connection::open(path).map_err(wrap)?;
        db.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(wrap)?;
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(wrap)?;
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(wrap)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS queue (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 payload BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS counters (
                 name TEXT PRIMARY KEY,
                 value INTEGER NOT NULL
             );",
        )
        .map_err(wrap)?;
        Ok(Queue {
            db: Arc::new(Mutex::new(db)),
            path: name,
            max,
        })
    }

    fn err(&self, source: rusqlite::Error) -> QueueError {
        QueueError {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores one message.
    pub fn push(&self, topic: &str, payload: &[u8]) -> Result<Pushed, QueueError> {
        self.push_with(topic, None, |_| payload.to_vec())
    }

    /// Stores one message whose payload depends on the next value of the
    /// named counter (e.g. the telemetry sequence number), taken in the same
    /// transaction so the counter never repeats and never skips.
    pub fn push_with(
        &self,
        topic: &str,
        counter: Option<&str>,
        payload: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<Pushed, QueueError> {
        let mut db = self.lock();
        let tx = db.transaction().map_err(|e| self.err(e))?;
        let n = match counter {
            Some(name) => {
                let current: Option<i64> = tx
                    .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(|e| self.err(e))?;
                let next = current.unwrap_or(0);
                tx.execute(
                    "INSERT INTO counters (name, value) VALUES (?1, ?2)
                     ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    params![name, next + 1],
                )
                .map_err(|e| self.err(e))?;
                next as u64
            }
            None => 0,
        };
        tx.execute(
            "INSERT INTO queue (topic, payload) VALUES (?1, ?2)",
            params![topic, payload(n)],
        )
        .map_err(|e| self.err(e))?;
        let seq = tx.last_insert_rowid();
        let count: i64 = tx
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let excess = (count as u64).saturating_sub(self.max);
        if excess > 0 {
            tx.execute(
                "DELETE FROM queue WHERE seq IN (SELECT seq FROM queue ORDER BY seq LIMIT ?1)",
                [excess as i64],
            )
            .map_err(|e| self.err(e))?;
            tx.execute(
                "INSERT INTO counters (name, value) VALUES ('dropped', ?1)
                 ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                [excess as i64],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Pushed {
            seq,
            dropped: excess,
        })
    }

    /// Messages after `after`, oldest first, at most `limit`.
    pub fn after(&self, after: i64, limit: usize) -> Result<Vec<Stored>, QueueError> {
        let db = self.lock();
        let mut stmt = db
            .prepare_cached(
                "SELECT seq, topic, payload FROM queue WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                Ok(Stored {
                    seq: r.get(0)?,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Removes an acknowledged message.
    pub fn remove(&self, seq: i64) -> Result<(), QueueError> {
        self.lock()
            .execute("DELETE FROM queue WHERE seq = ?1", [seq])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// How many messages wait.
    pub fn len(&self) -> Result<u64, QueueError> {
        self.lock()
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> Result<bool, QueueError> {
        self.len().map(|n| n == 0)
    }

    /// How many messages were ever dropped because the queue was full.
    pub fn dropped(&self) -> Result<u64, QueueError> {
        self.counter("dropped")
    }

    /// A named counter's value (0 before its first use); for `push_with`
    /// counters, how many numbers were handed out.
    pub fn counter(&self, name: &str) -> Result<u64, QueueError> {
        self.lock()
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|n| n.unwrap_or(0) as u64)
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_reopening_and_leave_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let q = Queue::open(&path, 10).unwrap();
        let a = q.push("t/a", b"1").unwrap();
        let b = q
            .push_with("t/b", Some("telemetry"), |n| n.to_string().into_bytes())
            .unwrap();
        let c = q
            .push_with("t/c", Some("telemetry"), |n| n.to_string().into_bytes())
            .unwrap();
        assert!(a.seq < b.seq && b.seq < c.seq);
        drop(q);
        let q = Queue::open(&path, 10).unwrap();
        let all = q.after(0, 100).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].payload, b"0");
        assert_eq!(all[2].payload, b"1");
        q.remove(b.seq).unwrap();
        assert_eq!(q.after(a.seq, 100).unwrap(), vec![all[2].clone()]);
        // The counter goes on where it was, across reopening.
        let d = q
            .push_with("t/d", Some("telemetry"), |n| n.to_string().into_bytes())
            .unwrap();
        assert_eq!(q.after(c.seq, 1).unwrap()[0].payload, b"2");
        assert!(d.seq > c.seq);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("q.sqlite"), 3).unwrap();
        for i in 0..5 {
            let p = q.push("t", &[i]).unwrap();
            assert_eq!(p.dropped, u64::from(i >= 3));
        }
        let left: Vec<u8> = q
            .after(0, 10)
            .unwrap()
            .iter()
            .map(|m| m.payload[0])
            .collect();
        assert_eq!(left, [2, 3, 4]);
        assert_eq!(q.dropped().unwrap(), 2);
        assert_eq!(q.len().unwrap(), 3);
    }
}
