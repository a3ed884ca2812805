//! On-disk metadata of a tandem resource and the local disk that holds it.
//!
//! Owns the layout described in `docs/on-disk-format.md`: the data region `[0, data_size)`
//! followed by the dirty-extent bitmap and two 4096-byte header slots, the last two 4096-byte
//! blocks of the (4096-rounded-down) device. Keeping the header last means it can be found
//! without knowing the extent size, and the data regions of the two nodes can be compared with
//! `cmp -n data_size`. An update writes the slot that does not hold the newest valid header, so
//! a write torn by a power cut leaves the other slot to open with. Version-1 disks (one header
//! block, rewritten in place) are still opened and updated as they are.
//!
//! [`Disk`] is the daemon's only handle on the local disk: positional data I/O bounded by
//! `data_size`, the header (generations, flags, previous role) and the [`ActiveMap`].
//! It does not decide anything about roles or sync direction; the engine does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};

use super::activemap::ActiveMap;
use super::diskio;
use super::faultdisk::DiskFile;

/// The format `tandem create` writes: two alternating header slots.
pub const FORMAT_VERSION: u32 = 2;
/// The first format: a single header block, rewritten in place. Still opened and updated.
const FORMAT_VERSION_1: u32 = 1;
#[cfg(test)]
use crate::config::DEFAULT_EXTENT_SIZE;

/// Magic at offset 0 of the header block.
pub const MAGIC: &[u8; 8] = b"TANDEMM1";
/// Size of the header block, and the alignment of every metadata region.
pub const BLOCK: u64 = 4096;
/// The largest single write of data to the disk. Linux (6.18 here) gives the page cache of
/// ext4 files and of block devices folios as large as the write that creates them, and a
/// later small write into a large folio walks every block of it: on this project's test
/// machine a 4 KiB write cost 31 µs of CPU on an ext4 file, 28 µs on a block device, whose
/// pages 1 MiB writes had created, against 10-11 µs after 256 KiB writes and 3 µs after
/// 4 KiB ones (`bench/folios`; xfs: 2 µs either way). A replicated write pays it on both
/// nodes, and a resync writes the secondary's whole disk in large pieces. Pieces of 256 KiB
/// cost a 1 MiB overwrite some 10 % more CPU in the kernel and tandem's sequential writes
/// nothing measurable (bench/README.md, change 21). FreeBSD's buffer cache has no such
/// folios: there a write goes whole.
pub const WRITE_PIECE: usize = if cfg!(target_os = "linux") {
    256 << 10
} else {
    usize::MAX
};
/// Longest resource name the header can hold.
pub const MAX_NAME: usize = 64;

// Header field offsets (see docs/on-disk-format.md).
const OFF_VERSION: usize = 8;
const OFF_CHECKSUM: usize = 12;
const OFF_NAME: usize = 16;
const OFF_UUID: usize = 80;
const OFF_DATA_SIZE: usize = 96;
const OFF_EXTENT_SIZE: usize = 104;
const OFF_LOCAL_GEN: usize = 108;
const OFF_PEER_GEN: usize = 116;
const OFF_FLAGS: usize = 124;
const OFF_PREV_ROLE: usize = 128;
const OFF_SEQ: usize = 136;

const FLAG_EVER_SYNCED: u32 = 1 << 0;
const FLAG_INCONSISTENT: u32 = 1 << 1;
const FLAG_DISCARD_LOCAL: u32 = 1 << 2;
const FLAG_SPLIT_BRAIN: u32 = 1 << 3;
const KNOWN_FLAGS: u32 =
    FLAG_EVER_SYNCED | FLAG_INCONSISTENT | FLAG_DISCARD_LOCAL | FLAG_SPLIT_BRAIN;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PrevRole {
    Init,
    Primary,
    Secondary,
}

impl PrevRole {
    fn to_byte(self) -> u8 {
        match self {
            PrevRole::Init => 0,
            PrevRole::Primary => 1,
            PrevRole::Secondary => 2,
        }
    }

    fn from_byte(b: u8) -> Option<PrevRole> {
        match b {
            0 => Some(PrevRole::Init),
            1 => Some(PrevRole::Primary),
            2 => Some(PrevRole::Secondary),
            _ => None,
        }
    }
}

/// The decoded header block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub resource: String,
    pub uuid: [u8; 16],
    pub data_size: u64,
    pub extent_size: u64,
    pub local_gen: u64,
    pub peer_gen: u64,
    pub ever_synced: bool,
    pub inconsistent: bool,
    pub discard_local: bool,
    pub split_brain: bool,
    pub prev_role: PrevRole,
}

/// Where the regions of a device of a given size lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The metadata format: [`FORMAT_VERSION`], or 1 for a disk created by an older tandem.
    pub version: u32,
    pub data_size: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    /// The header slots: A (the last block) and, from version 2 on, B (the block before it).
    slots: [u64; 2],
}

/// Offsets of header slots A (the last 4096-byte block) and B (the block before it) on a device
/// of `dev_size` bytes; B is `None` on a device of a single block.
fn slot_offsets(dev_size: u64) -> Option<(u64, Option<u64>)> {
    let a = (dev_size / BLOCK * BLOCK).checked_sub(BLOCK)?;
    Some((a, a.checked_sub(BLOCK)))
}

impl Layout {
    /// The layout `tandem create` writes on a device of `dev_size` bytes with extents of
    /// `extent_size` bytes. The bitmap has one bit per extent of the whole (4096-rounded-down)
    /// device, rounded up to 4096 bytes, so it only depends on the device size and the extent
    /// size.
    pub fn compute(dev_size: u64, extent_size: u64) -> Option<Layout> {
        Layout::of_version(FORMAT_VERSION, dev_size, extent_size)
    }

    /// The layout of a disk of format `version` (1 or 2): version 1 has one header block where
    /// version 2 has two, so its bitmap and data region end one block later.
    fn of_version(version: u32, dev_size: u64, extent_size: u64) -> Option<Layout> {
        let dev = dev_size / BLOCK * BLOCK;
        let bits = dev.div_ceil(extent_size);
        let bitmap_len = bits.div_ceil(8).div_ceil(BLOCK) * BLOCK;
        let (a, b) = slot_offsets(dev_size)?;
        let (slots, first) = if version == FORMAT_VERSION_1 {
            ([a, a], a)
        } else {
            let b = b?;
            ([a, b], b)
        };
        let bitmap_offset = first.checked_sub(bitmap_len)?;
        Some(Layout {
            version,
            data_size: bitmap_offset,
            bitmap_offset,
            bitmap_len,
            slots,
        })
    }

    /// Offsets of the header slots, A first (version 1: A only).
    pub fn slots(&self) -> &[u64] {
        if self.version == FORMAT_VERSION_1 {
            &self.slots[..1]
        } else {
            &self.slots
        }
    }

    #[cfg(test)]
    /// Total size of the metadata (bitmap and header slots).
    pub fn meta_size(&self) -> u64 {
        self.bitmap_len + BLOCK * self.slots().len() as u64
    }
}

fn valid_extent_size(extent_size: u64) -> bool {
    extent_size >= BLOCK && extent_size % BLOCK == 0 && extent_size <= u64::from(u32::MAX)
}

/// Encode a header into a 4096-byte block of format `version` with sequence number `seq`
/// (version 1 has none), checksum included.
pub fn encode_header(h: &Header, version: u32, seq: u64) -> [u8; BLOCK as usize] {
    let mut b = [0u8; BLOCK as usize];
    b[0..8].copy_from_slice(MAGIC);
    b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&version.to_le_bytes());
    if version != FORMAT_VERSION_1 {
        b[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    }
    let name = h.resource.as_bytes();
    let n = name.len().min(MAX_NAME);
    b[OFF_NAME..OFF_NAME + n].copy_from_slice(&name[..n]);
    b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&h.uuid);
    b[OFF_DATA_SIZE..OFF_DATA_SIZE + 8].copy_from_slice(&h.data_size.to_le_bytes());
    // extent_size is validated to fit in a u32 before any header is written.
    let ext = u32::try_from(h.extent_size).unwrap_or(0);
    b[OFF_EXTENT_SIZE..OFF_EXTENT_SIZE + 4].copy_from_slice(&ext.to_le_bytes());
    b[OFF_LOCAL_GEN..OFF_LOCAL_GEN + 8].copy_from_slice(&h.local_gen.to_le_bytes());
    b[OFF_PEER_GEN..OFF_PEER_GEN + 8].copy_from_slice(&h.peer_gen.to_le_bytes());
    let mut flags = 0;
    for (set, bit) in [
        (h.ever_synced, FLAG_EVER_SYNCED),
        (h.inconsistent, FLAG_INCONSISTENT),
        (h.discard_local, FLAG_DISCARD_LOCAL),
        (h.split_brain, FLAG_SPLIT_BRAIN),
    ] {
        if set {
            flags |= bit;
        }
    }
    b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
    b[OFF_PREV_ROLE] = h.prev_role.to_byte();
    let sum = crc32c(&b);
    b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Why a block is not a valid header.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    NoMagic,
    Version(u32),
    Checksum {
        stored: u32,
        computed: u32,
    },
    Corrupt(String),
    /// The block could not be read.
    Unreadable(String),
}

impl DecodeError {
    /// Why, without the path.
    fn reason(&self) -> String {
        match self {
            DecodeError::NoMagic => "no tandem magic".into(),
            DecodeError::Version(v) => format!("format version {v}"),
            DecodeError::Checksum { stored, computed } => format!(
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            DecodeError::Corrupt(why) => why.clone(),
            DecodeError::Unreadable(e) => format!("read error: {e}"),
        }
    }
}

/// A valid header block: the header, the format it was written in and its sequence number
/// (the higher of two valid slots is the newer; 0 for version 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderBlock {
    pub header: Header,
    pub version: u32,
    pub seq: u64,
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Decode and verify a header block of either format version.
pub fn decode_header(b: &[u8; BLOCK as usize]) -> Result<HeaderBlock, DecodeError> {
    if &b[0..8] != MAGIC {
        return Err(DecodeError::NoMagic);
    }
    let version = le32(b, OFF_VERSION);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_1 {
        return Err(DecodeError::Version(version));
    }
    let stored = le32(b, OFF_CHECKSUM);
    let mut copy = *b;
    copy[OFF_CHECKSUM..OFF_CHECKSUM + 4].fill(0);
    let computed = crc32c(&copy);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    let raw_name = &b[OFF_NAME..OFF_NAME + MAX_NAME];
    let len = raw_name.iter().position(|&c| c == 0).unwrap_or(MAX_NAME);
    let resource = std::str::from_utf8(&raw_name[..len])
        .map_err(|_| DecodeError::Corrupt("resource name is not UTF-8".into()))?
        .to_string();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[OFF_UUID..OFF_UUID + 16]);
    let flags = le32(b, OFF_FLAGS);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::Corrupt(format!("unknown flags {flags:#x}")));
    }
    let prev_role = PrevRole::from_byte(b[OFF_PREV_ROLE])
        .ok_or_else(|| DecodeError::Corrupt(format!("bad previous role {}", b[OFF_PREV_ROLE])))?;
    let seq = if version == FORMAT_VERSION_1 {
        0
    } else {
        le64(b, OFF_SEQ)
    };
    let header = Header {
        resource,
        uuid,
        data_size: le64(b, OFF_DATA_SIZE),
        extent_size: u64::from(le32(b, OFF_EXTENT_SIZE)),
        local_gen: le64(b, OFF_LOCAL_GEN),
        peer_gen: le64(b, OFF_PEER_GEN),
        ever_synced: flags & FLAG_EVER_SYNCED != 0,
        inconsistent: flags & FLAG_INCONSISTENT != 0,
        discard_local: flags & FLAG_DISCARD_LOCAL != 0,
        split_brain: flags & FLAG_SPLIT_BRAIN != 0,
        prev_role,
    };
    Ok(HeaderBlock {
        header,
        version,
        seq,
    })
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF).
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Size in bytes of a disk device or regular file, and whether it is a disk.
fn device_size(file: &File, path: &Path) -> anyhow::Result<(u64, bool)> {
    let md = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if diskio::is_disk(&md.file_type()) {
        let size = diskio::disk_size(file)
            .with_context(|| format!("cannot get the size of disk device {}", path.display()))?;
        Ok((size, true))
    } else if md.is_file() {
        Ok((md.len(), false))
    } else {
        bail!(
            "{} is neither a disk device nor a regular file",
            path.display()
        )
    }
}

fn open_rw(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} read-write", path.display()))
}

fn read_header_block(file: &impl FileExt, offset: u64) -> io::Result<[u8; BLOCK as usize]> {
    let mut b = [0u8; BLOCK as usize];
    file.read_exact_at(&mut b, offset)?;
    Ok(b)
}

/// Slot names in messages, by index.
const SLOT_NAMES: [char; 2] = ['A', 'B'];

/// What the header slots of a device hold, A first (B is absent on a one-block device).
fn read_slots(file: &impl FileExt, dev_size: u64) -> Vec<(u64, Result<HeaderBlock, DecodeError>)> {
    let Some((a, b)) = slot_offsets(dev_size) else {
        return Vec::new();
    };
    [Some(a), b]
        .into_iter()
        .flatten()
        .map(|offset| {
            let found = read_header_block(file, offset)
                .map_err(|e| DecodeError::Unreadable(e.to_string()))
                .and_then(|b| decode_header(&b));
            (offset, found)
        })
        .collect()
}

/// Why the slot of this index, at this offset, holds no valid header.
type SlotError = (usize, u64, DecodeError);

/// The header a disk opens with.
#[derive(Debug)]
struct Found {
    block: HeaderBlock,
    /// Index of its slot (0 = A): the next version-2 update writes the other one.
    slot: usize,
    /// On a version-2 disk, why the other slot does not hold a valid header (a torn update).
    other_invalid: Option<DecodeError>,
}

/// Choose the header of a disk from what its slots hold (see `read_slots`):
/// - a valid version-1 header in slot A makes a version-1 disk (its slot B is the last block
///   of the bitmap);
/// - otherwise the valid version-2 header with the higher sequence number wins (A on a tie);
/// - a newer format in either slot is refused rather than passed over: a newer tandem wrote
///   it, and the other slot is older.
///
/// On error, every slot's reason, to be told with `no_header`.
fn choose(slots: Vec<(u64, Result<HeaderBlock, DecodeError>)>) -> Result<Found, Vec<SlotError>> {
    if let Some((_, Ok(a))) = slots.first()
        && a.version == FORMAT_VERSION_1
    {
        return Ok(Found {
            block: a.clone(),
            slot: 0,
            other_invalid: None,
        });
    }
    let mut best: Option<(usize, HeaderBlock)> = None;
    let mut errors = Vec::new();
    for (i, (offset, found)) in slots.into_iter().enumerate() {
        match found {
            Ok(b) if b.version == FORMAT_VERSION_1 => errors.push((
                i,
                offset,
                DecodeError::Corrupt(
                    "a version-1 header in slot B, not in the last block (was the device resized?)"
                        .into(),
                ),
            )),
            Ok(b) => {
                if best.as_ref().is_none_or(|(_, top)| b.seq > top.seq) {
                    best = Some((i, b));
                }
            }
            Err(e) => errors.push((i, offset, e)),
        }
    }
    let newer = errors
        .iter()
        .any(|(_, _, e)| matches!(e, DecodeError::Version(v) if *v > FORMAT_VERSION));
    match best {
        Some((slot, block)) if !newer => Ok(Found {
            block,
            slot,
            other_invalid: errors.pop().map(|(_, _, e)| e),
        }),
        _ => Err(errors),
    }
}

/// The message for a disk without a usable header, from every slot's reason.
fn no_header(errors: &[SlotError], path: &Path, resource: Option<&str>) -> String {
    if let Some((_, _, e)) = errors
        .iter()
        .find(|(_, _, e)| matches!(e, DecodeError::Version(v) if *v > FORMAT_VERSION))
    {
        return describe(e, path, resource);
    }
    let told: Vec<&SlotError> = errors
        .iter()
        .filter(|(_, _, e)| *e != DecodeError::NoMagic)
        .collect();
    match told.as_slice() {
        [] => describe(&DecodeError::NoMagic, path, resource),
        [(_, _, e)] => describe(e, path, resource),
        many => {
            let why: Vec<String> = many
                .iter()
                .map(|(i, offset, e)| {
                    format!("slot {} at offset {offset}: {}", SLOT_NAMES[*i], e.reason())
                })
                .collect();
            format!(
                "corrupt tandem metadata on {}: no valid header in either slot ({})",
                path.display(),
                why.join("; ")
            )
        }
    }
}

/// Read the slots of `file` (a device of `dev_size` bytes) and choose its header; errors name
/// the path and, when given, the resource to create.
fn find_header(
    file: &impl FileExt,
    path: &Path,
    dev_size: u64,
    resource: Option<&str>,
) -> anyhow::Result<Found> {
    choose(read_slots(file, dev_size))
        .map_err(|errors| anyhow::anyhow!("{}", no_header(&errors, path, resource)))
}

fn check_name(resource: &str) -> anyhow::Result<()> {
    if resource.is_empty() || resource.len() > MAX_NAME || resource.contains('\0') {
        bail!("invalid resource name {resource:?}: 1 to {MAX_NAME} bytes, no NUL");
    }
    Ok(())
}

/// Write fresh metadata (all extents dirty, gens 0, flags clear). Refuses if valid tandem
/// metadata for any resource is already there unless force. Errors name the path.
pub fn create(
    path: &Path,
    resource: &str,
    extent_size: u64,
    force: bool,
) -> anyhow::Result<Header> {
    check_name(resource)?;
    if !valid_extent_size(extent_size) {
        bail!(
            "invalid extent size {extent_size}: must be a multiple of 4096 between 4096 and {}",
            u32::MAX / 4096 * 4096
        );
    }
    let file = open_rw(path)?;
    let (dev_size, _) = device_size(&file, path)?;
    let layout = Layout::compute(dev_size, extent_size)
        .filter(|l| l.data_size >= extent_size)
        .with_context(|| {
            format!(
                "{} is too small: {dev_size} bytes, need at least one extent ({extent_size} bytes) plus metadata",
                path.display()
            )
        })?;
    if let Ok(old) = find_header(&file, path, dev_size, None) {
        let old = old.block;
        if !force {
            bail!(
                "{} already holds tandem metadata for resource '{}': refusing to overwrite it without --force",
                path.display(),
                old.header.resource
            );
        }
        if old.header.data_size > layout.data_size {
            log::warn!(
                "create {resource}: the data region of {} shrinks from {} to {} bytes (the old metadata had format version {} and extent size {}): whatever used its last {} bytes, such as the end of a filesystem, is cut off",
                path.display(),
                old.header.data_size,
                layout.data_size,
                old.version,
                old.header.extent_size,
                old.header.data_size - layout.data_size
            );
        }
    }
    let mut uuid = [0u8; 16];
    getrandom::fill(&mut uuid)
        .map_err(|e| anyhow::anyhow!("cannot get random bytes for the uuid: {e}"))?;
    let header = Header {
        resource: resource.to_string(),
        uuid,
        data_size: layout.data_size,
        extent_size,
        local_gen: 0,
        peer_gen: 0,
        ever_synced: false,
        inconsistent: false,
        discard_local: false,
        split_brain: false,
        prev_role: PrevRole::Init,
    };
    let extents = layout.data_size.div_ceil(extent_size);
    let bitmap = full_bitmap(extents, layout.bitmap_len);
    let werr = |e: io::Error| anyhow::anyhow!("cannot write metadata to {}: {e}", path.display());
    file.write_all_at(&bitmap, layout.bitmap_offset)
        .map_err(werr)?;
    // Both slots hold the header, A with the higher sequence number: on a version-2 disk an
    // invalid slot then always means damage, and no slot keeps a header of the old metadata.
    for (&offset, seq) in layout.slots().iter().rev().zip(0..) {
        file.write_all_at(&encode_header(&header, FORMAT_VERSION, seq), offset)
            .map_err(werr)?;
    }
    file.sync_all().map_err(werr)?;
    Ok(header)
}

/// A bitmap region of `len` bytes with the first `extents` bits set.
fn full_bitmap(extents: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    let full = (extents / 8) as usize;
    v[..full].fill(0xff);
    let rest = extents % 8;
    if rest != 0 {
        v[full] = (1u8 << rest) - 1;
    }
    v
}

#[cfg(test)]
/// Read and validate the header of `path` read-only, whatever resource it belongs to (for
/// `status`/`dump` without taking the disk). Does not check the resource name.
pub fn read_header(path: &Path) -> anyhow::Result<Header> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (dev_size, _) = device_size(&file, path)?;
    Ok(find_header(&file, path, dev_size, None)?.block.header)
}

/// The message for a header that does not decode.
fn describe(e: &DecodeError, path: &Path, resource: Option<&str>) -> String {
    let p = path.display();
    match e {
        DecodeError::NoMagic => match resource {
            Some(r) => format!("no tandem metadata on {p}: run `tandem create {r}`"),
            None => format!("no tandem metadata on {p}"),
        },
        DecodeError::Version(v) => format!(
            "unsupported tandem metadata format version {v} on {p} (this tandem reads versions 1 to {FORMAT_VERSION})"
        ),
        DecodeError::Checksum { stored, computed } => format!(
            "corrupt tandem metadata on {p}: header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ),
        DecodeError::Corrupt(why) => format!("corrupt tandem metadata on {p}: {why}"),
        DecodeError::Unreadable(e) => format!("cannot read the metadata header of {p}: {e}"),
    }
}

/// The local disk of a resource: data I/O and metadata, opened read-write (O_RDWR; not O_DIRECT).
pub struct Disk {
    file: DiskFile,
    path: PathBuf,
    is_block: bool,
    layout: Layout,
    extent_size: u64,
    header: Mutex<HeaderState>,
    activemap: ActiveMap,
}

/// The header as it is on disk, and where.
struct HeaderState {
    header: Header,
    /// Sequence number of the newest valid header (version 2).
    seq: u64,
    /// Index into `layout.slots()` of the slot that holds it.
    slot: usize,
}

fn einval(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Disk {
    /// Open the local disk of `resource` and validate its metadata.
    pub fn open(path: &Path, resource: &str) -> anyhow::Result<Disk> {
        let file = DiskFile::new(open_rw(path)?, path);
        let (dev_size, is_block) = device_size(file.file(), path)?;
        let p = path.display();
        let found = find_header(&file, path, dev_size, Some(resource))?;
        let header = found.block.header;
        if header.resource != resource {
            bail!(
                "tandem metadata on {p} belongs to resource '{}', not '{resource}'",
                header.resource
            );
        }
        if !valid_extent_size(header.extent_size) {
            bail!(
                "corrupt tandem metadata on {p}: invalid extent size {}",
                header.extent_size
            );
        }
        let layout = Layout::of_version(found.block.version, dev_size, header.extent_size)
            .filter(|l| l.data_size == header.data_size && l.data_size >= header.extent_size)
            .with_context(|| {
                format!(
                    "tandem metadata on {p} does not match the device size: header says data size {}, device is {dev_size} bytes",
                    header.data_size
                )
            })?;
        let map_file = file
            .try_clone()
            .with_context(|| format!("cannot duplicate the descriptor of {p}"))?;
        let activemap = ActiveMap::load(
            map_file,
            layout.bitmap_offset,
            header.extent_size,
            layout.data_size,
        )
        .with_context(|| format!("cannot read the dirty-extent map of {p}"))?;
        if layout.version == FORMAT_VERSION_1 {
            log::warn!(
                "{resource}: {p} holds version-1 tandem metadata, whose single header block is rewritten in place: a power cut during a header update can leave the disk unusable until it is recreated. Convert both nodes at a convenient time (see docs/on-disk-format.md, \"Version 1\")"
            );
        } else if let Some(why) = &found.other_invalid {
            log::warn!(
                "{resource}: header slot {} of {p} is not valid ({}), probably a header update cut by a crash; using slot {} (sequence {}), the next update rewrites the other",
                SLOT_NAMES[1 - found.slot],
                why.reason(),
                SLOT_NAMES[found.slot],
                found.block.seq
            );
        }
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            is_block,
            layout,
            extent_size: header.extent_size,
            header: Mutex::new(HeaderState {
                header,
                seq: found.block.seq,
                slot: found.slot,
            }),
            activemap,
        })
    }

    #[cfg(test)]
    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn header(&self) -> Header {
        match self.header.lock() {
            Ok(h) => h.header.clone(),
            Err(poisoned) => poisoned.into_inner().header.clone(),
        }
    }

    /// Change the header and write it (header block + fdatasync) before returning. The
    /// immutable fields (resource, uuid, data_size, extent_size) must not be changed.
    /// On error the in-memory header is left as it was.
    ///
    /// Version 2 writes the slot that does not hold the newest valid header, with the next
    /// sequence number, so a torn write leaves the newest header intact; version 1 rewrites
    /// its single block in place.
    pub fn update_header(&self, f: impl FnOnce(&mut Header)) -> io::Result<()> {
        let mut guard = match self.header.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut new = guard.header.clone();
        f(&mut new);
        let old = &guard.header;
        if new.resource != old.resource
            || new.uuid != old.uuid
            || new.data_size != old.data_size
            || new.extent_size != old.extent_size
        {
            return Err(einval(
                "update_header: resource, uuid, data_size and extent_size cannot change".into(),
            ));
        }
        let slots = self.layout.slots();
        let slot = (guard.slot + 1) % slots.len();
        let seq = guard.seq + 1;
        let block = encode_header(&new, self.layout.version, seq);
        self.file.write_all_at(&block, slots[slot])?;
        self.file.sync_data()?;
        *guard = HeaderState {
            header: new,
            seq,
            slot,
        };
        Ok(())
    }

    pub fn data_size(&self) -> u64 {
        self.layout.data_size
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// The sector size of the disk (512 for a regular file): I/O to a FreeBSD disk must be
    /// aligned to it, so the GEOM Gate export advertises at least this much.
    #[cfg(target_os = "freebsd")]
    pub fn sector_size(&self) -> io::Result<u32> {
        if self.is_block {
            diskio::sector_size(self.file.file())
        } else {
            Ok(512)
        }
    }

    pub fn extent_count(&self) -> u64 {
        self.layout.data_size.div_ceil(self.extent_size)
    }

    /// EINVAL, naming the disk, for a range that is not inside the data region.
    pub fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout.data_size => Ok(()),
            _ => Err(einval(format!(
                "I/O of {len} bytes at offset {offset} is beyond the data size {} of {}",
                self.layout.data_size,
                self.path.display()
            ))),
        }
    }

    /// The disk's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read `buf.len()` bytes at `offset`; the range must lie within the data region.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    /// Read `buf` at `offset` if the data is cached (see [`super::diskio::read_cached`]).
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = self.check_range(offset, buf.len() as u64) {
            return Some(Err(e));
        }
        self.file.read_cached(buf, offset)
    }

    /// Write `data` at `offset`; the range must lie within the data region. Does not touch
    /// the activemap: call `activemap().begin_write` first.
    ///
    /// A large write goes to the kernel in pieces of `WRITE_PIECE` (see there).
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let mut at = offset;
        for piece in data.chunks(WRITE_PIECE) {
            self.file.write_all_at(piece, at)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// fdatasync: every completed write is durable.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discard a range. Afterwards the range reads as zeroes on every kind of disk, so the
    /// two nodes stay byte-identical: fallocate(PUNCH_HOLE|KEEP_SIZE) (on block devices this
    /// is a discard that guarantees zeroes), else zeroes are written. BLKDISCARD is not
    /// used because it may leave the old data readable.
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.file.fallocate(diskio::PUNCH_HOLE, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeroes_slow(offset, len),
        }
    }

    /// Make a range read as zeroes: fallocate(ZERO_RANGE|KEEP_SIZE), else write zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self.file.fallocate(diskio::ZERO_RANGE, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeroes_slow(offset, len),
        }
    }

    fn write_zeroes_slow(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1024 * 1024;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = CHUNK.min(end - pos) as usize;
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Whether an extent reads as all zeroes (the initial sync skips those). Holes found with
    /// SEEK_DATA/SEEK_HOLE are zero without reading; only data segments are read.
    pub fn is_zero_extent(&self, extent: u64) -> io::Result<bool> {
        if extent >= self.extent_count() {
            return Err(einval(format!(
                "extent {extent} is beyond the last extent {} of {}",
                self.extent_count().saturating_sub(1),
                self.path.display()
            )));
        }
        let start = extent * self.extent_size;
        let end = (start + self.extent_size).min(self.layout.data_size);
        if self.is_block {
            return self.range_is_zero(start, end);
        }
        let mut pos = start;
        while pos < end {
            let data = match self.file.lseek(pos as i64, nix::unistd::Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => return Ok(true),
                Err(_) => return self.range_is_zero(pos, end),
            };
            if data >= end {
                return Ok(true);
            }
            let hole = match self.file.lseek(data as i64, nix::unistd::Whence::SeekHole) {
                Ok(h) => (h as u64).min(end),
                Err(_) => end,
            };
            if !self.range_is_zero(data, hole)? {
                return Ok(false);
            }
            // A hole at or before `data` would not advance: guard against a confused filesystem.
            pos = hole.max(data + 1);
        }
        Ok(true)
    }

    fn range_is_zero(&self, start: u64, end: u64) -> io::Result<bool> {
        const CHUNK: u64 = 1024 * 1024;
        let mut buf = vec![0u8; CHUNK.min(end.saturating_sub(start)) as usize];
        let mut pos = start;
        while pos < end {
            let n = CHUNK.min(end - pos) as usize;
            self.file.read_exact_at(&mut buf[..n], pos)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            pos += n as u64;
        }
        Ok(true)
    }

    pub fn activemap(&self) -> &ActiveMap {
        &self.activemap
    }

    /// The faults injected into this disk (`tandem fault`).
    #[cfg(feature = "faults")]
    pub fn faults(&self) -> &super::faultdisk::Faults {
        self.file.faults()
    }
}

#[cfg(test)]
/// `hexdump -C`-style dump, with `*` for repeated lines, of `data` placed at `base`.
pub fn hexdump(data: &[u8], base: u64) -> String {
    let mut out = String::new();
    let mut prev: Option<&[u8]> = None;
    let mut starred = false;
    for (i, line) in data.chunks(16).enumerate() {
        if prev == Some(line) && line.len() == 16 {
            if !starred {
                out.push_str("*\n");
                starred = true;
            }
            continue;
        }
        starred = false;
        prev = Some(line);
        out.push_str(&format!("{:08x} ", base + (i as u64) * 16));
        for j in 0..16 {
            if j == 8 {
                out.push(' ');
            }
            match line.get(j) {
                Some(b) => out.push_str(&format!(" {b:02x}")),
                None => out.push_str("   "),
            }
        }
        out.push_str("  |");
        for &b in line {
            out.push(if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            });
        }
        out.push_str("|\n");
    }
    out.push_str(&format!("{:08x}\n", base + data.len() as u64));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A sparse file of `size` bytes in a fresh temporary directory.
    fn sparse(size: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(size).unwrap();
        (dir, path)
    }

    fn err_text<T>(r: anyhow::Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn create_open_round_trip() {
        let (_d, path) = sparse(64 * MIB);
        let created = create(&path, "r0", DEFAULT_EXTENT_SIZE, false).unwrap();
        let disk = Disk::open(&path, "r0").unwrap();
        assert_eq!(disk.header(), created);
        // 64 MiB device: 32 extents -> bitmap rounded up to one 4096-byte page, then the two
        // header slots.
        assert_eq!(disk.data_size(), 64 * MIB - 12288);
        assert_eq!(created.data_size, 64 * MIB - 12288);
        assert_eq!(disk.extent_size(), DEFAULT_EXTENT_SIZE);
        assert_eq!(disk.extent_count(), 32);
        let h = disk.header();
        assert_eq!(
            (h.local_gen, h.peer_gen, h.prev_role),
            (0, 0, PrevRole::Init)
        );
        assert!(!h.ever_synced && !h.inconsistent && !h.discard_local && !h.split_brain);
        assert_ne!(h.uuid, [0u8; 16]);
        assert_eq!(disk.activemap().dirty_count(), 32);
        assert_eq!(disk.activemap().dirty_bytes(), disk.data_size());
        // The header slots are the last two blocks of the file and start with the magic.
        for at in [64 * MIB - 4096, 64 * MIB - 8192] {
            let mut magic = [0u8; 8];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut magic, at)
                .unwrap();
            assert_eq!(&magic, MAGIC);
        }
    }

    #[test]
    fn create_keeps_the_data_region() {
        let (_d, path) = sparse(16 * MIB + 1000);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&pattern, 0).unwrap();
        f.write_all_at(&pattern, 12 * MIB).unwrap();
        let h = create(&path, "r0", MIB, false).unwrap();
        // Device size is rounded down to 4096: 16 MiB, 16 extents, 1 bitmap page, 2 slots.
        assert_eq!(h.data_size, 16 * MIB - 12288);
        let disk = Disk::open(&path, "r0").unwrap();
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 12 * MIB).unwrap();
        assert_eq!(buf, pattern);
    }

    #[test]
    fn update_header_persists() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        let disk = Disk::open(&path, "r0").unwrap();
        disk.update_header(|h| {
            h.local_gen = 7;
            h.peer_gen = 5;
            h.ever_synced = true;
            h.split_brain = true;
            h.prev_role = PrevRole::Secondary;
        })
        .unwrap();
        let err = disk
            .update_header(|h| h.resource = "other".into())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let want = disk.header();
        drop(disk);
        let again = Disk::open(&path, "r0").unwrap().header();
        assert_eq!(again, want);
        assert_eq!((again.local_gen, again.peer_gen), (7, 5));
        assert!(again.ever_synced && again.split_brain && !again.inconsistent);
        assert_eq!(again.prev_role, PrevRole::Secondary);
    }

    #[test]
    fn create_refuses_to_overwrite_without_force() {
        let (_d, path) = sparse(16 * MIB);
        let first = create(&path, "r0", MIB, false).unwrap();
        let msg = err_text(create(&path, "r1", MIB, false));
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("'r0'") && msg.contains("--force"), "{msg}");
        let second = create(&path, "r1", 2 * MIB, true).unwrap();
        assert_ne!(first.uuid, second.uuid);
        assert_eq!(Disk::open(&path, "r1").unwrap().extent_size(), 2 * MIB);
    }

    #[test]
    fn open_without_metadata_says_what_to_do() {
        let (_d, path) = sparse(16 * MIB);
        let msg = err_text(Disk::open(&path, "r0"));
        assert_eq!(
            msg,
            format!(
                "no tandem metadata on {}: run `tandem create r0`",
                path.display()
            )
        );
    }

    /// Flip one bit of the byte at `at`.
    fn flip(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }

    #[test]
    fn a_corrupt_slot_is_passed_over_and_two_are_an_error_naming_the_path() {
        let (_d, path) = sparse(16 * MIB);
        let created = create(&path, "r0", MIB, false).unwrap();
        let (a, b) = (16 * MIB - 4096, 16 * MIB - 8192);
        flip(&path, a + OFF_LOCAL_GEN as u64);
        assert_eq!(Disk::open(&path, "r0").unwrap().header(), created);
        flip(&path, b + OFF_PEER_GEN as u64);
        let msg = err_text(Disk::open(&path, "r0"));
        let p = path.display();
        assert!(
            msg.starts_with(&format!(
                "corrupt tandem metadata on {p}: no valid header in either slot (slot A at offset {a}: header checksum mismatch (stored "
            )),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("; slot B at offset {b}: header checksum mismatch")),
            "{msg}"
        );
        assert_eq!(err_text(read_header(&path)), msg);
        // A slot without a header says nothing: the other one's reason is the message.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0u8; BLOCK as usize], b).unwrap();
        let msg = err_text(Disk::open(&path, "r0"));
        assert!(
            msg.starts_with(&format!(
                "corrupt tandem metadata on {p}: header checksum mismatch"
            )),
            "{msg}"
        );
    }

    #[test]
    fn newer_version_is_rejected() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        // In either slot: a newer tandem wrote it, and the other slot is older.
        for at in [16 * MIB - 4096, 16 * MIB - 8192] {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&3u32.to_le_bytes(), at + 8).unwrap();
            let msg = err_text(Disk::open(&path, "r0"));
            assert_eq!(
                msg,
                format!(
                    "unsupported tandem metadata format version 3 on {} (this tandem reads versions 1 to 2)",
                    path.display()
                )
            );
            create(&path, "r0", MIB, true).unwrap();
        }
    }

    #[test]
    fn wrong_resource_is_rejected() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        let msg = err_text(Disk::open(&path, "data"));
        assert_eq!(
            msg,
            format!(
                "tandem metadata on {} belongs to resource 'r0', not 'data'",
                path.display()
            )
        );
    }

    #[test]
    fn resized_device_is_rejected() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        // Growing moves the end of the device away from the header.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        let msg = err_text(Disk::open(&path, "r0"));
        assert!(msg.starts_with("no tandem metadata on"), "{msg}");
    }

    #[test]
    fn too_small_device_is_rejected() {
        let (_d, path) = sparse(MIB);
        let msg = err_text(create(&path, "r0", DEFAULT_EXTENT_SIZE, false));
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("too small"),
            "{msg}"
        );
        let (_d2, tiny) = sparse(100);
        let msg = err_text(create(&tiny, "r0", 4096, false));
        assert!(msg.contains("too small"), "{msg}");
        let msg = err_text(Disk::open(&tiny, "r0"));
        assert!(msg.starts_with("no tandem metadata on"), "{msg}");
    }

    #[test]
    fn bad_arguments_are_rejected() {
        let (_d, path) = sparse(16 * MIB);
        assert!(err_text(create(&path, "", MIB, false)).contains("invalid resource name"));
        assert!(
            err_text(create(&path, &"x".repeat(65), MIB, false)).contains("invalid resource name")
        );
        assert!(err_text(create(&path, "r0", 1000, false)).contains("invalid extent size"));
        let missing = path.with_file_name("missing.img");
        let msg = err_text(create(&missing, "r0", MIB, false));
        assert!(msg.contains("missing.img"), "{msg}");
        // A 64-byte name fills the field exactly, without a NUL.
        let long = "n".repeat(64);
        create(&path, &long, MIB, false).unwrap();
        assert_eq!(Disk::open(&path, &long).unwrap().header().resource, long);
    }

    #[test]
    fn data_io_is_bounded_by_data_size() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        let disk = Disk::open(&path, "r0").unwrap();
        let end = disk.data_size();
        disk.write_at(&[0xAB; 4096], end - 4096).unwrap();
        let mut buf = [0u8; 4096];
        disk.read_at(&mut buf, end - 4096).unwrap();
        assert_eq!(buf, [0xAB; 4096]);
        for r in [
            disk.write_at(&[1, 2], end - 1),
            disk.read_at(&mut buf, end - 4095),
            disk.read_at(&mut buf, u64::MAX - 10),
            disk.punch(end, 1),
            disk.write_zeroes(end - 4096, 8192),
        ] {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
        disk.read_at(&mut [], end).unwrap();
        drop(disk);
        // The metadata behind the data region is intact.
        Disk::open(&path, "r0").unwrap();
    }

    /// A write larger than `WRITE_PIECE`, at an offset that is no multiple of it, lands whole
    /// and in place: every byte of it, nothing before or after it.
    #[test]
    fn a_large_write_in_pieces_lands_whole_and_in_place() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        let disk = Disk::open(&path, "r0").unwrap();
        // Three and a bit pieces on Linux; one write elsewhere.
        let len = 3 * (256 << 10) + 4097;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        let at = MIB + 512;
        disk.write_at(&data, at).unwrap();
        let mut back = vec![0u8; len + 1024];
        disk.read_at(&mut back, at - 512).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(
            back[512..512 + len] == data[..],
            "the data read back differs"
        );
        assert!(back[512 + len..].iter().all(|&b| b == 0));
    }

    #[test]
    fn punch_and_write_zeroes_read_back_zero() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        let disk = Disk::open(&path, "r0").unwrap();
        disk.write_at(&vec![0x5A; 3 * MIB as usize], 0).unwrap();
        disk.punch(4096, MIB).unwrap();
        disk.write_zeroes(2 * MIB, 8192).unwrap();
        let mut buf = vec![0u8; 3 * MIB as usize];
        disk.read_at(&mut buf, 0).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let i = i as u64;
            let zero = (4096..4096 + MIB).contains(&i) || (2 * MIB..2 * MIB + 8192).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0x5A }, "byte {i}");
        }
    }

    #[test]
    fn zero_extents_on_a_sparse_file() {
        let (_d, path) = sparse(16 * MIB + 12288);
        create(&path, "r0", MIB, false).unwrap();
        let disk = Disk::open(&path, "r0").unwrap();
        disk.write_at(&[7], MIB + 4095).unwrap();
        disk.write_at(&vec![0; 65536], 2 * MIB + 8192).unwrap();
        disk.write_at(&[0, 0, 9], 3 * MIB + MIB - 3).unwrap();
        assert!(disk.is_zero_extent(0).unwrap());
        assert!(!disk.is_zero_extent(1).unwrap());
        assert!(disk.is_zero_extent(2).unwrap(), "written zeroes are zero");
        assert!(!disk.is_zero_extent(3).unwrap());
        // The last extent is partial and lies right before the metadata.
        let last = disk.extent_count() - 1;
        assert!(disk.is_zero_extent(last).unwrap());
        assert_eq!(
            disk.is_zero_extent(disk.extent_count()).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        disk.write_at(&[1], disk.data_size() - 1).unwrap();
        assert!(!disk.is_zero_extent(last).unwrap());
    }

    #[test]
    fn one_tib_sparse_file_opens_with_a_small_map() {
        let (_d, path) = sparse(1 << 40);
        create(&path, "big", DEFAULT_EXTENT_SIZE, false).unwrap();
        let disk = Disk::open(&path, "big").unwrap();
        // 524288 bits = 64 KiB of bitmap, then the two header slots.
        assert_eq!(disk.data_size(), (1 << 40) - 65536 - 8192);
        assert_eq!(disk.extent_count(), 524288);
        assert_eq!(disk.activemap().dirty_count(), 524288);
        let mem = disk.activemap().memory_bytes();
        assert!(mem < 512 * 1024, "activemap uses {mem} bytes");
        let map = disk.activemap();
        for e in 0..524288 {
            map.mark_synced(e).unwrap();
        }
        map.flush_clean().unwrap();
        assert_eq!(map.dirty_count(), 0);
        assert!(map.memory_bytes() < 512 * 1024);
    }

    #[test]
    fn disk_and_map_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Disk>();
        check::<ActiveMap>();
    }

    /// The last `TAIL` bytes of a file: all the metadata of the small test disks.
    const TAIL: u64 = 64 * 1024;

    fn read_tail(path: &Path) -> Vec<u8> {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len();
        let mut tail = vec![0u8; TAIL as usize];
        f.read_exact_at(&mut tail, len - TAIL).unwrap();
        tail
    }

    fn write_tail(path: &Path, tail: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(tail, len - TAIL).unwrap();
    }

    /// A power cut during a header update: the update's block is written only partly. Every
    /// cut at a 512-byte boundary (the first k sectors new, the rest old) and every cut in the
    /// middle of a sector (that sector then reads as zeroes or as garbage) must leave a disk
    /// that opens with the old header or the new one: never an error, never a mix.
    #[test]
    fn torn_header_update_opens_with_the_old_or_the_new_header() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        for round in 0..4u64 {
            let before = read_tail(&path);
            let old = Disk::open(&path, "r0").unwrap().header();
            let new = {
                let disk = Disk::open(&path, "r0").unwrap();
                disk.update_header(|h| {
                    h.local_gen = 10 + round;
                    h.peer_gen = round;
                    h.ever_synced = round % 2 == 0;
                    h.prev_role = PrevRole::Primary;
                })
                .unwrap();
                disk.header()
            };
            assert_ne!(old, new);
            let after = read_tail(&path);
            let changed = changed_blocks(&before, &after, 16 * MIB);
            assert_eq!(changed.len(), 1, "an update writes one block: {changed:?}");
            let at = (changed[0] - (16 * MIB - TAIL)) as usize;
            for k in 0..=8usize {
                for damage in [None, Some(0x00u8), Some(0xA5)] {
                    if k == 8 && damage.is_some() {
                        continue;
                    }
                    let mut torn = before.clone();
                    torn[at..at + k * 512].copy_from_slice(&after[at..at + k * 512]);
                    if let Some(fill) = damage {
                        torn[at + k * 512..at + (k + 1) * 512].fill(fill);
                    }
                    write_tail(&path, &torn);
                    let what = format!("round {round}, {k} sectors written, damage {damage:?}");
                    let got = match Disk::open(&path, "r0") {
                        Ok(disk) => disk.header(),
                        Err(e) => panic!("{what}: the disk does not open: {e:#}"),
                    };
                    assert!(got == old || got == new, "{what}: {got:?}");
                    if k == 0 {
                        assert_eq!(got, old, "{what}");
                    }
                    if k == 8 {
                        assert_eq!(got, new, "{what}");
                    }
                }
            }
            write_tail(&path, &after);
        }
    }

    /// Offsets of the 4096-byte blocks that differ between two tails of a file of `len` bytes.
    fn changed_blocks(before: &[u8], after: &[u8], len: u64) -> Vec<u64> {
        (0..TAIL / BLOCK)
            .filter(|&i| {
                let r = (i * BLOCK) as usize..((i + 1) * BLOCK) as usize;
                before[r.clone()] != after[r]
            })
            .map(|i| len - TAIL + i * BLOCK)
            .collect()
    }

    /// The decoded header block at `at`.
    fn block_at(path: &Path, at: u64) -> HeaderBlock {
        let f = File::open(path).unwrap();
        decode_header(&read_header_block(&f, at).unwrap()).unwrap()
    }

    #[test]
    fn updates_alternate_slots_and_the_newest_wins() {
        let (_d, path) = sparse(16 * MIB);
        create(&path, "r0", MIB, false).unwrap();
        let (a, b) = (16 * MIB - 4096, 16 * MIB - 8192);
        assert_eq!(Disk::open(&path, "r0").unwrap().layout().slots(), [a, b]);
        // `create` writes both: A is the newer.
        assert_eq!((block_at(&path, a).seq, block_at(&path, b).seq), (1, 0));
        let mut disk = Disk::open(&path, "r0").unwrap();
        for n in 1..=7u64 {
            if n == 4 {
                // A reopened disk goes on from what is on it.
                drop(disk);
                disk = Disk::open(&path, "r0").unwrap();
            }
            let before = read_tail(&path);
            disk.update_header(|h| h.local_gen = n).unwrap();
            let slot = if n % 2 == 1 { b } else { a };
            let other = if n % 2 == 1 { a } else { b };
            assert_eq!(
                changed_blocks(&before, &read_tail(&path), 16 * MIB),
                [slot],
                "update {n}"
            );
            let (new, old) = (block_at(&path, slot), block_at(&path, other));
            assert_eq!((new.seq, new.header.local_gen), (n + 1, n), "update {n}");
            assert_eq!(old.seq, n, "update {n}");
            assert_eq!(Disk::open(&path, "r0").unwrap().header().local_gen, n);
        }
        // The newest wins wherever it is: an older valid header in A is passed over.
        drop(disk);
        let newest = block_at(&path, b);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let mut stale = newest.header.clone();
        stale.local_gen = 100;
        f.write_all_at(&encode_header(&stale, FORMAT_VERSION, newest.seq - 1), a)
            .unwrap();
        assert_eq!(Disk::open(&path, "r0").unwrap().header(), newest.header);
        f.write_all_at(&encode_header(&stale, FORMAT_VERSION, newest.seq + 1), a)
            .unwrap();
        assert_eq!(Disk::open(&path, "r0").unwrap().header(), stale);
    }

    /// A version-1 header block built field by field as tandem 1 wrote it (one header block,
    /// no sequence number).
    fn v1_block(h: &Header) -> [u8; BLOCK as usize] {
        let mut b = [0u8; BLOCK as usize];
        b[0..8].copy_from_slice(b"TANDEMM1");
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[16..16 + h.resource.len()].copy_from_slice(h.resource.as_bytes());
        b[80..96].copy_from_slice(&h.uuid);
        b[96..104].copy_from_slice(&h.data_size.to_le_bytes());
        b[104..108].copy_from_slice(&(h.extent_size as u32).to_le_bytes());
        b[108..116].copy_from_slice(&h.local_gen.to_le_bytes());
        b[116..124].copy_from_slice(&h.peer_gen.to_le_bytes());
        let flags = u32::from(h.ever_synced) | u32::from(h.split_brain) << 3;
        b[124..128].copy_from_slice(&flags.to_le_bytes());
        b[128] = h.prev_role.to_byte();
        let sum = crc32c(&b);
        b[12..16].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The header of the version-1 example in the documentation (a 64 MiB disk).
    fn v1_example() -> Header {
        Header {
            resource: "r0".into(),
            uuid: *b"\x6f\x1c\x2a\x9e\x53\x04\x4b\x7d\x8a\x10\xc3\x5e\x22\x91\xe7\x3b",
            data_size: 64 * MIB - 8192,
            extent_size: DEFAULT_EXTENT_SIZE,
            local_gen: 3,
            peer_gen: 2,
            ever_synced: true,
            inconsistent: false,
            discard_local: false,
            split_brain: false,
            prev_role: PrevRole::Primary,
        }
    }

    #[test]
    fn a_version_1_disk_opens_and_is_updated_in_place() {
        // The same bytes as tandem 1 wrote: its documented example had this checksum.
        assert_eq!(le32(&v1_block(&v1_example()), 12), 0xde3a_1692);
        let (_d, path) = sparse(64 * MIB);
        let (header_at, bitmap_at) = (64 * MIB - 4096, 64 * MIB - 8192);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x01, 0x02, 0x00, 0x80], bitmap_at)
            .unwrap();
        f.write_all_at(&v1_block(&v1_example()), header_at).unwrap();
        drop(f);

        let disk = Disk::open(&path, "r0").unwrap();
        assert_eq!(disk.header(), v1_example());
        assert_eq!(disk.layout().version, 1);
        assert_eq!(disk.layout().slots(), [header_at]);
        assert_eq!(disk.data_size(), 64 * MIB - 8192);
        assert_eq!(disk.activemap().dirty_extents(), vec![0, 9, 31]);
        assert_eq!(read_header(&path).unwrap(), v1_example());
        // Updates rewrite the single header in place, still as version 1; the bitmap before it
        // is left alone.
        for n in [4, 5] {
            let before = read_tail(&path);
            disk.update_header(|h| h.local_gen = n).unwrap();
            assert_eq!(
                changed_blocks(&before, &read_tail(&path), 64 * MIB),
                [header_at]
            );
            let on_disk = block_at(&path, header_at);
            assert_eq!((on_disk.version, on_disk.header.local_gen), (1, n));
        }
        drop(disk);
        assert_eq!(Disk::open(&path, "r0").unwrap().header().local_gen, 5);
        assert_eq!(
            Disk::open(&path, "r0").unwrap().activemap().dirty_extents(),
            vec![0, 9, 31]
        );
        // `create` sees it, and with --force writes version 2 (one block less of data).
        let msg = err_text(create(&path, "r1", MIB, false));
        assert!(
            msg.contains("resource 'r0'") && msg.contains("--force"),
            "{msg}"
        );
        let h = create(&path, "r0", DEFAULT_EXTENT_SIZE, true).unwrap();
        assert_eq!(h.data_size, 64 * MIB - 12288);
        assert_eq!(Disk::open(&path, "r0").unwrap().layout().version, 2);
    }

    #[test]
    fn read_header_reads_any_resource() {
        let (_d, path) = sparse(16 * MIB);
        assert_eq!(
            err_text(read_header(&path)),
            format!("no tandem metadata on {}", path.display())
        );
        let created = create(&path, "r7", MIB, false).unwrap();
        assert_eq!(read_header(&path).unwrap(), created);
    }

    /// A loop device over a file, detached on drop.
    struct Loop(String);

    impl Loop {
        fn attach(file: &Path) -> Option<Loop> {
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(file)
                .output()
                .ok()?;
            if !out.status.success() {
                eprintln!(
                    "skip: losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return None;
            }
            Some(Loop(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    #[test]
    fn block_device_via_loop() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skip: block_device_via_loop needs root for losetup");
            return;
        }
        let (_d, file) = sparse(32 * MIB + 512);
        let Some(dev) = Loop::attach(&file) else {
            return;
        };
        let dev_path = PathBuf::from(&dev.0);
        create(&dev_path, "r0", MIB, false).unwrap();
        let disk = Disk::open(&dev_path, "r0").unwrap();
        // The loop device is 32 MiB + 512 bytes: the partial block is ignored.
        assert_eq!(disk.data_size(), 32 * MIB - 12288);
        disk.write_at(&vec![0xEE; 2 * MIB as usize], MIB).unwrap();
        assert!(!disk.is_zero_extent(1).unwrap());
        disk.punch(MIB, MIB).unwrap();
        disk.write_zeroes(2 * MIB, 4096).unwrap();
        disk.sync_data().unwrap();
        assert!(disk.is_zero_extent(1).unwrap());
        assert!(disk.is_zero_extent(0).unwrap());
        let mut buf = vec![0u8; 8192];
        disk.read_at(&mut buf, 2 * MIB).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0xEE));
        drop(disk);
        drop(dev);
        // The same metadata is in the backing file, at the same place.
        let back = Disk::open(&file, "r0").unwrap();
        assert_eq!(back.data_size(), 32 * MIB - 12288);
        let mut b = [0u8; 1];
        back.read_at(&mut b, 3 * MIB - 1).unwrap();
        assert_eq!(b[0], 0xEE);
    }

    /// The example in docs/on-disk-format.md is this test's output: if the format changes,
    /// the test fails and prints the new dump to paste into the document.
    #[test]
    fn hexdump_example_matches_the_documentation() {
        let (_d, path) = sparse(64 * MIB);
        create(&path, "r0", DEFAULT_EXTENT_SIZE, false).unwrap();
        // The version-1 example's fields, with the version-2 data size (one more header slot).
        let header = Header {
            data_size: 64 * MIB - 12288,
            ..v1_example()
        };
        {
            let disk = Disk::open(&path, "r0").unwrap();
            let map = disk.activemap();
            for e in 0..disk.extent_count() {
                map.mark_synced(e).unwrap();
            }
            map.merge(&[0, 9, 31]).unwrap();
            map.flush_clean().unwrap();
            // As after `create` and one update: slot A holds the header as created (sequence
            // 1), slot B the update (sequence 2).
            let created = Header {
                local_gen: 0,
                peer_gen: 0,
                ever_synced: false,
                prev_role: PrevRole::Init,
                ..header.clone()
            };
            let slots = disk.layout().slots().to_vec();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&encode_header(&created, FORMAT_VERSION, 1), slots[0])
                .unwrap();
            f.write_all_at(&encode_header(&header, FORMAT_VERSION, 2), slots[1])
                .unwrap();
        }
        let disk = Disk::open(&path, "r0").unwrap();
        assert_eq!(disk.header(), header);
        assert_eq!(disk.activemap().dirty_extents(), vec![0, 9, 31]);
        let layout = disk.layout();
        let mut tail = vec![0u8; layout.meta_size() as usize];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut tail, layout.bitmap_offset)
            .unwrap();
        let dump = hexdump(&tail, layout.bitmap_offset);
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/on-disk-format.md"
        ))
        .unwrap_or_default();
        assert!(
            doc.contains(&dump),
            "docs/on-disk-format.md must contain this hexdump of a 64 MiB disk:\n{dump}"
        );
    }
}
