//! The sealed link, seen from the path between the daemons: a reaches b through a recording
//! fault proxy (tests/fault_proxy) that can flip a bit or replay bytes, as an attacker on the
//! network would. What a user would check: the data written through the export never crosses
//! the wire in clear; a frame changed or replayed on the way closes the link, is logged with
//! the peer's address, and its data never lands on the secondary's disk; the pair then
//! reconnects and resyncs to identical replicas.

mod daemon_common;
mod fault_proxy;
mod stamp;

use std::time::{Duration, Instant};

use daemon_common::*;
use fault_proxy::{Dir, Fault, FaultProxy};

const MIB: u64 = 1 << 20;
/// Distinctive bytes to look for on the wire.
const CANARY: &[u8] = b"tandem-sealed-link-canary:";

/// A synced pair whose a reaches b only through a proxy; `encrypt` is `daemon.encrypt` on both.
fn proxied_pair(encrypt: bool) -> (Pair, FaultProxy) {
    let mut proxy = None;
    let p = synced_pair_with("fullsync", |p| {
        if !encrypt {
            for n in [&p.a, &p.b] {
                let text = std::fs::read_to_string(&n.conf).unwrap();
                let text = text.replacen("[daemon]\n", "[daemon]\nencrypt = false\n", 1);
                std::fs::write(&n.conf, text).unwrap();
            }
        }
        let fp = FaultProxy::start(format!("{}:{}", p.b.ip, p.b.port).parse().unwrap());
        fp.record(true);
        p.route_via("a", fp.addr);
        proxy = Some(fp);
    });
    let proxy = proxy.unwrap();
    assert!(proxy.accepted() >= 1, "a did not connect through the proxy");
    (p, proxy)
}

fn client(p: &Pair) -> stamp::Client {
    stamp::Client::connect(&p.a.nbd, "r0").expect("NBD connection to a")
}

fn canary_block(len: usize) -> Vec<u8> {
    CANARY.iter().copied().cycle().take(len).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Write the canary through a's export and look for it in what the proxy forwarded.
fn canary_on_the_wire(encrypt: bool) -> bool {
    let (p, proxy) = proxied_pair(encrypt);
    let c = client(&p);
    let data = canary_block(256 << 10);
    c.write(3 * MIB, &data, false).unwrap();
    c.write(5 * MIB + 4096, &data[..4096], true).unwrap();
    // Large writes while others are in flight: sealed, such a payload is written locally
    // first and then sealed where it lies (alone in flight, it goes to the peer first and
    // is copied into the records). Each write its own bytes, to tell them apart.
    let many: Vec<Vec<u8>> = (0..8u8)
        .map(|i| {
            let mut d = canary_block(256 << 10);
            d.iter_mut().step_by(4096).for_each(|b| *b = i);
            d
        })
        .collect();
    let at = |i: usize| 16 * MIB + i as u64 * (320 << 10);
    std::thread::scope(|t| {
        for (i, d) in many.iter().enumerate() {
            let c = &c;
            t.spawn(move || c.write(at(i), d, false).unwrap());
        }
    });
    c.flush().unwrap();
    // Replicated (fullsync: acknowledged only once b has it).
    assert_eq!(region(&p.b.img, 3 * MIB, data.len()), data);
    // a's own copy is the data too: a payload sealed where it lies is sealed only once
    // a's write has read it.
    assert_eq!(region(&p.a.img, 3 * MIB, data.len()), data);
    for (i, d) in many.iter().enumerate() {
        assert!(
            region(&p.b.img, at(i), d.len()) == *d,
            "b's copy of write {i}"
        );
        assert!(
            region(&p.a.img, at(i), d.len()) == *d,
            "a's copy of write {i}"
        );
    }
    assert_eq!(p.a.status()["connection"], "connected");
    let wire = proxy.recorded(Dir::AToB);
    assert!(wire.len() > data.len(), "the proxy recorded too little");
    contains(&wire, CANARY)
}

#[test]
fn data_written_never_crosses_the_link_in_clear() {
    assert!(
        !canary_on_the_wire(true),
        "the data written through the export is readable on the wire"
    );
}

/// The check above can fail: with `daemon.encrypt = false` the canary is on the wire.
#[test]
fn with_encrypt_off_the_data_crosses_in_clear() {
    assert!(canary_on_the_wire(false));
}

/// Send `fault` into a live link while a 256 KiB write of `byte` goes out, and return the
/// pair once the link closed. b's disk never holds anything but the old zeroes or `byte`.
fn tamper(fault: Fault, byte: u8) -> (Pair, FaultProxy) {
    let (p, proxy) = proxied_pair(true);
    let c = client(&p);
    let off = 7 * MIB;
    let data = vec![byte; 256 << 10];
    let before = proxy.accepted();
    proxy.set(fault);
    // Completes degraded if the link dies under it (fullsync: the peer never acked it).
    c.write(off, &data, true).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while proxy.fault() != Fault::Pass && Instant::now() < end {
        c.write(off, &data, true).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        proxy.fault(),
        Fault::Pass,
        "the proxy never applied {fault:?}"
    );
    assert!(
        p.b.log_contains("failed authentication", 15),
        "b did not log the tampered record; b log:\n{}",
        p.b.log_text()
    );
    let log = p.b.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("failed authentication") && l.contains("link with 127.0.0.2")),
        "the log line names the peer address:\n{log}"
    );
    // Nothing but the old content or the data as written is on b's disk: a changed frame
    // was never applied.
    let on_b = region(&p.b.img, off, data.len());
    assert!(
        on_b.iter().all(|&x| x == 0 || x == byte),
        "bytes on b that were never written: {:?}",
        on_b.iter().find(|&&x| x != 0 && x != byte)
    );
    // The link came back (a new connection through the proxy), resynced, and the replicas
    // agree. The new connection first: right after b closed the old one, a may still show
    // it as connected and complete for a few milliseconds.
    let end = Instant::now() + Duration::from_secs(30);
    while proxy.accepted() <= before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.accepted() > before, "a did not reconnect");
    p.a.wait_for(30, "reconnected and in sync", |s| {
        s["connection"] == "connected" && s["state"] == "complete"
    });
    assert_eq!(region(&p.b.img, off, data.len()), data);
    p.a.ok(&["verify", "r0"]);
    (p, proxy)
}

#[test]
fn a_flipped_bit_closes_the_link_and_never_reaches_the_disk() {
    tamper(Fault::FlipNext(16 << 10), 0xa7);
}

#[test]
fn a_replayed_record_closes_the_link() {
    tamper(Fault::DuplicateNext(1), 0x3c);
}
