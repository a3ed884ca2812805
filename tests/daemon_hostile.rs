//! The replication listener under attack from a host that shares the primary's address (the
//! worst case: the address check lets it in), and from strangers. What a user would observe:
//! slow handshakes do not keep the real primary out after the secondary restarts, a client
//! that trickles bytes is closed at the handshake deadline, and a flood of garbage does not
//! flood the log. And an NBD client that never reads its replies stalls only itself.

mod daemon_common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daemon_common::*;

/// The secondary's handshake deadline (HANDSHAKE_DEADLINE in src/daemon/secondary.rs).
const DEADLINE: Duration = Duration::from_secs(10);

/// A TCP connection to `to` from `from` (port chosen by the system).
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let SocketAddr::V4(t) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    let ip: std::net::Ipv4Addr = from.parse().map_err(std::io::Error::other)?;
    let [x, y, z, w] = ip.octets();
    bind(fd.as_raw_fd(), &SockaddrIn::new(x, y, z, w, 0))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(t))?;
    Ok(TcpStream::from(fd))
}

/// The bytes of a `Hello` for resource r0 (protocol version 3), as a primary sends it.
fn hello() -> Vec<u8> {
    let mut body = vec![1u8];
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&[0, 0]);
    for s in ["r0", "a"] {
        body.extend_from_slice(&(s.len() as u32).to_le_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    body.extend_from_slice(&[0x42; 32]);
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend(body);
    f
}

/// One slow client: connects from `from`, sends one byte of a Hello every `every`, and
/// connects again (after 100 ms) whenever it is closed or refused, until `stop`. Counts the
/// connections it got.
fn slow_client(
    from: &'static str,
    to: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let bytes = hello();
        let end = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < end {
            let Ok(mut s) = connect_from(from, to) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            connected.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut i = 0;
            let mut next = Instant::now();
            'conn: while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                if Instant::now() >= next {
                    if s.write_all(&bytes[i % bytes.len()..][..1]).is_err() {
                        break;
                    }
                    i += 1;
                    next = Instant::now() + every;
                }
                // A closed connection reads as end or error; a timeout means still open.
                match s.read(&mut [0u8; 64]) {
                    Ok(0) => break 'conn,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break 'conn,
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// 64 connections from the primary's own address, each sending a byte of a Hello every 5 s,
/// hold every handshake slot while the secondary restarts: the primary still gets in.
#[test]
fn slow_handshakes_from_the_primarys_address_do_not_keep_it_out() {
    let mut p = synced_pair("fullsync");
    let to: SocketAddr = format!("{}:{}", p.b.ip, p.b.port).parse().unwrap();
    p.b.stop();
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..64)
        .map(|_| {
            slow_client(
                p.a.ip,
                to,
                Duration::from_secs(5),
                Arc::clone(&stop),
                Arc::clone(&connected),
            )
        })
        .collect();
    p.a.wait_for(20, "a sees b gone", |s| s["connection"] != "connected");
    p.b.start();
    let started = Instant::now();
    p.b.ok(&["role", "secondary", "r0"]);
    let end = started + Duration::from_secs(30);
    while Instant::now() < end && p.a.status()["connection"] != "connected" {
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    let attacks = connected.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    for t in attackers {
        t.join().unwrap();
    }
    assert_eq!(
        p.a.status()["connection"],
        "connected",
        "the primary was kept out for 30 s; b log:\n{}",
        p.b.log_text()
    );
    // A correctness bound, not a speed measure: a reconnects with a back-off of up to 5 s.
    assert!(
        took <= Duration::from_secs(8),
        "the primary got in only after {took:?}"
    );
    assert!(attacks >= 64, "only {attacks} attacker connections got in");
    assert!(
        p.b.log_text().contains("to make room for one from"),
        "the slots were never full; b log:\n{}",
        p.b.log_text()
    );
}

/// A client that keeps sending a byte of a Hello every second never finishes it: it is closed
/// at the deadline, not kept as long as it sends.
#[test]
fn a_slow_client_cannot_hold_a_slot_past_the_deadline() {
    let p = synced_pair("fullsync");
    let to: SocketAddr = format!("{}:{}", p.b.ip, p.b.port).parse().unwrap();
    let mut s = connect_from(p.a.ip, to).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let bytes = hello();
    let start = Instant::now();
    let mut closed = None;
    let mut i = 0;
    let mut next = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if Instant::now() >= next {
            if s.write_all(&bytes[i..][..1]).is_err() {
                closed = Some(start.elapsed());
                break;
            }
            i = (i + 1) % (bytes.len() - 1);
            next = Instant::now() + Duration::from_secs(1);
        }
        match s.read(&mut [0u8; 64]) {
            Ok(0) => {
                closed = Some(start.elapsed());
                break;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed = Some(start.elapsed());
                break;
            }
        }
    }
    let closed = closed.expect("the slow client was never closed");
    assert!(
        closed >= DEADLINE - Duration::from_secs(1) && closed <= DEADLINE + Duration::from_secs(3),
        "closed after {closed:?}, the deadline is {DEADLINE:?}"
    );
    assert!(
        p.b.log_contains("no authentication within 10s", 5),
        "b log:\n{}",
        p.b.log_text()
    );
    assert_eq!(p.a.status()["connection"], "connected");
}

fn peer_lines(n: &Node) -> usize {
    n.log_text()
        .lines()
        .filter(|l| l.contains("peer connection") || l.contains("peer connections"))
        .count()
}

/// 2000 garbage connections, from a stranger and from the primary's address, write a bounded
/// number of log lines, and say how many they left out.
#[test]
fn a_flood_of_garbage_connections_writes_few_log_lines() {
    let p = synced_pair("fullsync");
    let to: SocketAddr = format!("{}:{}", p.b.ip, p.b.port).parse().unwrap();
    let before = peer_lines(&p.b);
    let start = Instant::now();
    for i in 0..2000u32 {
        let from = if i % 2 == 0 { "127.0.0.1" } else { p.a.ip };
        let Ok(mut s) = connect_from(from, to) else {
            continue;
        };
        let _ = s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]);
        let _ = s.shutdown(std::net::Shutdown::Write);
        if i % 100 == 0 {
            // Now and then wait for the answer (the end), so the flood is not all queued.
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read_to_end(&mut Vec::new());
        }
    }
    // Let the last ones be handled and the held-back count be said.
    std::thread::sleep(Duration::from_secs(3));
    let secs = start.elapsed().as_secs() as usize + 1;
    let lines = peer_lines(&p.b) - before;
    assert!(
        lines <= 2 * secs + 4,
        "{lines} log lines in {secs} s for 2000 connections; b log:\n{}",
        p.b.log_text()
    );
    assert!(
        p.b.log_text()
            .contains("more refused or failed peer connections not logged"),
        "b log:\n{}",
        p.b.log_text()
    );
    assert_eq!(p.a.status()["connection"], "connected");
}

/// An NBD client that sends writes and never reads the replies (a hung or hostile client)
/// fills its socket. The writes of every connection are answered by the thread that reads
/// the peer's acknowledgements; if that thread waited for this client, every other client's
/// writes would hang with it, up to the reply timeout (30 s). What a user sees instead: the
/// other client's writes go on at once, the link stays up, and the stuck client, once it
/// reads, gets every reply it was owed.
#[test]
fn a_client_that_never_reads_its_replies_stalls_only_itself() {
    if !need("qemu-io", "qemu-utils") {
        return;
    }
    let p = synced_pair("fullsync");
    let mut hog = nbd_connect(&p.a.nbd);
    hog.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Writes (4 KiB each, within the first MiB) until the daemon stops taking them: the
    // replies it owes pile up and it stops reading this connection.
    let mut sent = 0u64;
    let started = Instant::now();
    while sent < 100_000 && started.elapsed() < Duration::from_secs(20) {
        if !nbd_send(&mut hog, 1, sent, (sent % 256) * 4096, &[0x77; 4096]) {
            break;
        }
        sent += 1;
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the daemon took {sent} writes and kept reading a client that reads no replies"
    );
    eprintln!("the stuck client got {sent} writes in before the daemon stopped reading it");
    // Another client of the same export: its writes are answered at once.
    let (_, took) = qemu_io_within(
        &p.a.nbd_uri(),
        &p.a.log,
        &["write -P 0x5a 2M 256k", "write -P 0x5b 3M 64k", "flush"],
        Duration::from_secs(25),
    );
    assert!(
        took < Duration::from_secs(5),
        "another client's writes took {took:?} while one client read no replies"
    );
    let st = p.a.status();
    assert_eq!(st["connection"], "connected", "{st}");
    // The stuck client reads now: one reply per request it sent whole, none failed.
    let mut answered = std::collections::BTreeSet::new();
    let mut b = [0u8; 16];
    while (answered.len() as u64) < sent {
        if hog.read_exact(&mut b).is_err() {
            break;
        }
        assert_eq!(
            u32::from_be_bytes(b[4..8].try_into().unwrap()),
            0,
            "error reply"
        );
        answered.insert(u64::from_be_bytes(b[8..].try_into().unwrap()));
    }
    assert_eq!(
        answered.len() as u64,
        sent,
        "replies owed to the stuck client"
    );
}
