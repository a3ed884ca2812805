//! Waiting for a device node to appear, on the event rather than by polling: on Linux an
//! inotify watch on the nearest existing directory of its path (udev and devtmpfs create the
//! node, or a directory of symlinks such as /dev/drbd/by-res/R/, and inotify reports it);
//! elsewhere, and as a fallback if inotify cannot be set up, a check every 100 ms.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

/// Wait until `path` exists, at most `timeout`; true if it does.
pub fn wait_for(path: &Path, timeout: Duration) -> Result<bool> {
    if path.exists() {
        return Ok(true);
    }
    #[cfg(target_os = "linux")]
    match linux::wait_for(path, timeout) {
        Ok(found) => return Ok(found),
        Err(e) => log::debug!("{}: inotify unavailable ({e}); polling", path.display()),
    }
    crate::backend::wait_until(timeout, || Ok(path.exists()))
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;
    use std::time::Instant;

    /// A check anyway this often: an event missed (the node made in a directory that was
    /// itself created and filled between two watches) costs at most this.
    const RECHECK: Duration = Duration::from_millis(500);

    /// The deepest existing directory on the way to `path`.
    fn nearest_dir(path: &Path) -> Option<&Path> {
        path.ancestors().skip(1).find(|a| a.is_dir())
    }

    pub fn wait_for(path: &Path, timeout: Duration) -> nix::Result<bool> {
        let deadline = Instant::now() + timeout;
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mask = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        let mut watched: Option<std::path::PathBuf> = None;
        loop {
            // Watch first, then look: a node made in between is seen by the look.
            let dir = nearest_dir(path).map(Path::to_path_buf);
            if dir != watched {
                if let Some(d) = &dir {
                    ino.add_watch(d.as_path(), mask)?;
                }
                watched = dir;
            }
            if path.exists() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let wait = (deadline - now).min(RECHECK);
            let ms = wait.as_millis().clamp(1, u16::MAX as u128) as u16;
            let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => {}
                Ok(_) => {
                    // Drain; what happened is read back from the file system.
                    let _ = ino.read_events();
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node appears in a directory that does not exist yet when the wait starts (as udev
    /// makes /dev/drbd/by-res/R/0): the wait follows the directories down and sees it.
    #[test]
    fn sees_a_node_made_later_in_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("by-res/r0/0");
        let n = node.clone();
        let maker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::fs::create_dir_all(n.parent().unwrap()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
            std::fs::write(&n, b"").unwrap();
        });
        assert!(wait_for(&node, Duration::from_secs(20)).unwrap());
        maker.join().unwrap();
        assert!(node.exists());
    }

    #[test]
    fn gives_up_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("never");
        assert!(!wait_for(&node, Duration::from_millis(200)).unwrap());
    }
}
