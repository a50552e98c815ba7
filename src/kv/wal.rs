//! The KV write-ahead log (`sandkeep.wal` beside the database), like etcd's WAL in
//! front of bbolt: a write group is made durable by one fdatasync'd append of its
//! changes here, and applied to redb with a non-durable commit; a durable redb commit
//! (a *checkpoint*) later covers every frame before it and empties the log.
//!
//! An fsync of a few hundred appended bytes costs far less than a durable redb commit,
//! which writes every page the group touched and its allocator state: at 50 concurrent
//! writers the server's CPU per write fell from about 40 µs to 26 µs (README,
//! *Benchmarks*).
//!
//! Layout: an 8-byte magic and the size the file has grown to (u64) alone in the
//! first 4 KiB block, then frames
//! `[len u32][crc32 u32][lsn u64][payload]`, all little-endian, the CRC over the LSN
//! and the payload, each frame starting at a block boundary (zeros pad the rest of its
//! last block). An append writes whole blocks of its own with direct I/O and `O_DSYNC`,
//! so it never rewrites a block that holds an acknowledged frame, and skips the page
//! cache: on this machine's virtio disk one durable 4 KiB write takes 72 µs and 24 µs
//! of CPU this way, against 88 µs and 36 µs for a buffered write and fdatasync
//! (single-client durable SETs: +4%; at 50 clients within the noise). Where direct
//! I/O is refused (tmpfs, odd block sizes) the same blocks go through the page cache
//! and an fdatasync. Logs of the first format (frames back to back after the magic)
//! are still replayed; the log is rewritten in this format once its frames are
//! checkpointed ([`Wal::upgrade`]). LSNs count up by one, forever:
//! each checkpoint records the last LSN it covers in the database (`META["wal_lsn"]`),
//! so frames a crash left behind after their checkpoint are skipped at the next open,
//! never replayed over newer data. A frame that fails its CRC ends the log: it was
//! being written when the process died and was never acknowledged. Appends never change
//! the file's size (it grows zero-filled and synced beforehand), so a frame that runs
//! past the end of the file was cut by a truncation or a partial copy, not by a crash:
//! the log is refused, as acknowledged writes are missing. So is a log that ends right
//! where a frame ends anywhere but at a multiple of its growth step (1 MiB), or shorter
//! than the size its first block records (each growth records it once the zeros are
//! synced; a log from before that was recorded has 0 there).
//! The payload holds the group's changes to the KV tables as final states (record
//! blobs are sealed, so the log holds no plaintext value).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::store::Tables;

const MAGIC: &[u8; 8] = b"SKWAL\x00\x00\x02";
/// The first format, frames back to back after the magic: replayed, never appended to.
const MAGIC_V1: &[u8; 8] = b"SKWAL\x00\x00\x01";
/// Frames start at multiples of this, and appends write whole blocks.
const BLOCK: u64 = 4096;
const FRAME_HEADER: usize = 16;

/// One change to the KV tables, as a frame records it and as replay applies it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    /// A record's new sealed blob, or its removal.
    Record {
        ns: &'a str,
        key: &'a str,
        blob: Option<&'a [u8]>,
    },
    /// An expiry index entry added (`set`) or removed.
    Expiry {
        at: u64,
        ns: &'a str,
        key: &'a str,
        set: bool,
    },
    /// A namespace's (version, bytes, keys).
    Namespace { ns: &'a str, meta: (u64, u64, u64) },
}

impl Change<'_> {
    /// Makes the change in the group's tables.
    pub(crate) fn apply(&self, t: &mut Tables<'_>) -> Result<(), redb::StorageError> {
        match *self {
            Change::Record {
                ns,
                key,
                blob: Some(blob),
            } => {
                t.records.insert((ns, key), blob)?;
            }
            Change::Record {
                ns,
                key,
                blob: None,
            } => {
                t.records.remove((ns, key))?;
            }
            Change::Expiry {
                at,
                ns,
                key,
                set: true,
            } => {
                t.expiry.insert((at, ns, key), ())?;
            }
            Change::Expiry {
                at,
                ns,
                key,
                set: false,
            } => {
                t.expiry.remove((at, ns, key))?;
            }
            Change::Namespace { ns, meta } => {
                t.namespaces.insert(ns, meta)?;
            }
        }
        Ok(())
    }

    /// Appends the change's encoding to a frame payload.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        match *self {
            Change::Record { ns, key, blob } => {
                out.push(if blob.is_some() { 1 } else { 2 });
                bytes(out, ns.as_bytes());
                bytes(out, key.as_bytes());
                if let Some(b) = blob {
                    bytes(out, b);
                }
            }
            Change::Expiry { at, ns, key, set } => {
                out.push(if set { 3 } else { 4 });
                out.extend_from_slice(&at.to_le_bytes());
                bytes(out, ns.as_bytes());
                bytes(out, key.as_bytes());
            }
            Change::Namespace { ns, meta } => {
                out.push(5);
                bytes(out, ns.as_bytes());
                for n in [meta.0, meta.1, meta.2] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
    }
}

/// The changes of one frame payload, in order.
pub(crate) fn decode(payload: &[u8]) -> Result<Vec<Change<'_>>, String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("a change is cut short".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn u64(&mut self) -> Result<u64, String> {
            let mut b = [0u8; 8];
            b.copy_from_slice(self.take(8)?);
            Ok(u64::from_le_bytes(b))
        }
        fn bytes(&mut self) -> Result<&'a [u8], String> {
            let mut b = [0u8; 4];
            b.copy_from_slice(self.take(4)?);
            self.take(u32::from_le_bytes(b) as usize)
        }
        fn str(&mut self) -> Result<&'a str, String> {
            std::str::from_utf8(self.bytes()?).map_err(|_| "a name is not UTF-8".to_string())
        }
    }
    let mut r = Reader(payload);
    let mut changes = Vec::new();
    while !r.0.is_empty() {
        let tag = r.take(1)?[0];
        changes.push(match tag {
            1 | 2 => Change::Record {
                ns: r.str()?,
                key: r.str()?,
                blob: if tag == 1 { Some(r.bytes()?) } else { None },
            },
            3 | 4 => Change::Expiry {
                at: r.u64()?,
                ns: r.str()?,
                key: r.str()?,
                set: tag == 3,
            },
            5 => Change::Namespace {
                ns: r.str()?,
                meta: (r.u64()?, r.u64()?, r.u64()?),
            },
            t => return Err(format!("unknown change tag {t}")),
        });
    }
    Ok(changes)
}

/// The open log. Frames are written at `end` with positioned writes into space that
/// was zero-filled and synced beforehand, so that a durable append writes the frame's
/// blocks and not the file's size as well (measured: half the I/O requests, and each
/// costs a VM exit on a virtio disk). The file keeps its size: emptying the log
/// only moves `end` back to the start. Stale frames left behind are never replayed:
/// their LSNs are at most the checkpoint's, and a frame written over their start breaks
/// the chain of LSNs that a replay follows. A failed append leaves at most garbage after
/// the last good frame, which the next append overwrites and a replay stops at.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next frame goes (the end of the last good frame).
    end: u64,
    /// The file's size: zero-filled and synced up to here.
    allocated: u64,
    /// The last LSN handed out (used or not).
    lsn: u64,
    /// An append failed: what reached the disk is unknown, so nothing more may be
    /// appended until a checkpoint covered it and [`Wal::reset`] emptied the log.
    needs_reset: bool,
    /// When the first frame since the log was last emptied was appended.
    since: Option<Instant>,
    /// The log opened with `O_DIRECT | O_DSYNC` for appends; `None` once direct I/O
    /// was refused (blocks then go through `file` and an fdatasync).
    direct: Option<File>,
    /// Scratch space for the blocks of an append, aligned in place.
    blocks: Vec<u8>,
    /// The file is in the first format: it is read, and [`Wal::upgrade`] must rewrite
    /// it before anything is appended.
    legacy: bool,
}

/// A point in the log that [`Wal::undo`] goes back to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mark {
    end: u64,
    lsn: u64,
}

/// What [`Wal::open`] found: the frames newer than the database, to replay in order.
pub(crate) struct Pending {
    pub frames: Vec<(u64, Vec<u8>)>,
    /// The log ends with a frame that was cut short or is corrupt (dropped).
    pub torn: bool,
}

/// The log grows by this much at a time.
const GROW: u64 = 1 << 20;

impl Wal {
    /// Opens (or creates) the log at `path` for a database whose last checkpoint covers
    /// `applied`. Returns the frames after `applied`; an error when they do not follow
    /// it (a log from another database, or frames lost), which must not be guessed at.
    pub(crate) fn open(path: &Path, applied: u64) -> Result<(Wal, Pending), String> {
        let shown = path.display();
        let io = |e: std::io::Error| format!("{shown}: {e}");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io)?;
        let legacy = data.starts_with(MAGIC_V1);
        let mut wal = Wal {
            file,
            path: path.to_path_buf(),
            end: BLOCK,
            allocated: data.len() as u64,
            lsn: applied,
            needs_reset: false,
            since: None,
            direct: open_direct(path),
            blocks: Vec::new(),
            legacy,
        };
        if data.len() < MAGIC.len() || data.iter().all(|b| *b == 0) {
            // New, or its creation was cut short (zero-filled, its magic never
            // written: a full disk): nothing was ever appended.
            wal.file.set_len(0).map_err(io)?;
            wal.allocated = 0;
            // Writes the magic with the size.
            wal.grow(GROW).map_err(io)?;
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            let pending = Pending {
                frames: vec![],
                torn: false,
            };
            return Ok((wal, pending));
        }
        if &data[..MAGIC.len()] != MAGIC && !legacy {
            return Err(format!("{shown} is not a sandkeep KV log (bad magic)"));
        }
        let mut pos = wal.start() as usize;
        let mut frames = Vec::new();
        let mut last: Option<u64> = None;
        let torn = loop {
            let expected = last.map(|l| l + 1);
            match frame_at(&data, pos) {
                Frame::Good { lsn, payload, next } if expected.is_none_or(|e| lsn == e) => {
                    last = Some(lsn);
                    if lsn > applied {
                        frames.push((lsn, payload.to_vec()));
                    }
                    pos = if legacy {
                        next
                    } else {
                        next.next_multiple_of(BLOCK as usize)
                    };
                }
                // A bad frame that would have come next was being written at a crash;
                // anything else is a stale frame or zeros.
                Frame::Bad { lsn } => break lsn == expected.unwrap_or(applied + 1),
                // The first format grows by its appends: a crash cuts its last frame.
                Frame::Cut { lsn } if legacy => break lsn == expected.unwrap_or(applied + 1),
                // This one writes inside the zero-filled, synced size, which a crash never
                // shrinks: the next frame running past the end means the file was cut
                // short after it was written (truncated, or a partial copy).
                Frame::Cut { lsn } if lsn > applied && lsn == expected.unwrap_or(applied + 1) => {
                    let floor = last.unwrap_or(0).max(applied);
                    return Err(format!(
                        "{shown} is cut short: its frame at byte {pos} (LSN {lsn}) runs past the \
                         end of the file ({} bytes), which a crash never does, so writes from \
                         LSN {lsn} on that were acknowledged are missing. Restore the file from \
                         a copy; or move it away to start without the writes after LSN {floor}",
                        data.len()
                    ));
                }
                _ => break false,
            }
        };
        // A frame cut short by a crash is the last one ever written. A good frame past
        // the break that continues the LSNs means the log was damaged in the middle (or
        // its magic was): what follows holds acknowledged writes, and starting without
        // them must not be silent. (Frames left from before a checkpoint have LSNs it
        // covers.)
        let floor = last.unwrap_or(0).max(applied);
        // The size is a multiple of `GROW` (appends write inside it; a crash while it
        // grows leaves zeros after the last frame). A log that ends right where a frame
        // ends, anywhere else, was cut there: the frames after it may be gone. Unless
        // the frames there are stale ones a checkpoint covers: frames it does not cover
        // start the log. A cut at a multiple of `GROW` is told by the size the first
        // block records.
        let grown_to = data
            .get(MAGIC.len()..MAGIC.len() + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        if !legacy
            && pos == data.len()
            && (!(data.len() as u64).is_multiple_of(GROW) || (data.len() as u64) < grown_to)
            && last.is_none_or(|l| l > applied)
        {
            return Err(format!(
                "{shown} is cut short: it ends at byte {pos}, right after LSN {floor}, where \
                 the log never ends, so acknowledged writes after LSN {floor} may be missing. \
                 Restore the file from a copy; or move it away to start without them"
            ));
        }
        let mut at = pos;
        while at + FRAME_HEADER <= data.len() {
            if let Frame::Good { lsn, .. } = frame_at(&data, at)
                && lsn > floor
            {
                return Err(format!(
                    "{shown} is damaged at byte {pos}: the log breaks off after LSN {floor}, but \
                     a frame at byte {at} holds LSN {lsn}, and the frames from there on hold \
                     acknowledged writes. Restore the file from a copy; or move it away to \
                     start without the writes after LSN {floor}"
                ));
            }
            at = (at + 1).next_multiple_of(BLOCK as usize);
        }
        if let Some((first, _)) = frames.first()
            && *first != applied + 1
        {
            return Err(format!(
                "{shown} does not continue the database: its frames start at {first}, the \
                 database's last checkpoint covers {applied}. Move the file away to start \
                 without it (its writes are then lost)"
            ));
        }
        wal.end = pos as u64;
        wal.lsn = last.unwrap_or(0).max(applied);
        Ok((wal, Pending { frames, torn }))
    }

    /// Where the first frame goes.
    fn start(&self) -> u64 {
        if self.legacy {
            MAGIC.len() as u64
        } else {
            BLOCK
        }
    }

    /// Whether no frame was appended since the log was last emptied.
    pub(crate) fn is_empty(&self) -> bool {
        self.end == self.start()
    }

    /// Rewrites a log of the first format in the current one. Only once a checkpoint
    /// covered its frames and [`Wal::reset`] emptied it: they are dropped. Does nothing
    /// to a log in the current format.
    pub(crate) fn upgrade(&mut self) -> std::io::Result<()> {
        if !self.legacy {
            return Ok(());
        }
        if !self.is_empty() {
            return Err(std::io::Error::other(
                "the log's frames must be checkpointed before it is rewritten",
            ));
        }
        // To a multiple of `GROW`, like every log of this format.
        if self.allocated < 2 * BLOCK || !self.allocated.is_multiple_of(GROW) {
            self.grow(self.allocated.max(2 * BLOCK))?;
        }
        // The magic and the size, and a zeroed first frame so that the old frames
        // after it end the log.
        let allocated = self.allocated;
        self.write_blocks(0, (2 * BLOCK) as usize, |b| header(b, allocated))?;
        self.legacy = false;
        self.end = BLOCK;
        Ok(())
    }

    /// Whether a checkpoint has anything to cover: frames, or a failed append whose
    /// LSN no checkpoint has recorded yet (its bytes may be on disk).
    pub(crate) fn uncovered(&self) -> bool {
        !self.is_empty() || self.needs_reset
    }

    /// Whether the next group must checkpoint: the log holds `bytes` or more, its
    /// oldest frame is `age` old, or an append failed.
    pub(crate) fn needs_checkpoint(&self, bytes: u64, age: Duration) -> bool {
        self.needs_reset
            || self.end - self.start() >= bytes
            || self.since.is_some_and(|t| t.elapsed() >= age)
    }

    /// The last LSN handed out: a checkpoint records it.
    pub(crate) fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Appends one frame and makes it durable (fdatasync). The LSN is used up even
    /// when this fails, and later appends fail until [`Wal::reset`]: the caller makes
    /// the group durable in the database instead, with a checkpoint that covers the LSN
    /// whatever part of the frame reached the disk.
    pub(crate) fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        if self.legacy {
            return Err(std::io::Error::other(
                "the log is in an old format: it is not appended to before it is upgraded",
            ));
        }
        if self.needs_reset {
            return Err(std::io::Error::other(
                "an earlier append failed; the log is not used until the next checkpoint",
            ));
        }
        self.lsn += 1;
        let result = self.write_frame(payload);
        if result.is_err() {
            self.needs_reset = true;
        }
        result
    }

    fn write_frame(&mut self, payload: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if tests::failing(&self.path) {
            return Err(std::io::Error::other("injected append failure"));
        }
        let header = frame_header(self.lsn, payload)
            .ok_or_else(|| std::io::Error::other("a KV log frame over 4 GiB"))?;
        let size = FRAME_HEADER + payload.len();
        let new_end = self.end + (size as u64).next_multiple_of(BLOCK);
        if new_end > self.allocated {
            self.grow(new_end)?;
        }
        self.write_blocks(self.end, size, |b| {
            b[..FRAME_HEADER].copy_from_slice(&header);
            b[FRAME_HEADER..size].copy_from_slice(payload);
        })?;
        self.end = new_end;
        self.since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Makes `len` bytes (rounded up to whole blocks, zeros after what `fill` writes)
    /// durable at `at`, a block boundary: with direct I/O, or through the page cache
    /// and an fdatasync once direct I/O was refused.
    fn write_blocks(
        &mut self,
        at: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> std::io::Result<()> {
        let size = len.next_multiple_of(BLOCK as usize);
        self.blocks.clear();
        self.blocks.resize(size + BLOCK as usize, 0);
        let skip = self.blocks.as_ptr().align_offset(BLOCK as usize);
        let blocks = &mut self.blocks[skip..skip + size];
        fill(blocks);
        if let Some(direct) = &self.direct {
            match direct.write_all_at(blocks, at) {
                Ok(()) => return Ok(()),
                // The file system or device takes no direct I/O of this shape.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(log = %self.path.display(), "direct I/O refused; the KV log goes through the page cache");
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(blocks, at)?;
        self.file.sync_data()
    }

    /// Zero-fills the file up to at least `to` (whole [`GROW`] steps) and syncs it with
    /// its new size, so that appends there need not change the size; then records the
    /// size in the first block, so that a log cut back to an earlier size is told from
    /// one that ends there (the first format's block is left as it is).
    fn grow(&mut self, to: u64) -> std::io::Result<()> {
        let target = to.div_ceil(GROW) * GROW;
        let zeros = vec![0u8; GROW as usize];
        while self.allocated < target {
            let n = (target - self.allocated).min(GROW) as usize;
            self.file.write_all_at(&zeros[..n], self.allocated)?;
            self.allocated += n as u64;
        }
        self.file.sync_all()?;
        if self.legacy {
            return Ok(());
        }
        let allocated = self.allocated;
        self.write_blocks(0, BLOCK as usize, |b| header(b, allocated))
    }

    /// The current end of the log, for [`Wal::undo`].
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            end: self.end,
            lsn: self.lsn,
        }
    }

    /// Takes the log back to `mark` (the frames after it belong to a group that could
    /// not be committed), so that a replay does not apply what was answered with an
    /// error: the first frame header after it is zeroed and synced. When this fails the
    /// log waits for a checkpoint, like a failed append.
    pub(crate) fn undo(&mut self, mark: Mark) -> std::io::Result<()> {
        let result = self.write_blocks(mark.end, FRAME_HEADER, |_| {});
        match result {
            Ok(()) => {
                self.end = mark.end;
                self.lsn = mark.lsn;
                if self.is_empty() {
                    self.since = None;
                }
            }
            Err(_) => self.needs_reset = true,
        }
        result
    }

    /// Empties the log after a checkpoint covered every frame in it (its LSNs go on).
    pub(crate) fn reset(&mut self) {
        self.end = self.start();
        self.needs_reset = false;
        self.since = None;
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// The first block's content: the magic, then the size the file has grown to.
fn header(block: &mut [u8], grown_to: u64) {
    block[..MAGIC.len()].copy_from_slice(MAGIC);
    block[MAGIC.len()..MAGIC.len() + 8].copy_from_slice(&grown_to.to_le_bytes());
}

/// The log opened for durable direct writes, where the file system allows it.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

enum Frame<'a> {
    Good {
        lsn: u64,
        payload: &'a [u8],
        next: usize,
    },
    /// A header whose frame fails its CRC.
    Bad { lsn: u64 },
    /// A header whose frame runs past the end of the file.
    Cut { lsn: u64 },
    /// Not even a whole header.
    End,
}

/// A frame's checksum: CRC-32 over its LSN and its payload.
fn checksum(lsn: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The header of the frame that holds `payload` as `lsn`: `[len][crc][lsn]`; `None`
/// for a payload too long for its `len`.
fn frame_header(lsn: u64, payload: &[u8]) -> Option<[u8; FRAME_HEADER]> {
    let len = u32::try_from(payload.len()).ok()?;
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&checksum(lsn, payload).to_le_bytes());
    header[8..].copy_from_slice(&lsn.to_le_bytes());
    Some(header)
}

/// The frame at `pos`.
fn frame_at(data: &[u8], pos: usize) -> Frame<'_> {
    let Some(header) = data.get(pos..pos + FRAME_HEADER) else {
        return Frame::End;
    };
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (len, crc) = (word(0) as usize, word(4));
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&header[8..16]);
    let lsn = u64::from_le_bytes(lsn);
    let start = pos + FRAME_HEADER;
    let Some(payload) = start.checked_add(len).and_then(|end| data.get(start..end)) else {
        return Frame::Cut { lsn };
    };
    if checksum(lsn, payload) != crc {
        return Frame::Bad { lsn };
    }
    Frame::Good {
        lsn,
        payload,
        next: start + len,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Logs whose appends fail.
    static FAILING: crate::kv::Faults = crate::kv::Faults::new();

    pub(crate) fn fail_appends(path: &Path, fail: bool) {
        FAILING.set(path, fail);
    }

    pub(super) fn failing(path: &Path) -> bool {
        FAILING.on(path)
    }

    /// Writes a log of the first format at `path`: `frames` back to back after the
    /// magic, then zeros (as an older build left it).
    pub(crate) fn v1_log(path: &Path, frames: &[(u64, &[u8])]) {
        let mut data = MAGIC_V1.to_vec();
        for (lsn, payload) in frames {
            data.extend_from_slice(&frame_header(*lsn, payload).unwrap());
            data.extend_from_slice(payload);
        }
        data.resize(GROW as usize, 0);
        std::fs::write(path, data).unwrap();
    }

    fn changes() -> Vec<Change<'static>> {
        vec![
            Change::Record {
                ns: "n",
                key: "k",
                blob: Some(b"sealed"),
            },
            Change::Record {
                ns: "n",
                key: "gone",
                blob: None,
            },
            Change::Expiry {
                at: 42,
                ns: "n",
                key: "k",
                set: true,
            },
            Change::Expiry {
                at: 7,
                ns: "n",
                key: "k",
                set: false,
            },
            Change::Namespace {
                ns: "n",
                meta: (3, 100, 2),
            },
        ]
    }

    fn payload(cs: &[Change<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in cs {
            c.encode(&mut out);
        }
        out
    }

    #[test]
    fn changes_roundtrip_and_garbage_is_refused() {
        let p = payload(&changes());
        assert_eq!(decode(&p).unwrap(), changes());
        assert!(decode(&p[..p.len() - 1]).is_err());
        assert!(decode(&[9]).is_err());
    }

    #[test]
    fn a_zero_filled_log_is_one_whose_creation_was_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        std::fs::write(&path, vec![0u8; GROW as usize]).unwrap();
        let (mut wal, pending) = Wal::open(&path, 7).unwrap();
        assert!(pending.frames.is_empty() && !pending.torn);
        wal.append(b"x").unwrap();
        assert_eq!(wal.lsn(), 8);
        drop(wal);
        let (_, pending) = Wal::open(&path, 7).unwrap();
        assert_eq!(pending.frames.len(), 1);
    }

    #[test]
    fn frames_after_the_checkpoint_come_back_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, pending) = Wal::open(&path, 0).unwrap();
        assert!(pending.frames.is_empty() && wal.is_empty());
        for i in 0..3u8 {
            wal.append(&[i; 10]).unwrap();
        }
        assert_eq!(wal.lsn(), 3);
        let good = wal.end;
        // A fourth frame cut short by a crash: its header made it, its payload did not
        // (the zeros the log was grown with).
        wal.append(&[3; 100]).unwrap();
        drop(wal);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0; 100], good + 20).unwrap();

        // The database's checkpoint covers frame 1: frames 2 and 3 are replayed.
        let (mut wal, pending) = Wal::open(&path, 1).unwrap();
        let lsns: Vec<u64> = pending.frames.iter().map(|f| f.0).collect();
        assert_eq!(lsns, vec![2, 3]);
        assert_eq!(pending.frames[1].1, vec![2; 10]);
        assert!(pending.torn);
        assert_eq!(wal.end, good, "the next frame overwrites the torn one");
        wal.append(b"next").unwrap();
        assert_eq!(wal.lsn(), 4);
        drop(wal);
        let (_, pending) = Wal::open(&path, 3).unwrap();
        assert_eq!(pending.frames, vec![(4, b"next".to_vec())]);
    }

    #[test]
    fn a_corrupt_frame_ends_the_log_and_undo_takes_a_frame_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 10).unwrap();
        wal.append(b"one").unwrap();
        let mark = wal.mark();
        wal.append(b"two").unwrap();
        wal.undo(mark).unwrap();
        wal.append(b"three").unwrap();
        let third = wal.end;
        wal.append(b"four").unwrap();
        drop(wal);
        // Flip a payload byte of the last frame.
        let mut data = std::fs::read(&path).unwrap();
        data[third as usize + FRAME_HEADER] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let (wal, pending) = Wal::open(&path, 10).unwrap();
        assert_eq!(
            pending.frames,
            vec![(11, b"one".to_vec()), (12, b"three".to_vec())]
        );
        assert!(pending.torn);
        assert_eq!(wal.lsn(), 12);
    }

    #[test]
    fn appends_keep_the_size_and_stale_frames_after_a_reset_are_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(size(), GROW, "zero-filled ahead");
        for i in 1..=3u8 {
            wal.append(&[i; 50]).unwrap();
        }
        assert_eq!(size(), GROW, "appends write into the zero-filled space");
        // A checkpoint covered frames 1..=3.
        wal.reset();
        wal.append(b"four").unwrap();
        drop(wal);
        let (wal, pending) = Wal::open(&path, 3).unwrap();
        assert_eq!(pending.frames, vec![(4, b"four".to_vec())]);
        assert!(!pending.torn, "stale frames are not a torn write");
        assert_eq!(wal.lsn(), 4);
        // A frame bigger than the log's zero-filled space grows it.
        let (mut wal, _) = Wal::open(&path, 4).unwrap();
        wal.append(&vec![7u8; GROW as usize]).unwrap();
        assert_eq!(size(), 2 * GROW);
        drop(wal);
        let (_, pending) = Wal::open(&path, 4).unwrap();
        assert_eq!(pending.frames.len(), 1);
        assert_eq!(pending.frames[0].1.len(), GROW as usize);
    }

    #[test]
    fn frames_take_whole_blocks_with_direct_io_or_without() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        wal.append(b"one").unwrap();
        wal.append(&[2; 5000]).unwrap();
        // As where the file system refuses direct I/O.
        wal.direct = None;
        wal.append(b"three").unwrap();
        let mark = wal.mark();
        wal.append(b"taken back").unwrap();
        wal.undo(mark).unwrap();
        assert_eq!(
            wal.end,
            5 * BLOCK,
            "block 0 holds the magic; frame 2 takes two"
        );
        drop(wal);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..8], MAGIC);
        assert_eq!(data[8..16], GROW.to_le_bytes(), "the size grown to");
        assert!(data[16..BLOCK as usize].iter().all(|b| *b == 0));
        for (at, lsn) in [(1, 1u64), (2, 2), (4, 3)] {
            let header = &data[at * BLOCK as usize..][..FRAME_HEADER];
            assert_eq!(
                header[8..16],
                lsn.to_le_bytes(),
                "frame {lsn} at block {at}"
            );
        }
        let (wal, pending) = Wal::open(&path, 0).unwrap();
        let lsns: Vec<u64> = pending.frames.iter().map(|f| f.0).collect();
        assert_eq!(lsns, vec![1, 2, 3]);
        assert_eq!(pending.frames[1].1, vec![2; 5000]);
        assert!(!pending.torn, "the undone frame's header is zeros");
        assert_eq!(wal.end, 5 * BLOCK);
    }

    #[test]
    fn a_log_of_the_first_format_is_replayed_then_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        v1_log(&path, &[(7, b"seven"), (8, b"eight"), (9, b"nine")]);
        // The database's checkpoint covers 7.
        let (mut wal, pending) = Wal::open(&path, 7).unwrap();
        assert_eq!(
            pending.frames,
            vec![(8, b"eight".to_vec()), (9, b"nine".to_vec())]
        );
        assert!(!pending.torn);
        assert_eq!(wal.lsn(), 9);
        assert!(
            wal.upgrade().is_err(),
            "not before its frames are checkpointed"
        );
        assert!(wal.append(b"ten").is_err(), "never appended to");
        // A checkpoint covered 9.
        wal.reset();
        wal.upgrade().unwrap();
        wal.append(b"ten").unwrap();
        drop(wal);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..8], MAGIC);
        assert_eq!(data[8..16], (data.len() as u64).to_le_bytes());
        let (mut wal, pending) = Wal::open(&path, 9).unwrap();
        assert_eq!(pending.frames, vec![(10, b"ten".to_vec())]);
        assert!(!pending.torn);
        wal.upgrade().unwrap();
        // A checkpoint covered 10; the old frames are not mistaken for anything.
        wal.reset();
        drop(wal);
        let (_, pending) = Wal::open(&path, 10).unwrap();
        assert!(pending.frames.is_empty() && !pending.torn);
        // A bigger one is grown to a multiple of GROW, the size the open checks.
        let big = vec![1u8; 3 * BLOCK as usize];
        v1_log(&path, &[(1, &big)]);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(4 * BLOCK).unwrap();
        let (mut wal, _) = Wal::open(&path, 1).unwrap();
        wal.reset();
        wal.upgrade().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROW);
    }

    #[test]
    fn damage_before_acknowledged_frames_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        for i in 1..=5u8 {
            wal.append(&[i; 100]).unwrap();
        }
        drop(wal);
        let good = std::fs::read(&path).unwrap();
        let third = 3 * BLOCK as usize;
        type Damage = fn(&mut Vec<u8>, usize);
        let damages: [(&str, Damage); 4] = [
            ("a zeroed block", |d, at| d[at..at + 4096].fill(0)),
            ("a flipped payload bit", |d, at| d[at + FRAME_HEADER] ^= 1),
            ("a changed LSN", |d, at| d[at + 8] ^= 0x40),
            ("the old format's magic", |d, _| d[7] = 1),
        ];
        for (what, damage) in damages {
            let mut data = good.clone();
            damage(&mut data, third);
            std::fs::write(&path, &data).unwrap();
            let err = Wal::open(&path, 0)
                .err()
                .unwrap_or_else(|| panic!("{what}: opened"));
            assert!(err.contains("is damaged"), "{what}: {err}");
            // Nothing was rewritten.
            assert_eq!(std::fs::read(&path).unwrap(), data, "{what}");
        }
        // Damage to the last frame is a torn end: the others come back.
        let mut data = good;
        data[5 * BLOCK as usize + FRAME_HEADER] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let (_, pending) = Wal::open(&path, 0).unwrap();
        assert_eq!(pending.frames.len(), 4);
        assert!(pending.torn);
    }

    #[test]
    fn a_log_cut_short_inside_a_frame_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        for i in 1..=3u8 {
            wal.append(&[i; 100]).unwrap();
        }
        drop(wal);
        let good = std::fs::read(&path).unwrap();
        let third = 3 * BLOCK as usize;
        for cut in [third + 50, third + FRAME_HEADER] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let err = Wal::open(&path, 0)
                .err()
                .unwrap_or_else(|| panic!("cut at {cut}: opened"));
            assert!(err.contains("is cut short"), "{err}");
            assert!(err.contains("(LSN 3)"), "{err}");
            assert!(err.contains("after LSN 2"), "{err}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                &good[..cut],
                "nothing rewritten"
            );
        }
        // Frames the checkpoint covers may go: only stale frames past it are cut.
        std::fs::write(&path, &good[..third + 50]).unwrap();
        let (_, pending) = Wal::open(&path, 3).unwrap();
        assert!(pending.frames.is_empty() && !pending.torn);
        // Cut between two frames: the log never ends there, as its size is a
        // multiple of GROW; also cut before its first frame.
        for (cut, after) in [(third, 2), (BLOCK as usize, 0)] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let err = Wal::open(&path, 0)
                .err()
                .unwrap_or_else(|| panic!("cut at {cut}: opened"));
            assert!(err.contains("is cut short"), "{err}");
            assert!(
                err.contains(&format!("after LSN {after} may be missing")),
                "{err}"
            );
        }
        // ... unless the frames left are stale: the ones after them were too.
        std::fs::write(&path, &good[..third]).unwrap();
        let (_, pending) = Wal::open(&path, 2).unwrap();
        assert!(pending.frames.is_empty());
        // A crash while the log grew leaves zeros after the last frame.
        let mut grown = good.clone();
        grown.extend_from_slice(&[0; 1000]);
        std::fs::write(&path, &grown).unwrap();
        let (_, pending) = Wal::open(&path, 0).unwrap();
        assert_eq!(pending.frames.len(), 3);
    }

    /// A log cut back to a multiple of its growth step, right where a frame ends, looks
    /// like a log that ends there: the size its first block records tells them apart.
    #[test]
    fn a_log_cut_at_a_growth_step_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        // One block each after the magic's: the 255th ends at 1 MiB; the 256th grows it.
        let per_step = (GROW / BLOCK - 1) as u8;
        for i in 1..=per_step {
            wal.append(&[i; 100]).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROW);
        wal.append(&[0; 100]).unwrap();
        drop(wal);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(good.len() as u64, 2 * GROW);
        assert_eq!(good[8..16], (2 * GROW).to_le_bytes());

        std::fs::write(&path, &good[..GROW as usize]).unwrap();
        let err = Wal::open(&path, 0).err().expect("a cut log opened");
        assert!(err.contains("is cut short"), "{err}");
        assert!(err.contains("after LSN 255 may be missing"), "{err}");
        // Stale frames only (a checkpoint covers them all): nothing is missing.
        let (_, pending) = Wal::open(&path, 256).unwrap();
        assert!(pending.frames.is_empty());
        // The whole log opens, with every frame.
        std::fs::write(&path, &good).unwrap();
        let (_, pending) = Wal::open(&path, 0).unwrap();
        assert_eq!(pending.frames.len(), 256);
        // A log written before the size was recorded (zeros there) is taken as it is.
        let mut old = good[..GROW as usize].to_vec();
        old[8..16].fill(0);
        std::fs::write(&path, &old).unwrap();
        let (_, pending) = Wal::open(&path, 0).unwrap();
        assert_eq!(pending.frames.len(), 255);
    }

    #[test]
    fn a_failed_append_blocks_the_log_until_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 0).unwrap();
        wal.append(b"one").unwrap();
        fail_appends(&path, true);
        assert!(wal.append(b"two").is_err());
        fail_appends(&path, false);
        assert!(wal.append(b"three").is_err(), "not before a checkpoint");
        assert!(wal.needs_checkpoint(u64::MAX, Duration::MAX));
        assert_eq!(wal.lsn(), 2, "the failed append used its LSN");
        // A checkpoint covered LSN 2; the log starts again after it.
        wal.reset();
        wal.append(b"four").unwrap();
        drop(wal);
        let (_, pending) = Wal::open(&path, 2).unwrap();
        assert_eq!(pending.frames, vec![(3, b"four".to_vec())]);
    }

    #[test]
    fn frames_that_skip_past_the_checkpoint_or_a_foreign_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path, 5).unwrap();
        wal.append(b"x").unwrap();
        drop(wal);
        let err = Wal::open(&path, 2).err().unwrap();
        assert!(err.contains("does not continue"), "{err}");
        // Frames older than the checkpoint are skipped, not replayed.
        let (wal, pending) = Wal::open(&path, 9).unwrap();
        assert!(pending.frames.is_empty());
        assert_eq!(wal.lsn(), 9);
        std::fs::write(&path, b"something else").unwrap();
        assert!(Wal::open(&path, 0).err().unwrap().contains("bad magic"));
    }
}
