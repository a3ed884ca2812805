//! The ggate dispatch, driven by a fake kernel that behaves like `sys/geom/gate/g_gate.c`:
//! START hands out queued requests (ENOMEM and the length needed when a write or delete does
//! not fit the buffer), DONE takes the answer (and a read's data), DESTROY is refused while the
//! provider is open unless forced, and a destroyed provider cancels every START.

use super::*;
use std::collections::{HashMap, VecDeque};
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

const SIZE: u64 = 8 << 20;

#[derive(Clone, Debug)]
struct Req {
    cmd: u32,
    offset: i64,
    length: i64,
    data: Vec<u8>,
}

fn req(cmd: u32, offset: i64, length: i64) -> Step {
    Step::Req(Req {
        cmd,
        offset,
        length,
        data: Vec::new(),
    })
}

fn write(offset: i64, data: Vec<u8>) -> Step {
    Step::Req(Req {
        cmd: BIO_WRITE,
        offset,
        length: data.len() as i64,
        data,
    })
}

enum Step {
    Req(Req),
    /// The START ioctl itself fails with this errno.
    StartErr(i32),
    /// START succeeds with this gctl_error.
    GctlErr(i32),
}

#[derive(Debug, PartialEq)]
struct Reply {
    cmd: u32,
    offset: i64,
    error: i32,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Step>,
    out: HashMap<usize, Req>,
    seq: usize,
    replies: Vec<Reply>,
    /// Buffer lengths START was called with.
    lengths: Vec<i64>,
    /// START blocks on an empty queue (a live provider) instead of cancelling.
    wait_when_empty: bool,
    /// The provider is open: an unforced DESTROY gets EBUSY.
    open: bool,
    destroyed: bool,
    destroys: Vec<bool>,
    /// DONE fails with this errno.
    done_error: Option<i32>,
}

struct Fake {
    state: Mutex<State>,
    cv: Condvar,
}

impl Fake {
    fn new(steps: Vec<Step>) -> Arc<Fake> {
        Arc::new(Fake {
            state: Mutex::new(State {
                queue: steps.into(),
                ..State::default()
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn push(&self, step: Step) {
        self.lock().queue.push_back(step);
        self.cv.notify_all();
    }

    fn replies(&self) -> Vec<Reply> {
        std::mem::take(&mut self.lock().replies)
    }

    fn wait_replies(&self, n: usize) {
        let mut s = self.lock();
        while s.replies.len() < n {
            s = self.cv.wait(s).unwrap();
        }
    }
}

fn errno_err(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl GateCtl for Fake {
    fn unit(&self) -> i32 {
        7
    }

    fn start(&self, io: &mut CtlIo) -> io::Result<()> {
        assert_eq!(io.gctl_version, G_GATE_VERSION);
        assert_eq!(io.gctl_unit, 7);
        let mut s = self.lock();
        s.lengths.push(io.gctl_length);
        loop {
            if s.destroyed {
                io.gctl_error = libc::ECANCELED;
                return Ok(());
            }
            match s.queue.front() {
                None if s.wait_when_empty => s = self.cv.wait(s).unwrap(),
                None => {
                    io.gctl_error = libc::ECANCELED;
                    return Ok(());
                }
                Some(_) => break,
            }
        }
        let r = match s.queue.pop_front() {
            Some(Step::Req(r)) => r,
            Some(Step::StartErr(e)) => return Err(errno_err(e)),
            Some(Step::GctlErr(e)) => {
                io.gctl_error = e;
                return Ok(());
            }
            None => unreachable!(),
        };
        io.gctl_cmd = r.cmd;
        if matches!(r.cmd, BIO_WRITE | BIO_DELETE) && r.length > io.gctl_length {
            io.gctl_length = r.length;
            io.gctl_error = libc::ENOMEM;
            s.queue.push_front(Step::Req(r));
            return Ok(());
        }
        s.seq += 1;
        io.gctl_seq = s.seq;
        io.gctl_offset = r.offset;
        io.gctl_length = r.length;
        if r.cmd == BIO_WRITE {
            // The kernel's copyout of bio_length bytes: only ever within gctl_length.
            // SAFETY: gctl_data points to at least gctl_length (>= data.len()) writable bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(r.data.as_ptr(), io.gctl_data.cast(), r.data.len())
            };
        }
        let seq = s.seq;
        s.out.insert(seq, r);
        Ok(())
    }

    fn done(&self, io: &mut CtlIo) -> io::Result<()> {
        let mut s = self.lock();
        if let Some(e) = s.done_error {
            return Err(errno_err(e));
        }
        let Some(r) = s.out.remove(&io.gctl_seq) else {
            return Ok(());
        };
        let mut data = Vec::new();
        if r.cmd == BIO_READ && io.gctl_error == 0 {
            data = vec![0u8; r.length as usize];
            // The kernel's copyin of bio_length bytes from gctl_data.
            // SAFETY: the server promises gctl_data holds the read's bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(io.gctl_data.cast(), data.as_mut_ptr(), data.len())
            };
        }
        s.replies.push(Reply {
            cmd: r.cmd,
            offset: r.offset,
            error: io.gctl_error,
            data,
        });
        self.cv.notify_all();
        Ok(())
    }

    fn destroy(&self, force: bool) -> io::Result<()> {
        let mut s = self.lock();
        s.destroys.push(force);
        if s.destroyed {
            return Err(errno_err(libc::ENXIO));
        }
        if s.open && !force {
            return Err(errno_err(libc::EBUSY));
        }
        s.destroyed = true;
        self.cv.notify_all();
        Ok(())
    }
}

/// A block device in memory that logs the calls and fails them on demand.
struct Mem {
    data: Mutex<Vec<u8>>,
    log: Mutex<Vec<String>>,
    fail: AtomicBool,
}

impl Mem {
    fn new() -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new(vec![0; SIZE as usize]),
            log: Mutex::new(Vec::new()),
            fail: AtomicBool::new(false),
        })
    }

    fn note(&self, what: String) -> io::Result<()> {
        self.log.lock().unwrap().push(what);
        if self.fail.load(Ordering::SeqCst) {
            return Err(errno_err(libc::ENOSPC));
        }
        Ok(())
    }

    fn log(&self) -> Vec<String> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.note(format!("read {offset} {}", buf.len()))?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.note(format!("write {offset} {} fua={fua}", data.len()))?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.note("flush".into())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.note(format!("trim {offset} {len} fua={fua}"))?;
        let (o, l) = (offset as usize, len as usize);
        self.data.lock().unwrap()[o..o + l].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _no_hole: bool) -> io::Result<()> {
        self.note(format!("zeroes {offset} {len}"))
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(seed) % 251) as u8)
        .collect()
}

fn reply(cmd: u32, offset: i64, error: i32, data: Vec<u8>) -> Reply {
    Reply {
        cmd,
        offset,
        error,
        data,
    }
}

/// The structures and ioctl numbers of `sys/geom/gate/g_gate.h` (G_GATE_VERSION 3) as the C
/// compiler lays them out on amd64 (LP64: u_int/int 4 bytes, off_t/uintptr_t/pointers 8,
/// NAME_MAX 255, G_GATE_INFOSIZE 2048), worked out by hand.
#[cfg(target_pointer_width = "64")]
#[test]
fn structures_and_ioctls_match_g_gate_h_on_amd64() {
    // struct g_gate_ctl_create: version 0..4, pad 4..8, mediasize 8..16, sectorsize 16,
    // flags 20, maxcount 24, timeout 28, name[255] 32..287, info[2048] 287..2335,
    // readprov[255] 2335..2590, pad to 8 → readoffset 2592..2600, unit 2600..2604,
    // size rounded to the alignment of 8: 2608.
    assert_eq!(offset_of!(CtlCreate, gctl_version), 0);
    assert_eq!(offset_of!(CtlCreate, gctl_mediasize), 8);
    assert_eq!(offset_of!(CtlCreate, gctl_sectorsize), 16);
    assert_eq!(offset_of!(CtlCreate, gctl_flags), 20);
    assert_eq!(offset_of!(CtlCreate, gctl_maxcount), 24);
    assert_eq!(offset_of!(CtlCreate, gctl_timeout), 28);
    assert_eq!(offset_of!(CtlCreate, gctl_name), 32);
    assert_eq!(offset_of!(CtlCreate, gctl_info), 287);
    assert_eq!(offset_of!(CtlCreate, gctl_readprov), 2335);
    assert_eq!(offset_of!(CtlCreate, gctl_readoffset), 2592);
    assert_eq!(offset_of!(CtlCreate, gctl_unit), 2600);
    assert_eq!(size_of::<CtlCreate>(), 2608);

    // struct g_gate_ctl_destroy: version 0, unit 4, force 8, name[255] 12..267, alignment 4
    // → 268.
    assert_eq!(offset_of!(CtlDestroy, gctl_unit), 4);
    assert_eq!(offset_of!(CtlDestroy, gctl_force), 8);
    assert_eq!(offset_of!(CtlDestroy, gctl_name), 12);
    assert_eq!(size_of::<CtlDestroy>(), 268);

    // struct g_gate_ctl_cancel: version 0, unit 4, seq 8..16, name[255] 16..271, alignment 8
    // → 272.
    assert_eq!(offset_of!(CtlCancel, gctl_unit), 4);
    assert_eq!(offset_of!(CtlCancel, gctl_seq), 8);
    assert_eq!(offset_of!(CtlCancel, gctl_name), 16);
    assert_eq!(size_of::<CtlCancel>(), 272);

    // struct g_gate_ctl_io: version 0, unit 4, seq 8..16, cmd 16..20, pad → offset 24..32,
    // length 32..40, data 40..48, error 48..52, alignment 8 → 56.
    assert_eq!(offset_of!(CtlIo, gctl_unit), 4);
    assert_eq!(offset_of!(CtlIo, gctl_seq), 8);
    assert_eq!(offset_of!(CtlIo, gctl_cmd), 16);
    assert_eq!(offset_of!(CtlIo, gctl_offset), 24);
    assert_eq!(offset_of!(CtlIo, gctl_length), 32);
    assert_eq!(offset_of!(CtlIo, gctl_data), 40);
    assert_eq!(offset_of!(CtlIo, gctl_error), 48);
    assert_eq!(size_of::<CtlIo>(), 56);

    // _IOWR('m', n, t) = 0xc0000000 | (sizeof(t) & 0x1fff) << 16 | 0x6d << 8 | n:
    // CREATE 2608 = 0xa30 → 0x0a30 << 16 = 0x0a300000, DESTROY 268 = 0x10c, CANCEL 272 = 0x110,
    // START/DONE 56 = 0x38.
    // (MODIFY is 'm' 1; tandem does not use it.)
    assert_eq!(G_GATE_CMD_CREATE, 0xca30_6d00);
    assert_eq!(G_GATE_CMD_DESTROY, 0xc10c_6d02);
    assert_eq!(G_GATE_CMD_CANCEL, 0xc110_6d03);
    assert_eq!(G_GATE_CMD_START, 0xc038_6d04);
    assert_eq!(G_GATE_CMD_DONE, 0xc038_6d05);
    assert_eq!((G_GATE_VERSION, G_GATE_NAME_GIVEN), (3, -2));
    assert_eq!((BIO_READ, BIO_WRITE, BIO_DELETE, BIO_FLUSH), (1, 2, 3, 5));
}

#[test]
fn requests_go_through_the_block_device() {
    let data = pattern(8192, 7);
    let fake = Fake::new(vec![
        write(4096, data.clone()),
        req(BIO_READ, 4096, 8192),
        req(BIO_DELETE, 4096, 4096),
        req(BIO_FLUSH, 0, 0),
        req(BIO_READ, 4096, 8192),
    ]);
    let dev = Mem::new();
    let end = serve(fake.as_ref(), dev.as_ref(), "tandem/r0").unwrap();
    assert_eq!(end, End::Cancelled);
    let mut after_trim = vec![0u8; 4096];
    after_trim.extend_from_slice(&data[4096..]);
    assert_eq!(
        fake.replies(),
        vec![
            reply(BIO_WRITE, 4096, 0, vec![]),
            reply(BIO_READ, 4096, 0, data.clone()),
            reply(BIO_DELETE, 4096, 0, vec![]),
            reply(BIO_FLUSH, 0, 0, vec![]),
            reply(BIO_READ, 4096, 0, after_trim),
        ]
    );
    // ggate carries no FUA: durability comes with BIO_FLUSH.
    assert_eq!(
        dev.log(),
        [
            "write 4096 8192 fua=false",
            "read 4096 8192",
            "trim 4096 4096 fua=false",
            "flush",
            "read 4096 8192",
        ]
    );
}

#[test]
fn bad_requests_get_an_error_reply_and_serving_goes_on() {
    let fake = Fake::new(vec![
        req(BIO_READ, SIZE as i64 - 512, 1024),
        req(BIO_READ, -512, 512),
        req(BIO_READ, 0, -1),
        req(BIO_DELETE, i64::MAX - 10, 512),
        req(4, 0, 0),
        req(0x0a, 0, 0),
        write(0, b"still serving".to_vec()),
    ]);
    let dev = Mem::new();
    assert_eq!(
        serve(fake.as_ref(), dev.as_ref(), "tandem/r0").unwrap(),
        End::Cancelled
    );
    let errors: Vec<i32> = fake.replies().iter().map(|r| r.error).collect();
    let (inval, notsup) = (libc::EINVAL, libc::EOPNOTSUPP);
    assert_eq!(errors, [inval, inval, inval, inval, notsup, notsup, 0]);
    // Only the good request reached the device.
    assert_eq!(dev.log(), ["write 0 13 fua=false"]);
}

#[test]
fn device_errors_become_eio() {
    let fake = Fake::new(vec![
        write(0, vec![1; 512]),
        req(BIO_READ, 0, 512),
        req(BIO_DELETE, 0, 512),
        req(BIO_FLUSH, 0, 0),
    ]);
    let dev = Mem::new();
    dev.fail.store(true, Ordering::SeqCst);
    serve(fake.as_ref(), dev.as_ref(), "tandem/r0").unwrap();
    let replies = fake.replies();
    assert_eq!(replies.len(), 4);
    // The device said ENOSPC; the kernel is told EIO, and a failed read carries no data.
    assert!(
        replies
            .iter()
            .all(|r| r.error == libc::EIO && r.data.is_empty())
    );
}

#[test]
fn buffers_grow_for_long_requests() {
    let big = pattern(BUFFER_START * 4, 13);
    let fake = Fake::new(vec![
        write(0, big.clone()),
        req(BIO_READ, 0, big.len() as i64),
        req(BIO_DELETE, 0, 4 << 20),
        write(4 << 20, vec![9; 512]),
    ]);
    let dev = Mem::new();
    serve(fake.as_ref(), dev.as_ref(), "tandem/r0").unwrap();
    let replies = fake.replies();
    assert_eq!(replies.len(), 4);
    assert!(replies.iter().all(|r| r.error == 0));
    assert_eq!(replies[1].data, big);
    // START saw the initial buffer, ENOMEM made it grow to the write; the 4 MiB delete grew it
    // again, and after it the buffer went back to its initial size.
    let lengths = fake.lock().lengths.clone();
    let (start, write_len, delete) = (BUFFER_START as i64, big.len() as i64, 4 << 20);
    assert_eq!(
        lengths,
        [start, write_len, write_len, write_len, delete, start, start]
    );
    assert_eq!(
        &dev.data.lock().unwrap()[4 << 20..(4 << 20) + 512],
        &[9; 512]
    );
}

#[test]
fn requests_longer_than_served_stop_the_worker_with_an_error() {
    let fake = Fake::new(vec![req(BIO_DELETE, 0, REQUEST_MAX as i64 + 4096)]);
    let err = serve(fake.as_ref(), Mem::new().as_ref(), "tandem/r0").unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("tandem/r0") && text.contains("DELETE(0, "),
        "{text}"
    );
    // A READ too long is answered instead: the kernel already handed it over.
    let fake = Fake::new(vec![req(BIO_READ, 0, REQUEST_MAX as i64 + 4096)]);
    serve(fake.as_ref(), Mem::new().as_ref(), "tandem/r0").unwrap();
    assert_eq!(fake.replies()[0].error, libc::EINVAL);
}

#[test]
fn start_errors_end_the_loop_as_hastd_does() {
    // ENXIO: the provider is gone; EINTR is retried.
    let fake = Fake::new(vec![
        Step::StartErr(libc::EINTR),
        Step::StartErr(libc::ENXIO),
    ]);
    assert_eq!(
        serve(fake.as_ref(), Mem::new().as_ref(), "tandem/r0").unwrap(),
        End::Gone
    );
    let fake = Fake::new(vec![write(0, vec![1; 512]), Step::GctlErr(libc::ECANCELED)]);
    assert_eq!(
        serve(fake.as_ref(), Mem::new().as_ref(), "tandem/r0").unwrap(),
        End::Cancelled
    );
    assert_eq!(fake.replies().len(), 1);
    // Anything else is an error naming the control device and the provider.
    let fake = Fake::new(vec![Step::StartErr(libc::EINVAL)]);
    let text = format!(
        "{:#}",
        serve(fake.as_ref(), Mem::new().as_ref(), "tandem/r0").unwrap_err()
    );
    assert!(
        text.starts_with("G_GATE_CMD_START on /dev/ggctl for tandem/r0: "),
        "{text}"
    );
    let fake = Fake::new(vec![Step::GctlErr(libc::EPERM)]);
    assert!(serve(fake.as_ref(), Mem::new().as_ref(), "tandem/r0").is_err());
}

#[test]
fn done_after_a_forced_destroy_is_not_fatal() {
    let fake = Fake::new(vec![write(0, vec![1; 512]), write(512, vec![2; 512])]);
    fake.lock().done_error = Some(libc::ENOENT);
    let dev = Mem::new();
    assert_eq!(
        serve(fake.as_ref(), dev.as_ref(), "tandem/r0").unwrap(),
        End::Cancelled
    );
    assert_eq!(dev.log().len(), 2);
    let fake = Fake::new(vec![write(0, vec![1; 512])]);
    fake.lock().done_error = Some(libc::EFAULT);
    let text = format!(
        "{:#}",
        serve(fake.as_ref(), Mem::new().as_ref(), "tandem/r0").unwrap_err()
    );
    assert!(text.contains("G_GATE_CMD_DONE on /dev/ggctl for tandem/r0, WRITE(0, 512)"));
}

#[test]
fn destroy_is_forced_only_after_the_timeout() {
    let fake = Fake::new(vec![]);
    assert_eq!(
        destroy(fake.as_ref(), "tandem/r0", Duration::from_secs(5)).unwrap(),
        Destroyed::Clean
    );
    assert_eq!(fake.lock().destroys, [false]);
    // Already gone.
    assert_eq!(
        destroy(fake.as_ref(), "tandem/r0", Duration::from_secs(5)).unwrap(),
        Destroyed::Gone
    );

    let fake = Fake::new(vec![]);
    fake.lock().open = true;
    let t = Instant::now();
    let how = destroy(fake.as_ref(), "tandem/r0", Duration::from_millis(350)).unwrap();
    assert_eq!(how, Destroyed::Forced);
    assert!(t.elapsed() >= Duration::from_millis(350));
    let destroys = fake.lock().destroys.clone();
    assert!(destroys.len() >= 3, "{destroys:?}");
    assert_eq!(destroys.last(), Some(&true));
    assert!(destroys[..destroys.len() - 1].iter().all(|f| !f));
}

#[test]
fn export_serves_with_many_workers_and_stops_on_destroy() {
    let fake = Fake::new(vec![]);
    fake.lock().wait_when_empty = true;
    let dev = Mem::new();
    let export = Export::start(
        Arc::clone(&fake) as Arc<dyn GateCtl>,
        Arc::clone(&dev) as Arc<dyn BlockDevice>,
        "tandem/r0",
        4,
    )
    .unwrap();
    for i in 0..32 {
        fake.push(write(i * 4096, vec![i as u8; 4096]));
    }
    fake.wait_replies(32);
    assert!(fake.replies().iter().all(|r| r.error == 0));
    for i in 0..32usize {
        assert!(
            dev.data.lock().unwrap()[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8)
        );
    }
    // Open (mounted, say): refused until the timeout, then forced; the workers all end.
    fake.lock().open = true;
    let how = export
        .stop(Duration::from_millis(200), Duration::from_secs(10))
        .unwrap();
    assert_eq!(how, Destroyed::Forced);
    let s = fake.lock();
    assert!(s.destroyed);
    assert_eq!(s.destroys.last(), Some(&true));
}

#[test]
fn names_and_geometry() {
    assert_eq!(
        provider_name(&PathBuf::from("/dev/tandem/hast0")).as_deref(),
        Some("tandem/hast0")
    );
    assert_eq!(provider_name(&PathBuf::from("/dev/tandem/")), None);
    assert_eq!(provider_name(&PathBuf::from("/dev/nbd0")), None);
    assert_eq!(provider_name(&PathBuf::from("/dev/hast/r0")), None);

    assert_eq!(geometry(1 << 30, 512), Ok((1 << 30, 512)));
    assert_eq!(geometry(1 << 30, 0), Ok((1 << 30, 512)));
    assert_eq!(geometry(1 << 30, 4096), Ok((1 << 30, 4096)));
    assert_eq!(geometry(10_000, 4096), Ok((8192, 4096)));
    assert!(geometry(1 << 30, 520).unwrap_err().contains("power of two"));
    assert!(geometry(100, 512).is_err());

    let f = name_field("tandem/r0").unwrap();
    assert_eq!(&f[..10], b"tandem/r0\0");
    assert!(f[9..].iter().all(|&b| b == 0));
    assert!(name_field(&"x".repeat(254)).is_ok());
    assert!(name_field(&"x".repeat(255)).is_err());
    assert!(name_field("").is_err());
    assert!(name_field("a\0b").is_err());
}
