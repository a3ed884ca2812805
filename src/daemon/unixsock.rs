//! Private unix sockets: the control socket and the NBD export are bound under umask 077, so
//! the socket file never exists with a wider mode, not even between bind(2) and chmod(2).
//!
//! The umask belongs to the process, not the thread: one lock serialises the changes (two
//! overlapping ones could otherwise restore each other's 077 for good). A file another thread
//! creates during the bind gets a narrower mode, never a wider one.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

use nix::sys::stat::{Mode, umask};

static UMASK: Mutex<()> = Mutex::new(());

/// Bind `path` with mode 0600 from its creation on.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let bound = {
        let _one = UMASK.lock().unwrap_or_else(|p| p.into_inner());
        let old = umask(Mode::from_bits_truncate(0o077));
        let bound = UnixListener::bind(path);
        umask(old);
        bound
    }?;
    // Under umask 077 the socket is created 0700: narrow it to the 0600 it always had.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A watcher stats the path as fast as it can while it is bound and unbound many times
    /// with the process umask at 000: no mode wider than 0700 is ever seen.
    #[test]
    fn the_socket_never_exists_with_a_wider_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("s.sock"));
        let widest = Arc::new(AtomicU32::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(false));
        let (p, w, d, r) = (
            Arc::clone(&path),
            Arc::clone(&widest),
            Arc::clone(&done),
            Arc::clone(&running),
        );
        let watcher = std::thread::spawn(move || {
            let mut seen = 0u64;
            r.store(true, Ordering::Release);
            while !d.load(Ordering::Acquire) {
                if let Ok(m) = std::fs::symlink_metadata(&*p) {
                    w.fetch_or(m.mode() & 0o077, Ordering::Relaxed);
                    seen += 1;
                }
            }
            seen
        });
        while !running.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let old = {
            let _one = UMASK.lock().unwrap();
            umask(Mode::empty())
        };
        for _ in 0..3000 {
            let l = bind_private(&path).unwrap();
            drop(l);
            std::fs::remove_file(&*path).unwrap();
        }
        {
            let _one = UMASK.lock().unwrap();
            umask(old);
        }
        done.store(true, Ordering::Release);
        let seen = watcher.join().unwrap();
        assert!(seen > 0, "the watcher never saw the socket");
        assert_eq!(
            widest.load(Ordering::Relaxed),
            0,
            "group/other bits seen on the socket ({seen} stats)"
        );
        let l = bind_private(&path).unwrap();
        assert_eq!(std::fs::metadata(&*path).unwrap().mode() & 0o777, 0o600);
        drop(l);
    }
}
