//! Wakes a controller the moment a file it follows is replaced (Linux inotify on the
//! directory: a write-and-close or a rename into place of that name), so that it need
//! not poll often. Anything that fails here is logged and left to the caller's poll.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Arc;

use rustix::event::Timespec;
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::inotify;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the watching thread looks at `stop`.
const STOP_CHECK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 250_000_000,
};

/// Starts the watch on a thread of its own; `wake` is notified whenever `dir/name` is
/// written or renamed into place. Returns false (the caller keeps polling) where
/// inotify is unavailable.
pub fn watch(dir: &Path, name: &str, wake: Arc<Notify>, stop: CancellationToken) -> bool {
    let fd = match inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(e) => {
            debug!(error = %e, "no inotify; polling");
            return false;
        }
    };
    let flags = inotify::WatchFlags::CLOSE_WRITE | inotify::WatchFlags::MOVED_TO;
    if let Err(e) = inotify::add_watch(&fd, dir, flags) {
        debug!(dir = %dir.display(), error = %e, "inotify watch not added; polling");
        return false;
    }
    let name = name.as_bytes().to_vec();
    std::thread::Builder::new()
        .name("meshfed-inotify".into())
        .spawn(move || {
            let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
            while !stop.is_cancelled() {
                let mut fds = [PollFd::new(&fd, PollFlags::IN)];
                match poll(&mut fds, Some(&STOP_CHECK)) {
                    Ok(0) => continue,
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => return,
                }
                let mut events = inotify::Reader::new(&fd, &mut buf);
                let mut hit = false;
                loop {
                    match events.next() {
                        Ok(ev) => {
                            hit |= ev
                                .file_name()
                                .is_some_and(|f| f.to_bytes() == name.as_slice());
                        }
                        Err(rustix::io::Errno::AGAIN) => break,
                        Err(_) => return,
                    }
                }
                if hit {
                    wake.notify_one();
                }
            }
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_renamed_into_place_wakes_and_others_do_not() {
        let dir = std::env::temp_dir().join(format!("meshfed-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        assert!(watch(&dir, "imports.json", wake.clone(), stop.clone()));
        std::fs::write(dir.join("other.json"), b"x").unwrap();
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(200), wake.notified()).await;
        assert!(quiet.is_err(), "another file woke the watcher");
        std::fs::write(dir.join("imports.json.tmp"), b"{}").unwrap();
        std::fs::rename(dir.join("imports.json.tmp"), dir.join("imports.json")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(2), wake.notified())
            .await
            .expect("the rename woke it");
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
