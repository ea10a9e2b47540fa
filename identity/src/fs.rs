//! Files that several meshfed processes share: atomic writes and directory locks. I/O.
//!
//! - [`write_file`] writes through a temporary file that no other writer can share (its
//!   name carries the pid and a per-process counter), fsyncs it, renames it over the
//!   target and fsyncs the directory, so a crash leaves the old or the new file and a
//!   concurrent writer never renames half of ours.
//! - [`DirLock`] is an advisory `flock(2)` on a file in a directory. Read-modify-write
//!   commands ([`DirLock::wait`]) take it for their few milliseconds, so concurrent runs
//!   serialize instead of losing each other's changes; daemons that own a directory
//!   ([`DirLock::try_hold`]) hold it for their lifetime, so a second one is refused. The
//!   kernel drops the lock when the process dies, so a crash never leaves it stale.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a file could not be written or a directory not locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is locked by {holder}: another meshfed process owns this directory; stop it, or use another directory"
    )]
    Held { path: PathBuf, holder: String },
    #[error(
        "{path}: still locked by {holder} after {waited:?}: another meshfed command is writing this directory"
    )]
    Timeout {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// What tells one version of a followed file from the next. Its modification time alone
/// does not: the kernel's timestamps tick every few milliseconds, so two writes within
/// one tick have the same. A writer that replaces the file ([`write_file`]: write, then
/// rename) gives each version its own inode, and size and change time tell in-place
/// writes apart more often than the mtime alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    modified: std::time::SystemTime,
    inode: u64,
    len: u64,
    changed: (i64, i64),
}

impl FileStamp {
    /// The stamp of `path` now; `None` when it cannot be read (absent).
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(Self {
            modified: m.modified().ok()?,
            inode: m.ino(),
            len: m.len(),
            changed: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Writes `data` to `path` atomically with `mode` (a key is never readable by others, not
/// even for a moment), and durably: once this returns, a crash keeps the new content.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| FsError::Io { path: p, source }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> Result<(), FsError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable only once the directory entry is.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// An advisory lock on `<dir>/<name>`, held until dropped (or the process exits).
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    _file: File,
}

impl DirLock {
    /// Takes the lock for a short read-modify-write, waiting up to `timeout` for another
    /// holder to finish.
    pub fn wait(dir: &Path, name: &str, timeout: Duration) -> Result<Self, FsError> {
        let (path, file) = open_lock(dir, name)?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self::taken(path, file)),
                Err(TryLockError::WouldBlock) if start.elapsed() < timeout => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(FsError::Timeout {
                        holder: holder(&path),
                        path,
                        waited: start.elapsed(),
                    });
                }
                Err(TryLockError::Error(source)) => return Err(FsError::Io { path, source }),
            }
        }
    }

    /// Takes the lock for this process's lifetime, or says who holds it.
    pub fn try_hold(dir: &Path, name: &str) -> Result<Self, FsError> {
        let (path, file) = open_lock(dir, name)?;
        match file.try_lock() {
            Ok(()) => Ok(Self::taken(path, file)),
            Err(TryLockError::WouldBlock) => Err(FsError::Held {
                holder: holder(&path),
                path,
            }),
            Err(TryLockError::Error(source)) => Err(FsError::Io { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the holder's pid in the lock file, for the next one's error message.
    fn taken(path: PathBuf, mut file: File) -> Self {
        let _ = file.set_len(0);
        let _ = file.write_all(format!("pid {}\n", std::process::id()).as_bytes());
        Self { path, _file: file }
    }
}

fn open_lock(dir: &Path, name: &str) -> Result<(PathBuf, File), FsError> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|source| FsError::Io {
            path: path.clone(),
            source,
        })?;
    Ok((path, file))
}

fn holder(path: &Path) -> String {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "another process".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshfed-fs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn concurrent_writers_never_share_a_temporary_file() {
        // Before: every writer of x.json used x.tmp; two at once renamed each other's
        // half-written files or failed with "No such file".
        let d = tmpdir("writers");
        let target = d.join("x.json");
        std::thread::scope(|s| {
            for t in 0..8 {
                let target = &target;
                s.spawn(move || {
                    for i in 0..200 {
                        let body = format!("{t}-{i}-").repeat(100);
                        write_file(target, body.as_bytes(), 0o644).unwrap();
                    }
                });
            }
        });
        let last = fs::read_to_string(&target).unwrap();
        let first = last.split('-').take(2).collect::<Vec<_>>().join("-") + "-";
        assert_eq!(last, first.repeat(100), "a whole write, never a mix");
        let left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("x.json")],
            "no temporary files left"
        );
    }

    #[test]
    fn a_held_lock_is_refused_with_its_holder_and_freed_on_drop() {
        let d = tmpdir("hold");
        let held = DirLock::try_hold(&d, "owner.lock").unwrap();
        let e = DirLock::try_hold(&d, "owner.lock").unwrap_err();
        assert!(matches!(e, FsError::Held { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        let e = DirLock::wait(&d, "owner.lock", Duration::from_millis(30)).unwrap_err();
        assert!(matches!(e, FsError::Timeout { .. }), "{e}");
        drop(held);
        DirLock::try_hold(&d, "owner.lock").unwrap();
    }

    #[test]
    fn waiters_serialize() {
        let d = tmpdir("serial");
        let counter = d.join("n");
        fs::write(&counter, "0").unwrap();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..25 {
                        let _l = DirLock::wait(&d, "rw.lock", Duration::from_secs(30)).unwrap();
                        let n: u32 = fs::read_to_string(&counter).unwrap().parse().unwrap();
                        write_file(&counter, (n + 1).to_string().as_bytes(), 0o644).unwrap();
                    }
                });
            }
        });
        assert_eq!(fs::read_to_string(&counter).unwrap(), "200");
    }
}
