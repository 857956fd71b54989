//! Noticing that a file on disk changed: certificates, keys, CA bundles
//! and CRLs are replaced while the gateway and the agent run.
//!
//! A watcher compares a [`FileStamp`] of each file with the one it took
//! last time and reloads when they differ. Size and modification time
//! alone miss a replacement of the same length within the time's
//! granularity, or one whose mtime was carried over (`cp -p`, `rsync -t`,
//! `touch -r`, an unpacked archive): a replaced CRL of the same size would
//! then never be taken. So a stamp also holds what a replacement cannot
//! carry over: the device and inode (a file renamed into place is a new
//! inode), the status-change time (set by the kernel on every write or
//! rename, to the nanosecond where the filesystem keeps it), and a SHA-256
//! of the contents, which catches what is left (two in-place writes of the
//! same length within one coarse timestamp tick).

use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// What a file looked like when it was stamped. Two stamps are equal only
/// if the file was neither replaced nor written in between (see the module
/// doc for what each part catches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    /// With the nanoseconds the platform gives.
    modified: Option<SystemTime>,
    /// Device, inode, and status-change time (seconds, nanoseconds).
    #[cfg(unix)]
    node: (u64, u64, i64, i64),
    /// `None` if the file could not be read to the end.
    digest: Option<[u8; 32]>,
}

impl FileStamp {
    /// The stamp of the file at `path` (following symlinks, as a reader
    /// does), or `None` if there is no file there to stamp.
    pub fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            node: {
                use std::os::unix::fs::MetadataExt;
                (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
            },
            digest: digest(path),
        })
    }
}

fn digest(path: &Path) -> Option<[u8; 32]> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 8192];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Some(hasher.finalize().into()),
            Ok(n) => hasher.update(buf.get(..n)?),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn an_untouched_file_keeps_its_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        std::fs::write(&path, "first").unwrap();
        assert_eq!(FileStamp::of(&path), FileStamp::of(&path));
    }

    #[test]
    fn a_missing_file_has_no_stamp_and_its_arrival_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        assert_eq!(FileStamp::of(&path), None);
        std::fs::write(&path, "").unwrap();
        assert!(FileStamp::of(&path).is_some());
    }

    #[test]
    fn a_same_length_rewrite_with_its_old_mtime_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        std::fs::write(&path, "number 1").unwrap();
        let before = FileStamp::of(&path).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, "number 2").unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let after = FileStamp::of(&path).unwrap();
        assert_eq!((after.len, after.modified), (before.len, before.modified));
        assert_ne!(after, before);
        // The contents alone tell them apart, whatever the clock did.
        assert_ne!(after.digest, before.digest);
    }

    #[test]
    fn a_same_length_file_renamed_into_place_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        let next = dir.path().join("crl.pem.new");
        std::fs::write(&path, "number 1").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let before = FileStamp::of(&path).unwrap();
        std::fs::write(&next, "number 2").unwrap();
        File::options()
            .write(true)
            .open(&next)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::rename(&next, &path).unwrap();
        let after = FileStamp::of(&path).unwrap();
        assert_eq!((after.len, after.modified), (before.len, before.modified));
        assert_ne!(after, before);
    }
}
