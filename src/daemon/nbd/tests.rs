//! The NBD server driven by real clients (nbdinfo, qemu-io, nbdcopy, fio) and by a raw socket
//! that misbehaves. Each test skips, saying why, when its client is not installed.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command as Proc, Output, Stdio};

const SIZE: u64 = 64 << 20;
const NAME: &str = "hast0";

struct Fixture {
    dir: tempfile::TempDir,
    sock: PathBuf,
    img: PathBuf,
    server: Option<NbdServer>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let dev = Arc::new(FileDevice::open(&img, Some(SIZE)).unwrap());
        Fixture::with_device(dir, img, dev)
    }

    fn with_device(dir: tempfile::TempDir, img: PathBuf, dev: Arc<dyn BlockDevice>) -> Fixture {
        let sock = dir.path().join("nbd.sock");
        let server = NbdServer::start(Some(&sock), None, NAME, dev).unwrap();
        Fixture {
            dir,
            sock,
            img,
            server: Some(server),
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn server(&self) -> &NbdServer {
        self.server.as_ref().unwrap()
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.img).unwrap()
    }
}

/// True when `tool` runs; otherwise prints why the calling test skips.
fn have(tool: &str, test: &str) -> bool {
    let ok = Proc::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("skipping {test}: {tool} is not installed");
    }
    ok
}

fn run(cmd: &mut Proc) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let text = format!(
        "{:?}\nstatus: {}\nstdout: {}\nstderr: {}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    out
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run(Proc::new("nbdinfo").arg("--json").arg(uri));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Deterministic bytes that do not compress or repeat.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn nbdinfo_sees_size_and_capabilities() {
    if !have("nbdinfo", "nbdinfo_sees_size_and_capabilities") {
        return;
    }
    let f = Fixture::new();
    for uri in [
        f.uri(),
        format!("nbd+unix:///{NAME}?socket={}", f.sock.display()),
    ] {
        let info = nbdinfo_json(&uri);
        let e = &info["exports"][0];
        assert_eq!(e["export-size"], SIZE, "{info}");
        for cap in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
        ] {
            assert_eq!(e[cap], true, "{cap}: {info}");
        }
        assert_eq!(e["is_read_only"], false, "{info}");
        assert_eq!(e["block_size_minimum"], 1, "{info}");
        assert_eq!(e["block_size_preferred"], 4096, "{info}");
        assert_eq!(e["block_size_maximum"], 32 << 20, "{info}");
        assert_eq!(info["structured"], false, "{info}");
    }
    // NBD_OPT_LIST names the export.
    let list = run(Proc::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(f.uri()));
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["exports"][0]["export-name"], NAME, "{list}");
    // An unknown export name is refused.
    let bad = Proc::new("nbdinfo")
        .arg(format!("nbd+unix:///nope?socket={}", f.sock.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(f.server().stats().connections >= 4);
}

#[test]
fn qemu_io_write_read_zero_discard_flush_fua() {
    if !have("qemu-io", "qemu_io_write_read_zero_discard_flush_fua") {
        return;
    }
    let f = Fixture::new();
    let cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0x11 1M 1M",
        "write -z 1M 64k",
        "write -z -u 1088k 64k",
        "discard 2M 64k",
        "flush",
        "write -f -P 0xcd 3M 4k",
        "read -P 0xcd 3M 4k",
        "read -P 0 1M 128k",
        "aio_write -P 0x22 4M 64k",
        "aio_write -P 0x33 5M 64k",
        "aio_flush",
        "read -P 0x22 4M 64k",
        "read -P 0x33 5M 64k",
    ];
    let mut cmd = Proc::new("qemu-io");
    cmd.arg("-f").arg("raw");
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(f.uri());
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("failed"), "{stdout}");

    let disk = f.disk();
    let all = |r: std::ops::Range<usize>, v: u8| disk[r].iter().all(|&b| b == v);
    let mib = 1 << 20;
    assert!(all(0..mib, 0xab));
    assert!(all(mib..mib + (128 << 10), 0));
    assert!(all(mib + (128 << 10)..2 * mib, 0x11));
    assert!(all(2 * mib..2 * mib + (64 << 10), 0));
    assert!(all(3 * mib..3 * mib + 4096, 0xcd));
    assert!(all(4 * mib..4 * mib + (64 << 10), 0x22));
    assert!(all(5 * mib..5 * mib + (64 << 10), 0x33));

    let st = f.server().stats();
    assert!(st.writes >= 5 && st.reads >= 5, "{st:?}");
    assert!(st.zeroes >= 2 && st.trims >= 1 && st.flushes >= 2, "{st:?}");
    assert_eq!(
        st.bytes_written,
        (2 * mib + 4096 + 2 * (64 << 10)) as u64,
        "{st:?}"
    );
}

#[test]
fn nbdcopy_in_and_out_round_trips() {
    if !have("nbdcopy", "nbdcopy_in_and_out_round_trips") {
        return;
    }
    let f = Fixture::new();
    let mut data = noise(SIZE as usize, 0x9e37_79b9_7f4a_7c15);
    // A zero stretch, which nbdcopy may send as WRITE_ZEROES.
    data[(8 << 20)..(12 << 20)].fill(0);
    let src = f.dir.path().join("src.img");
    let back = f.dir.path().join("back.img");
    std::fs::write(&src, &data).unwrap();
    run(Proc::new("nbdcopy").arg(&src).arg(f.uri()));
    assert!(f.disk() == data, "backing file differs from the source");
    run(Proc::new("nbdcopy").arg(f.uri()).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "copy out differs");
    // nbdcopy uses several connections when the export allows multi-conn.
    assert!(f.server().stats().connections >= 2);
}

#[test]
fn fio_random_writes_verify() {
    if !have("fio", "fio_random_writes_verify") {
        return;
    }
    let f = Fixture::new();
    let out = run(Proc::new("fio")
        .arg("--name=randwrite")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", f.uri()))
        .arg("--rw=randwrite")
        .arg("--bs=4k")
        .arg("--iodepth=32")
        .arg("--size=16m")
        .arg("--verify=crc32c")
        .arg("--do_verify=1")
        .arg("--verify_fatal=1")
        .arg("--verify_state_save=0"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("err= 0"), "{stdout}");
    assert!(
        !stdout.contains("bad magic") && !stdout.contains("crc32c"),
        "{stdout}"
    );
    let st = f.server().stats();
    assert!(st.writes >= 4096 && st.reads >= 4096, "{st:?}");
}

#[test]
fn tcp_export_answers_nbdinfo() {
    if !have("nbdinfo", "tcp_export_answers_nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(FileDevice::open(dir.path().join("d"), Some(SIZE)).unwrap());
    let server = NbdServer::start(None, Some("127.0.0.1:0".parse().unwrap()), NAME, dev).unwrap();
    let addr = server.tcp_addr().unwrap();
    let info = nbdinfo_json(&format!("nbd://{addr}/{NAME}"));
    assert_eq!(info["exports"][0]["export-size"], SIZE, "{info}");
    server.shutdown();
}

// ---------------------------------------------------------------------------------------------
// A raw client, to send what real clients never do
// ---------------------------------------------------------------------------------------------

fn raw_connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    // Bounds every read so a server bug fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Connects and negotiates with NBD_OPT_EXPORT_NAME.
fn raw_session(sock: &Path) -> UnixStream {
    let mut s = raw_connect(sock);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut o = wire::IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&wire::OPT_EXPORT_NAME.to_be_bytes());
    o.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&o).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), SIZE);
    s
}

fn send(
    s: &mut UnixStream,
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) {
    let r = Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    };
    s.write_all(&r.encode()).unwrap();
    s.write_all(data).unwrap();
}

/// Reads a simple reply: (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).unwrap();
    assert_eq!(
        u32::from_be_bytes(b[..4].try_into().unwrap()),
        wire::SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..].try_into().unwrap()),
    )
}

/// Reads (and drops) whatever the server still sends; true when it then closes the connection.
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn bad_requests_get_errors_and_the_stream_stays_in_sync() {
    let f = Fixture::new();
    let mut s = raw_session(&f.sock);
    // Out of range WRITE: its payload is consumed, the answer is ENOSPC.
    send(
        &mut s,
        wire::CMD_WRITE,
        0,
        1,
        SIZE - 512,
        1024,
        &[0x55; 1024],
    );
    assert_eq!(reply(&mut s), (wire::ENOSPC, 1));
    // Out of range and oversized READs, unknown command, unknown flag.
    send(&mut s, wire::CMD_READ, 0, 2, SIZE, 1, &[]);
    assert_eq!(reply(&mut s), (wire::EINVAL, 2));
    send(&mut s, wire::CMD_READ, 0, 3, 0, MAX_REQUEST + 1, &[]);
    assert_eq!(reply(&mut s), (wire::EINVAL, 3));
    send(&mut s, 42, 0, 4, 0, 0, &[]);
    assert_eq!(reply(&mut s), (wire::EINVAL, 4));
    send(&mut s, wire::CMD_WRITE, 1 << 7, 5, 0, 4, b"abcd");
    assert_eq!(reply(&mut s), (wire::EINVAL, 5));
    // Still in sync: a write and a read of it.
    send(
        &mut s,
        wire::CMD_WRITE,
        wire::CMD_FLAG_FUA,
        6,
        512,
        4,
        b"wxyz",
    );
    assert_eq!(reply(&mut s), (0, 6));
    send(&mut s, wire::CMD_READ, 0, 7, 512, 4, &[]);
    assert_eq!(reply(&mut s), (0, 7));
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"wxyz");
    assert_eq!(&f.disk()[512..516], b"wxyz");
    assert!(f.disk()[SIZE as usize - 512..].iter().all(|&b| b == 0));
    // A WRITE longer than 32 MiB cannot be skipped safely: the server hangs up.
    send(&mut s, wire::CMD_WRITE, 0, 8, 0, MAX_REQUEST + 1, &[]);
    assert!(closed_by_server(&mut s));
    still_serving(&f);
}

/// A fresh client gets a full answer.
fn still_serving(f: &Fixture) {
    let mut s = raw_session(&f.sock);
    send(&mut s, wire::CMD_READ, 0, 99, 0, 4096, &[]);
    assert_eq!(reply(&mut s), (0, 99));
    let mut buf = vec![0u8; 4096];
    s.read_exact(&mut buf).unwrap();
    send(&mut s, wire::CMD_DISC, 0, 100, 0, 0, &[]);
    assert!(closed_by_server(&mut s));
    if have("nbdinfo", "still_serving (nbdinfo part)") {
        let info = nbdinfo_json(&f.uri());
        assert_eq!(info["exports"][0]["export-size"], SIZE);
    }
}

#[test]
fn garbage_closes_the_connection_not_the_server() {
    let f = Fixture::new();
    // Garbage instead of a handshake.
    let mut s = raw_connect(&f.sock);
    s.write_all(&noise(4096, 7)).unwrap();
    assert!(closed_by_server(&mut s));
    // A huge option length.
    let mut s = raw_connect(&f.sock);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    let mut o = 1u32.to_be_bytes().to_vec();
    o.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    o.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    o.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&o).unwrap();
    assert!(closed_by_server(&mut s));
    // Garbage after the handshake, and a connection dropped in the middle of a request.
    let mut s = raw_session(&f.sock);
    s.write_all(&noise(1000, 11)).unwrap();
    assert!(closed_by_server(&mut s));
    let mut s = raw_session(&f.sock);
    send(&mut s, wire::CMD_WRITE, 0, 1, 0, 65536, &[1; 100]);
    drop(s);
    // Random bytes after a valid request magic, many times.
    for i in 0..50u64 {
        let mut s = raw_session(&f.sock);
        let mut junk = wire::REQUEST_MAGIC.to_be_bytes().to_vec();
        junk.extend(noise(24 + (i as usize % 40), i + 1));
        let _ = s.write_all(&junk);
        let _ = s.shutdown(Shutdown::Write);
        // Whatever the server answers, it must end the connection.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    still_serving(&f);
}

/// Records the order of device calls; writes are slow so that a FLUSH arrives while they run.
struct Recorder {
    inner: FileDevice,
    log: Mutex<Vec<String>>,
}

impl BlockDevice for Recorder {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        thread::sleep(Duration::from_millis(30));
        self.inner.write(offset, data, fua)?;
        lock(&self.log).push(format!("write {offset}"));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        lock(&self.log).push("flush".into());
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> io::Result<()> {
        thread::sleep(Duration::from_millis(30));
        self.inner.write_zeroes(offset, len, fua, no_hole)?;
        lock(&self.log).push(format!("zero {offset}"));
        Ok(())
    }
}

#[test]
fn flush_waits_for_earlier_writes_and_disc_drains() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let dev = Arc::new(Recorder {
        inner: FileDevice::open(&img, Some(SIZE)).unwrap(),
        log: Mutex::new(Vec::new()),
    });
    let f = Fixture::with_device(dir, img, dev.clone());
    let mut s = raw_session(&f.sock);
    for i in 0..8u64 {
        send(
            &mut s,
            wire::CMD_WRITE,
            0,
            i,
            i * 4096,
            4096,
            &[i as u8; 4096],
        );
    }
    send(&mut s, wire::CMD_WRITE_ZEROES, 0, 8, 8 * 4096, 4096, &[]);
    send(&mut s, wire::CMD_FLUSH, 0, 9, 0, 0, &[]);
    // Written after the flush and before DISC: must still be done and answered.
    send(&mut s, wire::CMD_WRITE, 0, 10, 10 * 4096, 4096, &[10; 4096]);
    send(&mut s, wire::CMD_DISC, 0, 11, 0, 0, &[]);
    let mut cookies: Vec<u64> = (0..11)
        .map(|_| {
            let (err, cookie) = reply(&mut s);
            assert_eq!(err, 0);
            cookie
        })
        .collect();
    assert!(closed_by_server(&mut s));
    cookies.sort();
    assert_eq!(cookies, (0..11).collect::<Vec<_>>());
    let log = lock(&dev.log).clone();
    let flush_at = log.iter().position(|e| e == "flush").unwrap();
    for i in 0..8u64 {
        let w = log
            .iter()
            .position(|e| *e == format!("write {}", i * 4096))
            .unwrap();
        assert!(w < flush_at, "{log:?}");
    }
    assert!(
        log.iter()
            .position(|e| *e == format!("zero {}", 8 * 4096))
            .unwrap()
            < flush_at
    );
    let disk = f.disk();
    assert!(disk[10 * 4096..11 * 4096].iter().all(|&b| b == 10));
    assert!(disk[7 * 4096..8 * 4096].iter().all(|&b| b == 7));
}

/// A device that answers plain writes later, from another thread (as the replication does
/// from its ack receiver), and serves reads of even blocks at once on the reader's thread.
/// With `held`, a plain write is answered only when the test calls its `Done`.
struct Deferred {
    inner: FileDevice,
    log: Arc<Mutex<Vec<String>>>,
    held: Option<Arc<Mutex<Vec<Done>>>>,
    busy_poll: Duration,
}

impl BlockDevice for Deferred {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.inner.write(offset, data, fua)?;
        lock(&self.log).push(format!("answer {offset}"));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        lock(&self.log).push("flush".into());
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, fua, no_hole)
    }
    fn writes_then(&self) -> bool {
        true
    }
    fn busy_poll(&self) -> Duration {
        self.busy_poll
    }
    fn write_then(&self, offset: u64, data: Payload, done: Done) {
        if let Err(e) = self.inner.write(offset, &data, false) {
            return done(Err(e));
        }
        if let Some(held) = &self.held {
            return lock(held).push(done);
        }
        let log = Arc::clone(&self.log);
        thread::spawn(move || {
            // The "peer" answers late, and the last write first; it holds the payload until
            // then, as the replication's sender does, and drops it on its own thread.
            thread::sleep(Duration::from_millis(200 - offset / 4096 * 20));
            lock(&log).push(format!("answer {offset}"));
            done(Ok(()));
            drop(data);
        });
    }
    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        (offset / 4096 % 2 == 0).then(|| {
            lock(&self.log).push(format!("read now {offset}"));
            self.inner.read(offset, buf)
        })
    }
}

/// Writes answered from another thread: each reply waits for its answer, a FLUSH waits for
/// every earlier write's answer, and DISC for every answer; reads served at once or by a
/// worker return the data.
#[test]
fn writes_answered_later_are_replied_then_and_flush_waits_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let log = Arc::new(Mutex::new(Vec::new()));
    let dev = Arc::new(Deferred {
        inner: FileDevice::open(&img, Some(SIZE)).unwrap(),
        log: Arc::clone(&log),
        held: None,
        busy_poll: Duration::ZERO,
    });
    let f = Fixture::with_device(dir, img, dev);
    let mut s = raw_session(&f.sock);
    // Alone in flight: started on the reader's thread; answered before anything else is sent.
    send(&mut s, wire::CMD_WRITE, 0, 100, 9 * 4096, 4096, &[9; 4096]);
    assert_eq!(reply(&mut s), (0, 100));
    assert_eq!(lock(&log).clone(), vec!["answer 36864".to_string()]);
    for i in 0..8u64 {
        send(
            &mut s,
            wire::CMD_WRITE,
            0,
            i,
            i * 4096,
            4096,
            &[i as u8 + 1; 4096],
        );
    }
    send(&mut s, wire::CMD_FLUSH, 0, 8, 0, 0, &[]);
    let mut cookies: Vec<u64> = (0..9)
        .map(|_| {
            let (err, cookie) = reply(&mut s);
            assert_eq!(err, 0);
            if cookie < 8 {
                let answered = format!("answer {}", cookie * 4096);
                assert!(
                    lock(&log).contains(&answered),
                    "reply {cookie} before its answer"
                );
            }
            cookie
        })
        .collect();
    let entries = lock(&log).clone();
    let flush_at = entries.iter().position(|e| e == "flush").unwrap();
    for i in 0..8u64 {
        let a = entries
            .iter()
            .position(|e| *e == format!("answer {}", i * 4096))
            .unwrap();
        assert!(a < flush_at, "{entries:?}");
    }
    cookies.sort();
    assert_eq!(cookies, (0..9).collect::<Vec<_>>());
    for i in 0..8u64 {
        send(&mut s, wire::CMD_READ, 0, 20 + i, i * 4096, 4096, &[]);
        assert_eq!(reply(&mut s), (0, 20 + i));
        let mut data = vec![0u8; 4096];
        s.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&b| b == i as u8 + 1), "read of block {i}");
    }
    assert!(lock(&log).contains(&"read now 8192".to_string()));
    // Answers still due at DISC are sent before the connection closes.
    send(&mut s, wire::CMD_WRITE, 0, 30, 4096, 4096, &[7; 4096]);
    send(&mut s, wire::CMD_WRITE, 0, 31, 2 * 4096, 4096, &[7; 4096]);
    send(&mut s, wire::CMD_DISC, 0, 32, 0, 0, &[]);
    let mut last: Vec<u64> = (0..2).map(|_| reply(&mut s).1).collect();
    last.sort();
    assert_eq!(last, vec![30, 31]);
    assert!(closed_by_server(&mut s));
}

/// The reader that stays awake for a lone write's answer (`daemon.busy_poll`) goes back to
/// the client as soon as it sends another request, and stops waiting once the write is
/// answered: a client at queue depth 2 is never held up by the first write's wait.
#[test]
fn a_reader_waiting_for_a_lone_write_serves_the_next_request_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let held = Arc::new(Mutex::new(Vec::new()));
    // Held, and a wait far longer than any test takes.
    let dev = Arc::new(Deferred {
        inner: FileDevice::open(&img, Some(SIZE)).unwrap(),
        log: Arc::default(),
        held: Some(Arc::clone(&held)),
        busy_poll: Duration::from_secs(600),
    });
    let f = Fixture::with_device(dir, img, dev);
    let mut s = raw_session(&f.sock);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Alone in flight, and held: the reader now waits for its answer (up to 600 s). The read
    // below is of an even block: served on the reader's thread, as soon as it reads it.
    send(&mut s, wire::CMD_WRITE, 0, 1, 0, 4096, &[5; 4096]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lock(&held).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the write never reached the device"
        );
        thread::sleep(Duration::from_millis(1));
    }
    // A read sent meanwhile is answered while the write still is not.
    send(&mut s, wire::CMD_READ, 0, 2, 0, 4096, &[]);
    assert_eq!(reply(&mut s), (0, 2), "the read waited for the held write");
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 5));
    assert_eq!(lock(&held).len(), 1);
    // Answered from another thread: the reply goes out, the reader serves the next request.
    let done = lock(&held).pop().unwrap();
    thread::spawn(move || done(Ok(())));
    assert_eq!(reply(&mut s), (0, 1));
    send(&mut s, wire::CMD_WRITE, 0, 3, 4096, 4096, &[6; 4096]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(done) = lock(&held).pop() {
            done(Ok(()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second write never reached the device"
        );
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reply(&mut s), (0, 3));
    send(&mut s, wire::CMD_DISC, 0, 4, 0, 0, &[]);
    assert!(closed_by_server(&mut s));
}

#[test]
fn shutdown_closes_clients_and_removes_the_socket() {
    let mut f = Fixture::new();
    let mut s = raw_session(&f.sock);
    // A second server cannot take a live socket.
    let dev2 = Arc::new(FileDevice::open(&f.img, None).unwrap());
    let err = NbdServer::start(Some(&f.sock), None, NAME, dev2.clone())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("served by another process"),
        "{err}"
    );
    // A regular file in the way is not replaced.
    let plain = f.dir.path().join("plain");
    std::fs::write(&plain, b"keep").unwrap();
    assert!(NbdServer::start(Some(&plain), None, NAME, dev2.clone()).is_err());
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");

    f.server.take().unwrap().shutdown();
    assert!(!f.sock.exists());
    assert!(closed_by_server(&mut s));
    assert!(UnixStream::connect(&f.sock).is_err());

    // A stale socket file (nobody listening) is replaced, and the mode is 0600.
    let stale = UnixListener::bind(&f.sock).unwrap();
    drop(stale);
    let server = NbdServer::start(Some(&f.sock), None, NAME, dev2).unwrap();
    let mode = std::fs::metadata(&f.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(raw_session(&f.sock));
    server.shutdown();
    assert!(!f.sock.exists());
}

/// Not a test: fio against this server and against qemu-nbd on the same kind of file, printed
/// side by side. Run with `cargo test --release bench_vs_qemu_nbd -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_vs_qemu_nbd() {
    if !have("fio", "bench_vs_qemu_nbd") || !have("qemu-nbd", "bench_vs_qemu_nbd") {
        return;
    }
    let size: u64 = 512 << 20;
    let dir = tempfile::tempdir().unwrap();
    let ours_img = dir.path().join("ours.img");
    let qemu_img = dir.path().join("qemu.img");
    let data = noise(size as usize, 5);
    std::fs::write(&ours_img, &data).unwrap();
    std::fs::write(&qemu_img, &data).unwrap();
    drop(data);
    let ours_sock = dir.path().join("ours.sock");
    let qemu_sock = dir.path().join("qemu.sock");
    let dev = Arc::new(FileDevice::open(&ours_img, None).unwrap());
    let server = NbdServer::start(Some(&ours_sock), None, "", dev).unwrap();
    /// Kills qemu-nbd even when the benchmark panics.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _qemu = Child(
        Proc::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--cache=writeback",
                "--aio=threads",
                "-t",
                "-k",
            ])
            .arg(&qemu_sock)
            .arg(&qemu_img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if UnixStream::connect(&qemu_sock).is_ok() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let jobs = [
        ("seq write 1M qd16", "write", "1m", 16),
        ("rand write 4k qd1", "randwrite", "4k", 1),
        ("rand write 4k qd32", "randwrite", "4k", 32),
        ("rand read 4k qd32", "randread", "4k", 32),
    ];
    for (label, rw, bs, depth) in jobs {
        for (who, sock) in [("tandem", &ours_sock), ("qemu-nbd", &qemu_sock)] {
            let out = run(Proc::new("fio")
                .arg("--name=bench")
                .arg("--ioengine=nbd")
                .arg(format!("--uri=nbd+unix:///?socket={}", sock.display()))
                .arg(format!("--rw={rw}"))
                .arg(format!("--bs={bs}"))
                .arg(format!("--iodepth={depth}"))
                .arg(format!("--size={size}"))
                .arg("--time_based=1")
                .arg("--runtime=5")
                .arg("--output-format=json"));
            // fio may print notes before the JSON.
            let start = out.stdout.iter().position(|&b| b == b'{').unwrap_or(0);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout[start..]).unwrap();
            let side = if rw.contains("read") { "read" } else { "write" };
            let j = &v["jobs"][0][side];
            println!(
                "{label:20} {who:9} {:>10.0} IOPS {:>8.1} MiB/s p50 {:>6} us",
                j["iops"].as_f64().unwrap_or(0.0),
                j["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                j["clat_ns"]["percentile"]["50.000000"]
                    .as_u64()
                    .unwrap_or(0)
                    / 1000,
            );
        }
    }
    server.shutdown();
}

#[test]
fn shutdown_during_pipelined_io_returns_and_closes() {
    let mut f = Fixture::new();
    let mut clients = Vec::new();
    for c in 0..4u64 {
        let mut s = raw_session(&f.sock);
        let mut r = s.try_clone().unwrap();
        // Keeps writing until the server hangs up.
        let writer = thread::spawn(move || {
            for i in 0..100_000u64 {
                let off = ((c * 1000 + i) % 8000) * 4096;
                let head = Request {
                    flags: 0,
                    kind: wire::CMD_WRITE,
                    cookie: i,
                    offset: off,
                    len: 4096,
                }
                .encode();
                if s.write_all(&head).is_err() || s.write_all(&[c as u8; 4096]).is_err() {
                    return;
                }
            }
        });
        // Drains and counts replies so the server never blocks on us.
        let answered = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&answered);
        let reader = thread::spawn(move || {
            let mut b = [0u8; 16];
            while r.read_exact(&mut b).is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        clients.push((writer, reader, answered));
    }
    // Wait until every client has had answers, then pull the export away.
    let all_answered = || clients.iter().all(|c| c.2.load(Ordering::Relaxed) >= 10);
    for _ in 0..6000 {
        if all_answered() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(all_answered());
    f.server.take().unwrap().shutdown();
    assert!(!f.sock.exists());
    for (w, r, _) in clients {
        w.join().unwrap();
        r.join().unwrap();
    }
    assert!(UnixStream::connect(&f.sock).is_err());
}

/// A client that sends reads and never takes the replies is disconnected once a reply waits
/// longer than the reply timeout; meanwhile and afterwards other clients are served.
#[test]
fn a_client_that_never_reads_replies_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let dev = Arc::new(FileDevice::open(&img, Some(SIZE)).unwrap());
    let sock = dir.path().join("nbd.sock");
    let bound = Duration::from_secs(2);
    let server = NbdServer::start_with(Some(&sock), None, NAME, dev, bound).unwrap();
    let f = Fixture {
        dir,
        sock,
        img,
        server: Some(server),
    };
    let mut s = raw_session(&f.sock);
    // 100 MiB of replies asked for, far more than the socket buffers hold.
    for cookie in 0..100 {
        send(&mut s, wire::CMD_READ, 0, cookie, 0, 1 << 20, &[]);
    }
    let sent = Instant::now();
    still_serving(&f);
    // Poll (bounded) until the server has hung up: a peek sees the buffered replies, so look
    // at the connection count instead of reading, which would unblock the server.
    let mut closed = false;
    while sent.elapsed() < bound * 5 {
        if *lock(&f.server().shared.live) == 0 {
            closed = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let took = sent.elapsed();
    assert!(closed, "the stuck connection is still open after {took:?}");
    assert!(took >= bound, "closed after {took:?}, before the bound");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_by_server(&mut s));
    still_serving(&f);
}
