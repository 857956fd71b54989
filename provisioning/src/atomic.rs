//! Atomic file output: write a temporary file beside the target, set its
//! mode, flush it, and rename it into place. A reader (or a crash) sees the
//! old file or the new one, never half of one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Mode of private key files.
pub const SECRET: u32 = 0o600;
/// Mode of certificates, CRLs and other public files.
pub const PUBLIC: u32 = 0o644;

/// Whether to wait for the data to reach the disk before the rename.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before renaming it: for the PKI's own state.
    Sync,
    /// Rename without fsync; the caller syncs once at the end (bulk output).
    Deferred,
}

/// Atomically replaces `path` with `bytes`, created with `mode`.
pub fn write(path: &Path, bytes: &[u8], mode: u32, durability: Durability) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // The temporary file is created 0600 by tempfile, so a key is never
    // readable by others, even for an instant.
    let mut tmp = tempfile::Builder::new()
        .prefix(".twofold-")
        .tempfile_in(dir)
        .map_err(Error::io(dir))?;
    tmp.write_all(bytes).map_err(Error::io(path))?;
    if mode != SECRET {
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
            .map_err(Error::io(path))?;
    }
    if durability == Durability::Sync {
        tmp.as_file().sync_all().map_err(Error::io(path))?;
    }
    tmp.persist(path).map_err(|e| Error::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    if durability == Durability::Sync {
        sync_dir(dir)?;
    }
    Ok(())
}

/// fsyncs a directory so that renames inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_with_the_requested_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write(&key, b"one", SECRET, Durability::Sync).unwrap();
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        let cert = dir.path().join("c.pem");
        write(&cert, b"two", PUBLIC, Durability::Deferred).unwrap();
        assert_eq!(fs::metadata(&cert).unwrap().mode() & 0o777, 0o644);
        write(&cert, b"three", PUBLIC, Durability::Sync).unwrap();
        assert_eq!(fs::read(&cert).unwrap(), b"three");
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let err = write(
            Path::new("/nonexistent-twofold/x"),
            b"",
            PUBLIC,
            Durability::Sync,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent-twofold"), "{err}");
    }
}
