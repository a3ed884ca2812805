//! A minimal NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies, one request at a time).
//!
//! Enough for `tandem demo` to write and verify data on a fresh machine that has no NBD client
//! installed, and for tests that want to talk to an export without external tools.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::daemon::nbd::wire::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_EXPORT, NBDMAGIC, OPT_GO, OPT_REPLY_MAGIC, REP_ACK, REP_INFO, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
};
use crate::daemon::nbd::{read_u32, read_u64};

pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    handle: u64,
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

impl NbdClient {
    /// Connect to the export on a unix socket and negotiate with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> Result<NbdClient> {
        let mut sock = UnixStream::connect(socket)
            .with_context(|| format!("cannot connect to the NBD export at {}", socket.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        sock.set_write_timeout(Some(Duration::from_secs(60)))?;
        let s = &mut sock;
        if read_u64(s)? != NBDMAGIC || read_u64(s)? != IHAVEOPT {
            bail!("{}: not an NBD server (bad greeting)", socket.display());
        }
        let flags = read_u16(s)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("{}: server does not speak fixed newstyle", socket.display());
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        s.write_all(&client_flags.to_be_bytes())?;
        let name = export.as_bytes();
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        for _ in 0..64 {
            if read_u64(s)? != OPT_REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let _opt = read_u32(s)?;
            let rep = read_u32(s)?;
            let len = read_u32(s)? as usize;
            if len > 64 * 1024 {
                bail!("option reply too long ({len} bytes)");
            }
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match rep {
                REP_ACK => break,
                REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
                REP_INFO => {}
                e if e & 0x8000_0000 != 0 => {
                    bail!(
                        "export {export:?} refused: error {:#x} {}",
                        e,
                        String::from_utf8_lossy(&data)
                    )
                }
                _ => {}
            }
        }
        let size = size.context("server sent no export size")?;
        Ok(NbdClient {
            sock,
            size,
            handle: 0,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<()> {
        self.handle += 1;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        self.sock.write_all(&h)?;
        self.sock.write_all(payload)?;
        Ok(())
    }

    fn reply(&mut self) -> Result<()> {
        let s = &mut self.sock;
        if read_u32(s)? != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic");
        }
        let err = read_u32(s)?;
        let handle = read_u64(s)?;
        if handle != self.handle {
            bail!("reply for handle {handle}, expected {}", self.handle);
        }
        if err != 0 {
            bail!(
                "server answered error {err} ({})",
                io::Error::from_raw_os_error(err as i32)
            );
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.reply()
            .with_context(|| format!("NBD write of {} bytes at {offset}", data.len()))
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.request(CMD_READ, offset, buf.len() as u32, &[])?;
        self.reply()
            .with_context(|| format!("NBD read of {} bytes at {offset}", buf.len()))?;
        self.sock.read_exact(buf)?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply().context("NBD flush")
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}
