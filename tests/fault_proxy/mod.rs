//! A TCP fault proxy for the link between two daemons: it listens on 127.0.0.4, forwards each
//! accepted connection to a target (node b's replication port), connecting from 127.0.0.2 so
//! that b still sees node a's address, and applies a fault the test flips at runtime: a link
//! that hangs, loses one direction, dies mid-frame, or is reset; or, as an attacker on the path
//! would, flips a bit or sends bytes again. It can record what it forwards. Std threads only;
//! every wait is bounded, and dropping the proxy ends all its threads.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A direction of the proxied link: from the connecting side (a) or from the target (b).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    AToB = 0,
    BToA = 1,
}

/// What the proxy does to the bytes of every connection, current and future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward both directions.
    Pass,
    /// Forward nothing, close nothing: a link that hangs. Bytes stay queued in the sockets and
    /// flow again after `Pass`.
    Stall,
    /// Forward only this direction; the other hangs as in `Stall` (one-way loss, half-open).
    OneWay(Dir),
    /// Forward this many more bytes a -> b (b -> a freely), then close both sockets of the
    /// connection that carried the last of them, wherever a frame stands; then back to `Pass`.
    CutAfter(u64),
    /// In the next chunk a -> b of at least this many bytes, flip the lowest bit of its middle
    /// byte; then back to `Pass`.
    FlipNext(usize),
    /// Forward the next chunk a -> b of at least this many bytes twice (a replay); then back
    /// to `Pass`.
    DuplicateNext(usize),
}

/// How long a pump waits on a socket before it looks at the fault and the stop flag again.
const POLL: Duration = Duration::from_millis(20);

struct State {
    fault: Mutex<Fault>,
    /// Both sockets of every connection not yet reset.
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
    accepted: AtomicU64,
    /// What was forwarded each way (a -> b, b -> a) while `record` is set.
    record: AtomicBool,
    recorded: Mutex<[Vec<u8>; 2]>,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl State {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listen on 127.0.0.4 (a free port) and forward to `target` from 127.0.0.2, in `Pass`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        FaultProxy::between([127, 0, 0, 4], target, [127, 0, 0, 2])
    }

    /// Listen on `listen` (a free port) and forward to `target` from `from`, in `Pass`. With
    /// `listen` the target's own address and `from` the connecting node's, both daemons'
    /// address checks still pass, so each direction of a pair can have its own proxy.
    pub fn between(listen: [u8; 4], target: SocketAddr, from: [u8; 4]) -> FaultProxy {
        let listener = TcpListener::bind((std::net::Ipv4Addr::from(listen), 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            fault: Mutex::new(Fault::Pass),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            record: AtomicBool::new(false),
            recorded: Mutex::new([Vec::new(), Vec::new()]),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let st = Arc::clone(&state);
        let acceptor = thread::spawn(move || accept_loop(listener, target, from, &st));
        FaultProxy {
            addr,
            state,
            acceptor: Some(acceptor),
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    pub fn fault(&self) -> Fault {
        self.state.fault()
    }

    /// Close every current connection now (both sockets); later ones are proxied as before.
    pub fn reset(&self) {
        for (a, b) in self.state.conns.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Record what is forwarded from now on (or stop recording).
    pub fn record(&self, on: bool) {
        self.state.record.store(on, Ordering::SeqCst);
    }

    /// What was forwarded in direction `dir` while recording.
    pub fn recorded(&self, dir: Dir) -> Vec<u8> {
        self.state.recorded.lock().unwrap()[dir as usize].clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.reset();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        // Every pump polls the stop flag at least every POLL.
        let pumps: Vec<_> = self.state.threads.lock().unwrap().drain(..).collect();
        for t in pumps {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, from: [u8; 4], st: &Arc<State>) {
    while !st.stop.load(Ordering::SeqCst) {
        let from_a = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(POLL);
                continue;
            }
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        st.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = from_a.set_nonblocking(false);
        // Refused (b is down): close a's side, as a dead host would.
        let Ok(to_b) = connect_from(target, from) else {
            continue;
        };
        for s in [&from_a, &to_b] {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(POLL));
            let _ = s.set_write_timeout(Some(POLL));
        }
        let clone = |s: &TcpStream| s.try_clone().unwrap();
        st.conns
            .lock()
            .unwrap()
            .push((clone(&from_a), clone(&to_b)));
        let mut threads = st.threads.lock().unwrap();
        for (dir, src, dst) in [
            (Dir::AToB, clone(&from_a), clone(&to_b)),
            (
                Dir::BToA,
                to_b.try_clone().unwrap(),
                from_a.try_clone().unwrap(),
            ),
        ] {
            let st = Arc::clone(st);
            threads.push(thread::spawn(move || pump(dir, src, dst, &st)));
        }
    }
}

/// Connect to `target` from node a's address, as a itself would (bind before connect).
fn connect_from(target: SocketAddr, from: [u8; 4]) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let SocketAddr::V4(t) = target else {
        return Err(std::io::Error::other("IPv4 targets only"));
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    let [x, y, z, w] = from;
    bind(fd.as_raw_fd(), &SockaddrIn::new(x, y, z, w, 0))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(t))?;
    Ok(TcpStream::from(fd))
}

/// Copy `src` to `dst` as the fault allows, until either side ends or the proxy stops.
fn pump(dir: Dir, mut src: TcpStream, mut dst: TcpStream, st: &State) {
    let mut buf = vec![0u8; 64 << 10];
    let close = |src: &TcpStream, dst: &TcpStream| {
        let _ = src.shutdown(Shutdown::Both);
        let _ = dst.shutdown(Shutdown::Both);
    };
    while !st.stop.load(Ordering::SeqCst) {
        let flows = match st.fault() {
            Fault::Pass | Fault::CutAfter(_) | Fault::FlipNext(_) | Fault::DuplicateNext(_) => true,
            Fault::Stall => false,
            Fault::OneWay(d) => d == dir,
        };
        if !flows {
            thread::sleep(POLL);
            continue;
        }
        let n = match src.read(&mut buf) {
            Ok(0) => {
                // Pass the half-close on; the other pump ends when the far side closes.
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue;
            }
            Err(_) => return close(&src, &dst),
        };
        // Take the bytes out of a cut budget under the lock, so a budget is spent once.
        let mut twice = false;
        let (n, cut) = {
            let mut f = st.fault.lock().unwrap();
            match *f {
                Fault::FlipNext(min) if dir == Dir::AToB && n >= min => {
                    buf[n / 2] ^= 1;
                    *f = Fault::Pass;
                    (n, false)
                }
                Fault::DuplicateNext(min) if dir == Dir::AToB && n >= min => {
                    twice = true;
                    *f = Fault::Pass;
                    (n, false)
                }
                Fault::CutAfter(left) if dir == Dir::AToB => {
                    let pass = (n as u64).min(left);
                    if pass == left {
                        *f = Fault::Pass;
                        (pass as usize, true)
                    } else {
                        *f = Fault::CutAfter(left - pass);
                        (n, false)
                    }
                }
                _ => (n, false),
            }
        };
        if st.record.load(Ordering::SeqCst) {
            st.recorded.lock().unwrap()[dir as usize].extend_from_slice(&buf[..n]);
        }
        if !write_all(&mut dst, &buf[..n], st) || cut {
            return close(&src, &dst);
        }
        if twice && !write_all(&mut dst, &buf[..n], st) {
            return close(&src, &dst);
        }
    }
}

/// `write_all` that gives up when the proxy stops (the reader may be hung).
fn write_all(dst: &mut TcpStream, mut data: &[u8], st: &State) -> bool {
    while !data.is_empty() {
        if st.stop.load(Ordering::SeqCst) {
            return false;
        }
        match dst.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A target on 127.0.0.3 that echoes nothing back but records what it reads (until EOF or
    /// an error), and sends `hello` first.
    fn sink() -> (SocketAddr, JoinHandle<(Vec<u8>, SocketAddr)>) {
        let l = TcpListener::bind(("127.0.0.3", 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let t = thread::spawn(move || {
            let (mut s, from) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"hello").unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            (got, from)
        });
        (addr, t)
    }

    fn client(p: &FaultProxy) -> TcpStream {
        let c = TcpStream::connect(p.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    #[test]
    fn bytes_pass_both_ways_from_a_s_address() {
        let (target, t) = sink();
        let p = FaultProxy::start(target);
        let mut c = client(&p);
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"hello");
        c.write_all(&[7u8; 100_000]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let (got, from) = t.join().unwrap();
        assert_eq!(got, vec![7u8; 100_000]);
        assert_eq!(from.ip().to_string(), "127.0.0.2");
        assert_eq!(p.accepted(), 1);
    }

    #[test]
    fn a_stall_holds_the_bytes_and_keeps_the_connection_open() {
        let (target, t) = sink();
        let p = FaultProxy::start(target);
        let mut c = client(&p);
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).unwrap();
        p.set(Fault::Stall);
        c.write_all(b"held").unwrap();
        // Nothing arrives, nothing closes.
        thread::sleep(Duration::from_millis(300));
        assert!(!t.is_finished());
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let e = c.read(&mut [0u8; 1]).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        ));
        p.set(Fault::Pass);
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(t.join().unwrap().0, b"held");
    }

    #[test]
    fn a_flip_and_a_replay_change_the_next_big_chunk_and_recording_sees_them() {
        let (target, t) = sink();
        let p = FaultProxy::start(target);
        p.record(true);
        let mut c = client(&p);
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).unwrap();
        p.set(Fault::FlipNext(100));
        c.write_all(&[0u8; 10]).unwrap();
        thread::sleep(Duration::from_millis(200));
        c.write_all(&[0u8; 200]).unwrap();
        thread::sleep(Duration::from_millis(200));
        assert_eq!(p.fault(), Fault::Pass);
        p.set(Fault::DuplicateNext(100));
        c.write_all(&[7u8; 150]).unwrap();
        thread::sleep(Duration::from_millis(200));
        c.shutdown(Shutdown::Write).unwrap();
        let got = t.join().unwrap().0;
        let mut want = vec![0u8; 210];
        want[10 + 100] = 1;
        want.extend_from_slice(&[7u8; 300]);
        assert_eq!(got, want);
        assert_eq!(p.recorded(Dir::AToB), got[..360].to_vec());
        assert_eq!(p.recorded(Dir::BToA), b"hello");
    }

    #[test]
    fn a_cut_closes_both_sockets_after_the_budget() {
        let (target, t) = sink();
        let p = FaultProxy::start(target);
        let mut c = client(&p);
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).unwrap();
        p.set(Fault::CutAfter(1000));
        let start = Instant::now();
        // The proxy closes mid-write: a write or the read after it fails or sees EOF.
        let _ = c.write_all(&[1u8; 5000]);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(t.join().unwrap().0, vec![1u8; 1000]);
        assert_eq!(p.fault(), Fault::Pass);
    }
}
