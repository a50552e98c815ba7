//! The redb-backed store: one writer thread with group commit, reads on the blocking
//! pool, watch notifications and the TTL purger.
//!
//! Every write request goes through a bounded queue to the writer thread, which takes
//! all requests waiting in the queue, runs each against its own staged overlay in one
//! redb write transaction, and makes the whole group durable at once: its changes are
//! appended to the write-ahead log ([`super::wal`]) with one fdatasync, then the
//! transaction commits without an fsync of its own. A request is answered only after
//! that, so an acknowledged write survives a crash (the next open replays the log),
//! while many concurrent writers share one small fsync; and nothing a reader sees was
//! not durable first. A durable redb commit (a checkpoint) empties the log once it
//! holds [`CHECKPOINT_BYTES`], is [`CHECKPOINT_AGE`] old, or the writer is idle; groups
//! with other writes ([`Job::Exec`]: file store, imports, bookkeeping, whose tables the
//! log does not describe) and the shutdown commit durably in redb, and so checkpoint.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use super::crypto::Cipher;
use super::ops::{Backing, BatchRequest, Limits, Loaded, NsTxn};
use super::wal::{self, Change, Wal};
use super::{KvError, Record, now_ms};

/// (namespace, key) → sealed record.
pub(crate) const RECORDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv_records");
/// namespace → (version, bytes, keys).
pub(crate) const NAMESPACES: TableDefinition<&str, (u64, u64, u64)> =
    TableDefinition::new("kv_namespaces");
/// (expires_ms, namespace, key): what the purger deletes, oldest first.
pub(crate) const EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("kv_expiry");
/// Store-wide facts; `key_check` proves the configured key is the one the data uses.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("kv_meta");

const KEY_CHECK_AAD: &[u8] = b"sandkeep:key-check";
const KEY_CHECK_PLAIN: &[u8] = b"sandkeep kv key check v1";
/// Plaintext header before the value's JSON: version, created, updated, expires (0 = none).
const HEADER_LEN: usize = 32;
/// Bytes a sealed blob adds to its plaintext (nonce + tag).
const SEAL_OVERHEAD: usize = 28;
/// Most requests committed together.
const MAX_GROUP: usize = 512;
/// Most expired records deleted by one purge transaction.
const PURGE_BATCH: usize = 10_000;
/// `META` entry: the last write-ahead log LSN that a durable commit covers.
const WAL_LSN: &str = "wal_lsn";
/// `META` entry: the database's id (see [`KvStore::id`]).
const STORE_ID: &str = "store_id";
/// The log is checkpointed once its frames take this many bytes...
pub(crate) const CHECKPOINT_BYTES: u64 = 16 << 20;
/// ... or its oldest frame is this old ...
pub(crate) const CHECKPOINT_AGE: Duration = Duration::from_secs(1);
/// ... or no write came for this long.
const CHECKPOINT_IDLE: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NsMeta {
    pub version: u64,
    pub bytes: u64,
    pub keys: u64,
}

/// The answer to a write request.
#[derive(Debug)]
pub struct WriteOutcome {
    /// The namespace version after the request.
    pub version: u64,
    /// One body per operation, as the single-key route would answer.
    pub results: Vec<Value>,
}

pub struct StoreOptions {
    pub path: PathBuf,
    pub cipher: Cipher,
    pub limits: Limits,
    /// Requests that may wait for the writer before new ones get `busy`.
    pub queue_capacity: usize,
}

enum Job {
    Write {
        ns: String,
        req: BatchRequest,
        batch: bool,
        reply: oneshot::Sender<Result<WriteOutcome, KvError>>,
    },
    Purge,
    /// Any other write (file store, imports, replication bookkeeping), run inside the
    /// group's transaction; the returned callback is told whether the commit held.
    Exec(ExecFn),
}

/// The tables every write group holds open; [`Job::Exec`] closures get them too (and
/// may open others from the transaction).
pub struct Tables<'t> {
    pub records: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    pub namespaces: redb::Table<'t, &'static str, (u64, u64, u64)>,
    pub expiry: redb::Table<'t, (u64, &'static str, &'static str), ()>,
}

impl<'t> Tables<'t> {
    fn open(wtx: &'t redb::WriteTransaction) -> Result<Self, KvError> {
        Ok(Tables {
            records: wtx.open_table(RECORDS)?,
            namespaces: wtx.open_table(NAMESPACES)?,
            expiry: wtx.open_table(EXPIRY)?,
        })
    }
}

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
type ExecFn = Box<
    dyn for<'a, 't> FnOnce(&'a redb::WriteTransaction, &'a mut Tables<'t>, &'a Cipher) -> Done
        + Send,
>;

/// How many recent deletions a watched namespace remembers (see [`Watchers`]).
const DELETIONS_KEPT: usize = 1024;

/// Per-namespace version channels that `watch` requests wait on, and the keys deleted
/// since the first of them began: a key created and deleted between two reads of a
/// watch is missing at both, and only this tells the watch that it changed.
#[derive(Default)]
struct Watchers {
    map: Mutex<HashMap<String, NsWatch>>,
}

struct NsWatch {
    tx: watch::Sender<u64>,
    /// The latest deletions, oldest first, as [`NsChange::deleted`] has them.
    deleted: VecDeque<(u64, String)>,
    /// The highest version among deletions no longer kept.
    forgotten: u64,
}

/// What one commit changed in a namespace.
#[derive(Default)]
struct NsChange {
    version: u64,
    /// Keys deleted or expired (purged), each with the namespace version after which
    /// a watch missing it may have missed it: the deletion's, or for an expired key the
    /// version it was written at.
    deleted: Vec<(u64, String)>,
}

impl Watchers {
    fn subscribe(&self, ns: &str, current: u64) -> watch::Receiver<u64> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(ns.to_string())
            .or_insert_with(|| NsWatch {
                tx: watch::channel(current).0,
                deleted: VecDeque::new(),
                forgotten: 0,
            })
            .tx
            .subscribe()
    }

    fn notify(&self, ns: &str, change: NsChange) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = map.get_mut(ns) else { return };
        if w.tx.receiver_count() == 0 {
            map.remove(ns);
            return;
        }
        for (version, key) in change.deleted {
            if w.deleted.len() == DELETIONS_KEPT
                && let Some((v, _)) = w.deleted.pop_front()
            {
                w.forgotten = w.forgotten.max(v);
            }
            w.deleted.push_back((version, key));
        }
        w.tx.send_replace(change.version);
    }

    /// Whether `key` may have been deleted after namespace version `since`: it was, or
    /// deletions after `since` are no longer kept.
    fn deleted_after(&self, ns: &str, key: &str, since: u64) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(ns).is_some_and(|w| {
            w.forgotten > since || w.deleted.iter().any(|(v, k)| *v > since && k == key)
        })
    }
}

struct Inner {
    db: Arc<Database>,
    cipher: Cipher,
    /// The writer's queue. Owned here; `close` takes it, which ends the writer thread.
    tx: Mutex<Option<SyncSender<Job>>>,
    /// The writer thread; joined by `close`.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The point-read queue. Owned here; `close` takes it, which ends the reader thread.
    reads: Mutex<Option<std::sync::mpsc::Sender<ReadJob>>>,
    /// The reader thread; joined by `close`.
    reader: Mutex<Option<JoinHandle<()>>>,
    watchers: Arc<Watchers>,
    /// Cleared when the final export starts: later writes get `shutting_down`.
    accepting: AtomicBool,
    /// Woken after every commit that changed KV data (and by the file store): the
    /// replicator waits on it.
    changes: Arc<tokio::sync::Notify>,
    stats: Arc<CommitStats>,
    /// Set when the database refuses every write until it is reopened (redb after an
    /// I/O error, such as a full disk): what the writer saw.
    broken: Arc<Mutex<Option<String>>>,
    /// This database's id, made at its first open: its exports carry it.
    id: String,
    /// Holds the next [`KvStore::send`] before it queues: tells the first channel,
    /// waits on the second.
    #[cfg(test)]
    send_gate: tests::Gate,
}

/// What the writer committed since the store was opened (for `/metrics`).
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Commit groups, each made durable at once: one log append and fdatasync, or a
    /// durable database commit.
    pub groups: AtomicU64,
    /// Write requests those groups answered with success (a batch counts once).
    pub writes: AtomicU64,
    /// Durable database commits (checkpoints of the write-ahead log included).
    pub checkpoints: AtomicU64,
}

/// Cheap to clone; all clones share one database and one writer.
#[derive(Clone)]
pub struct KvStore {
    inner: Arc<Inner>,
}

pub(crate) fn aad(ns: &str, key: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(ns.len() + 1 + key.len());
    a.extend_from_slice(ns.as_bytes());
    a.push(0);
    a.extend_from_slice(key.as_bytes());
    a
}

pub(crate) fn encode(rec: &Record, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    for n in [
        rec.version,
        rec.created_ms,
        rec.updated_ms,
        rec.expires_ms.unwrap_or(0),
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(json);
    out
}

/// A record's plaintext, its value parsed when `parse` asks for it (else left `Null`).
pub(crate) fn decode(plain: Vec<u8>, parse: bool) -> Result<Loaded, KvError> {
    if plain.len() < HEADER_LEN {
        return Err(KvError::Storage("record is truncated".into()));
    }
    let n = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&plain[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let (version, created_ms, updated_ms, expires) = (n(0), n(1), n(2), n(3));
    let json = plain[HEADER_LEN..].to_vec();
    let value = if parse {
        serde_json::from_slice(&json).map_err(|e| KvError::Storage(format!("record value: {e}")))?
    } else {
        Value::Null
    };
    Ok(Loaded {
        record: Record {
            value,
            version,
            created_ms,
            updated_ms,
            expires_ms: (expires != 0).then_some(expires),
        },
        json,
        parsed: parse,
    })
}

/// A record with its value left as stored (`record.value` is `Null`, the JSON in
/// `json`): for readers that need its meta or the JSON whole (list, export).
pub(crate) fn open_record(
    cipher: &Cipher,
    ns: &str,
    key: &str,
    blob: &[u8],
) -> Result<Loaded, KvError> {
    open_sealed(cipher, ns, key, blob, false)
}

fn open_sealed(
    cipher: &Cipher,
    ns: &str,
    key: &str,
    blob: &[u8],
    parse: bool,
) -> Result<Loaded, KvError> {
    let plain = cipher
        .open(&aad(ns, key), blob)
        .map_err(|e| KvError::Storage(format!("{ns}/{key}: {e}")))?;
    decode(plain, parse)
}

impl KvStore {
    /// Opens (or creates) the database, checks the key, and starts the writer thread.
    pub fn open(opts: StoreOptions) -> Result<Self, KvError> {
        let log = wal_path(&opts.path);
        discard_unborn_database(&opts.path);
        if !opts.path.exists() {
            discard_orphan_log(&log)?;
        }
        #[cfg(not(test))]
        let db = Database::create(&opts.path);
        #[cfg(test)]
        let db = tests::open_database(&opts.path);
        let db = db.map_err(|e| KvError::Storage(format!("{}: {e}", opts.path.display())))?;
        let id = prepare(&db, &opts.cipher)?;
        let wal = recover(&db, &log)?;
        let db = Arc::new(db);
        let (tx, rx) = std::sync::mpsc::sync_channel(opts.queue_capacity.max(1));
        let watchers = Arc::new(Watchers::default());
        let changes = Arc::new(tokio::sync::Notify::new());
        let stats = Arc::new(CommitStats::default());
        let broken = Arc::new(Mutex::new(None));
        let writer = Writer {
            db: db.clone(),
            cipher: opts.cipher.clone(),
            limits: opts.limits,
            watchers: watchers.clone(),
            changes: changes.clone(),
            stats: stats.clone(),
            wal,
            broken: broken.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("kv-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| KvError::Internal(format!("cannot start the writer thread: {e}")))?;
        let (reads, read_rx) = std::sync::mpsc::channel();
        let reader = {
            let (db, cipher) = (db.clone(), opts.cipher.clone());
            std::thread::Builder::new()
                .name("kv-reader".into())
                .spawn(move || run_reader(&db, &cipher, read_rx))
                .map_err(|e| KvError::Internal(format!("cannot start the reader thread: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                cipher: opts.cipher,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                reads: Mutex::new(Some(reads)),
                reader: Mutex::new(Some(reader)),
                watchers,
                accepting: AtomicBool::new(true),
                changes,
                stats,
                broken,
                id,
                #[cfg(test)]
                send_gate: Default::default(),
            }),
        })
    }

    /// Why the store takes no more writes until the daemon restarts (the database hit
    /// an I/O error, such as a full disk), if it does not.
    pub fn broken(&self) -> Option<String> {
        self.inner
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The error for a write whose reply never came: the writer stopped, or gave up
    /// on a database that takes no more writes.
    fn unanswered(&self) -> KvError {
        match self.broken() {
            Some(why) => KvError::Storage(why),
            None => KvError::ShuttingDown,
        }
    }

    /// Queues a write request and waits until its group commit is durable.
    pub async fn write(
        &self,
        ns: &str,
        req: BatchRequest,
        batch: bool,
    ) -> Result<WriteOutcome, KvError> {
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(KvError::ShuttingDown);
        }
        let (reply, rx) = oneshot::channel();
        let job = Job::Write {
            ns: ns.to_string(),
            req,
            batch,
            reply,
        };
        self.send(job, false)?;
        rx.await.map_err(|_| self.unanswered())?
    }

    /// Runs `f` inside the writer's next group transaction and answers once that commit
    /// is durable. `f` must check everything before it writes: when it returns an
    /// error, what it wrote is committed with the group all the same. `internal` jobs
    /// (replication bookkeeping, restores) still run after [`KvStore::stop_writes`].
    pub(crate) async fn exec<T: Send + 'static>(
        &self,
        internal: bool,
        f: impl for<'a, 't> FnOnce(
            &'a redb::WriteTransaction,
            &'a mut Tables<'t>,
            &'a Cipher,
        ) -> Result<T, KvError>
        + Send
        + 'static,
    ) -> Result<T, KvError> {
        if !internal && !self.inner.accepting.load(Ordering::Acquire) {
            return Err(KvError::ShuttingDown);
        }
        let (reply, rx) = oneshot::channel();
        let job: ExecFn = Box::new(
            move |wtx: &redb::WriteTransaction, tables: &mut Tables<'_>, cipher: &Cipher| {
                let result = f(wtx, tables, cipher);
                Box::new(move |commit: Result<(), String>| {
                    let _ = reply.send(commit.map_err(KvError::Storage).and(result));
                }) as Done
            },
        );
        self.send(Job::Exec(job), internal)?;
        rx.await.map_err(|_| self.unanswered())?
    }

    /// Runs `f` on a read transaction on the blocking pool.
    pub(crate) async fn read_txn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction, &Cipher) -> Result<T, KvError> + Send + 'static,
    ) -> Result<T, KvError> {
        self.read(move |inner| {
            let rtx = inner.db.begin_read()?;
            f(&rtx, &inner.cipher)
        })
        .await
    }

    /// Answers once every write queued before the call is committed (also after
    /// `stop_writes`).
    pub async fn drain(&self) -> Result<(), KvError> {
        self.exec(true, |_, _, _| Ok(())).await
    }

    /// The writer's counts, live.
    pub fn commit_stats(&self) -> Arc<CommitStats> {
        self.inner.stats.clone()
    }

    /// Notified after commits that changed data; the replicator waits on it.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.inner.changes.clone()
    }

    pub(crate) fn cipher(&self) -> Cipher {
        self.inner.cipher.clone()
    }

    /// This database's id (16 random bytes, hex), made at its first open and kept in
    /// it: an export carrying it was written from here.
    pub(crate) fn id(&self) -> &str {
        &self.inner.id
    }

    /// Whether writes are still accepted.
    pub fn accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::Acquire)
    }

    /// Queues `job`; unless `internal`, only while writes are accepted. The check is
    /// made under the queue's lock, which [`KvStore::stop_writes`] takes too: a write
    /// is either queued before writes stop (and so before any later [`KvStore::drain`])
    /// or refused, never queued after the final export has read its namespace.
    fn send(&self, job: Job, internal: bool) -> Result<(), KvError> {
        #[cfg(test)]
        tests::pass_gate(&self.inner.send_gate);
        let guard = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        if !internal && !self.inner.accepting.load(Ordering::Acquire) {
            return Err(KvError::ShuttingDown);
        }
        let tx = guard.as_ref().ok_or(KvError::ShuttingDown)?;
        tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => KvError::Busy,
            TrySendError::Disconnected(_) => KvError::ShuttingDown,
        })
    }

    /// Refuses every later write with `shutting_down`.
    pub fn stop_writes(&self) {
        let _queue = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.accepting.store(false, Ordering::Release);
    }

    /// Stops the writer after the queued requests and waits for it. Reads keep working
    /// until the last clone is dropped, which closes the database.
    pub fn close(&self) {
        self.stop_writes();
        drop(
            self.inner
                .tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the kv writer thread panicked");
        }
        self.inner.stop_reader();
    }

    /// A point read (a key and/or the namespace meta) on the reader thread, which
    /// serves every read queued meanwhile from one read transaction: redb's I/O never
    /// runs on the executor, and a busy daemon pays one thread wake-up per batch of
    /// reads instead of one per read.
    /// `parse`: whether the record's value is parsed (else only its stored JSON is kept).
    async fn point(
        &self,
        ns: &str,
        key: Option<&str>,
        meta: bool,
        parse: bool,
    ) -> Result<(Option<Loaded>, NsMeta), KvError> {
        let (reply, rx) = oneshot::channel();
        let job = ReadJob {
            ns: ns.to_string(),
            key: key.map(str::to_string),
            meta,
            parse,
            reply,
        };
        {
            let guard = self.inner.reads.lock().unwrap_or_else(|e| e.into_inner());
            let tx = guard.as_ref().ok_or(KvError::ShuttingDown)?;
            tx.send(job).map_err(|_| KvError::ShuttingDown)?;
        }
        rx.await.map_err(|_| self.unanswered())?
    }

    /// Runs a read on the blocking pool so redb's I/O never stalls the executor.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, KvError> + Send + 'static,
    ) -> Result<T, KvError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| KvError::Internal(format!("read task: {e}")))?
    }

    /// The visible record of `key`.
    pub async fn get(&self, ns: &str, key: &str) -> Result<Option<Record>, KvError> {
        let (loaded, _) = self.point(ns, Some(key), false, true).await?;
        Ok(loaded.map(|l| l.record))
    }

    /// The visible record of `key` and the namespace's meta, read together.
    pub async fn get_with_meta(
        &self,
        ns: &str,
        key: &str,
    ) -> Result<(Option<Record>, NsMeta), KvError> {
        let (loaded, meta) = self.point(ns, Some(key), true, true).await?;
        Ok((loaded.map(|l| l.record), meta))
    }

    /// The visible record of `key` with its value left as stored (`record.value` is
    /// `Null`; the JSON is in `json`), and the namespace's meta when `meta` asks for it:
    /// for an answer that carries the value whole, without parsing and serializing it.
    pub async fn get_stored(
        &self,
        ns: &str,
        key: &str,
        meta: bool,
    ) -> Result<(Option<Loaded>, NsMeta), KvError> {
        self.point(ns, Some(key), meta, false).await
    }

    pub async fn ns_meta(&self, ns: &str) -> Result<NsMeta, KvError> {
        Ok(self.point(ns, None, true, false).await?.1)
    }

    /// Up to `limit` visible keys of `ns` starting with `prefix`, after `after`; and
    /// whether more follow.
    pub async fn list(
        &self,
        ns: &str,
        prefix: &str,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<String>, bool, NsMeta), KvError> {
        let (ns, prefix) = (ns.to_string(), prefix.to_string());
        self.read(move |inner| {
            let rtx = inner.db.begin_read()?;
            let meta = meta_in(&rtx, &ns)?;
            let table = match rtx.open_table(RECORDS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((vec![], false, meta)),
                Err(e) => return Err(e.into()),
            };
            let start = match &after {
                Some(a) if a.as_str() >= prefix.as_str() => a.as_str(),
                _ => prefix.as_str(),
            };
            let now = now_ms();
            let mut keys = Vec::new();
            let mut more = false;
            for item in table.range((ns.as_str(), start)..)? {
                let (k, v) = item?;
                let (kns, key) = k.value();
                if kns != ns || !key.starts_with(prefix.as_str()) {
                    break;
                }
                if after.as_deref() == Some(key) {
                    continue;
                }
                let loaded = open_record(&inner.cipher, &ns, key, v.value())?;
                if loaded.record.is_expired(now) {
                    continue;
                }
                if keys.len() == limit {
                    more = true;
                    break;
                }
                keys.push(key.to_string());
            }
            Ok((keys, more, meta))
        })
        .await
    }

    /// Namespaces that hold keys, and their total size.
    pub async fn stats(&self) -> Result<(u64, u64), KvError> {
        self.read(|inner| {
            let rtx = inner.db.begin_read()?;
            let table = match rtx.open_table(NAMESPACES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, 0)),
                Err(e) => return Err(e.into()),
            };
            let (mut n, mut bytes) = (0, 0);
            for item in table.iter()? {
                let (_, v) = item?;
                let (_, b, keys) = v.value();
                if keys > 0 {
                    n += 1;
                    bytes += b;
                }
            }
            Ok((n, bytes))
        })
        .await
    }

    /// A receiver that changes whenever `ns` commits a write.
    pub fn subscribe(&self, ns: &str, current: u64) -> watch::Receiver<u64> {
        self.inner.watchers.subscribe(ns, current)
    }

    /// For a holder of a [`subscribe`](Self::subscribe) receiver taken before it read
    /// namespace version `since`: whether `key` may have been deleted (or expired)
    /// after it. `true` also when so many deletions came since that the ones after
    /// `since` are no longer all known.
    pub fn deleted_after(&self, ns: &str, key: &str, since: u64) -> bool {
        self.inner.watchers.deleted_after(ns, key, since)
    }

    /// When the earliest TTL runs out, if any key has one.
    pub async fn next_expiry(&self) -> Result<Option<u64>, KvError> {
        self.read(|inner| {
            let rtx = inner.db.begin_read()?;
            let table = match rtx.open_table(EXPIRY) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(table.first()?.map(|(k, _)| k.value().0))
        })
        .await
    }

    /// Deletes expired records in the background until `stop` fires. Expired keys are
    /// already invisible to every read; this frees their space, bumps the namespace
    /// version (like an etcd lease expiry) and wakes watchers.
    pub async fn run_purger(self, stop: tokio_util::sync::CancellationToken) {
        const MAX_SLEEP: Duration = Duration::from_millis(500);
        loop {
            let sleep = match self.next_expiry().await {
                Ok(Some(at)) if at <= now_ms() => {
                    if let Err(e) = self.send(Job::Purge, true) {
                        tracing::debug!(error = %e, "purge not queued");
                    }
                    MAX_SLEEP.min(Duration::from_millis(50))
                }
                Ok(Some(at)) => MAX_SLEEP.min(Duration::from_millis(at - now_ms())),
                Ok(None) => MAX_SLEEP,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the expiry index");
                    MAX_SLEEP
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }
}

impl Inner {
    fn stop_reader(&self) {
        drop(self.reads.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take()
            && h.join().is_err()
        {
            tracing::error!("the kv reader thread panicked");
        }
    }
}

struct ReadJob {
    ns: String,
    key: Option<String>,
    meta: bool,
    parse: bool,
    reply: oneshot::Sender<Result<(Option<Loaded>, NsMeta), KvError>>,
}

/// Most reads served from one read transaction.
const MAX_READ_GROUP: usize = 256;

fn run_reader(db: &Database, cipher: &Cipher, rx: std::sync::mpsc::Receiver<ReadJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_READ_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let rtx = match db.begin_read() {
            Ok(t) => t,
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(KvError::Storage(e.to_string())));
                }
                continue;
            }
        };
        for j in jobs {
            let result = (|| {
                let rec = match &j.key {
                    Some(k) => get_in(&rtx, cipher, &j.ns, k, j.parse)?,
                    None => None,
                };
                let meta = if j.meta {
                    meta_in(&rtx, &j.ns)?
                } else {
                    NsMeta::default()
                };
                Ok((rec, meta))
            })();
            let _ = j.reply.send(result);
        }
    }
}

fn get_in(
    rtx: &redb::ReadTransaction,
    cipher: &Cipher,
    ns: &str,
    key: &str,
    parse: bool,
) -> Result<Option<Loaded>, KvError> {
    let table = match rtx.open_table(RECORDS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(blob) = table.get((ns, key))? else {
        return Ok(None);
    };
    let loaded = open_sealed(cipher, ns, key, blob.value(), parse)?;
    Ok((!loaded.record.is_expired(now_ms())).then_some(loaded))
}

fn meta_in(rtx: &redb::ReadTransaction, ns: &str) -> Result<NsMeta, KvError> {
    let table = match rtx.open_table(NAMESPACES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(NsMeta::default()),
        Err(e) => return Err(e.into()),
    };
    Ok(table
        .get(ns)?
        .map(|v| {
            let (version, bytes, keys) = v.value();
            NsMeta {
                version,
                bytes,
                keys,
            }
        })
        .unwrap_or_default())
}

/// Creates the tables, refuses a key that is not the one the data was written with,
/// and gives the database's id (made at its first open).
fn prepare(db: &Database, cipher: &Cipher) -> Result<String, KvError> {
    let wtx = db.begin_write()?;
    let id = {
        wtx.open_table(RECORDS)?;
        wtx.open_table(NAMESPACES)?;
        wtx.open_table(EXPIRY)?;
        let mut meta = wtx.open_table(META)?;
        let existing = meta.get("key_check")?.map(|v| v.value().to_vec());
        match existing {
            Some(blob) => {
                if cipher.open(KEY_CHECK_AAD, &blob).ok().as_deref() != Some(KEY_CHECK_PLAIN) {
                    return Err(KvError::Storage(
                        "the configured kv key is not the key this database was written with"
                            .into(),
                    ));
                }
            }
            None => {
                meta.insert(
                    "key_check",
                    cipher.seal(KEY_CHECK_AAD, KEY_CHECK_PLAIN).as_slice(),
                )?;
            }
        }
        let existing = meta.get(STORE_ID)?.map(|v| v.value().to_vec());
        match existing.map(String::from_utf8) {
            Some(Ok(id)) => id,
            _ => {
                let id = hex::encode(rand::random::<[u8; 16]>());
                meta.insert(STORE_ID, id.as_bytes())?;
                id
            }
        }
    };
    wtx.commit()?;
    Ok(id)
}

/// The write-ahead log beside a database file (`sandkeep.redb` → `sandkeep.wal`).
/// Removes a database file that a first start created and never wrote a header into
/// (its disk filled up at once): nothing in it was ever committed, and redb would
/// refuse it at every start ("magic number mismatch") until someone removed it.
pub fn discard_unborn_database(path: &Path) {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    let Ok(file) = std::fs::File::open(path) else {
        return;
    };
    if file.take(4096).read_to_end(&mut head).is_err() || head.iter().any(|b| *b != 0) {
        return;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            "removed a database file holding no header (a start that failed before its first commit)"
        ),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a database file holding no header")
        }
    }
}

pub fn wal_path(db: &Path) -> PathBuf {
    db.with_extension("wal")
}

/// A log without its database (the database file was removed to start afresh) belongs
/// to data that is gone: a new database must not start with its frames.
fn discard_orphan_log(log: &Path) -> Result<(), KvError> {
    match std::fs::remove_file(log) {
        Ok(()) => {
            tracing::warn!(
                log = %log.display(),
                "removed a KV write-ahead log whose database file is gone; the new database starts empty"
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KvError::Storage(format!("{}: {e}", log.display()))),
    }
}

/// The last log LSN that a durable commit covers (0 before the first checkpoint).
fn checkpointed_lsn(rtx: &redb::ReadTransaction) -> Result<u64, KvError> {
    let meta = rtx.open_table(META)?;
    let lsn = meta.get(WAL_LSN)?;
    Ok(lsn
        .and_then(|v| v.value().try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0))
}

/// Records in `wtx`, whose commit is durable, that it covers the log up to `lsn`.
fn record_checkpoint(wtx: &redb::WriteTransaction, lsn: u64) -> Result<(), KvError> {
    wtx.open_table(META)?
        .insert(WAL_LSN, lsn.to_le_bytes().as_slice())?;
    Ok(())
}

/// Opens the write-ahead log and applies the frames newer than the database's last
/// checkpoint in one durable commit, which leaves the log empty.
fn recover(db: &Database, path: &Path) -> Result<Wal, KvError> {
    let applied = checkpointed_lsn(&db.begin_read()?)?;
    let (mut wal, pending) = Wal::open(path, applied).map_err(KvError::Storage)?;
    if pending.torn {
        tracing::warn!(
            log = %path.display(),
            "dropped the torn end of the KV write-ahead log (a write cut short by a crash, never acknowledged)"
        );
    }
    if !pending.frames.is_empty() {
        let wtx = db.begin_write()?;
        {
            let mut tables = Tables::open(&wtx)?;
            for (lsn, payload) in &pending.frames {
                let changes = wal::decode(payload).map_err(|e| {
                    KvError::Storage(format!("{} frame {lsn}: {e}", path.display()))
                })?;
                for c in changes {
                    c.apply(&mut tables)?;
                }
            }
        }
        record_checkpoint(&wtx, wal.lsn())?;
        wtx.commit()?;
        tracing::info!(
            frames = pending.frames.len(),
            "replayed the KV write-ahead log into the database"
        );
    }
    wal.reset();
    wal.upgrade()
        .map_err(|e| KvError::Storage(format!("{}: {e}", path.display())))?;
    Ok(wal)
}

/// Owns redb write transactions and the write-ahead log; runs on its own thread.
struct Writer {
    db: Arc<Database>,
    cipher: Cipher,
    limits: Limits,
    watchers: Arc<Watchers>,
    changes: Arc<tokio::sync::Notify>,
    stats: Arc<CommitStats>,
    wal: Wal,
    broken: Arc<Mutex<Option<String>>>,
}

struct TableBacking<'a, 't> {
    records: &'a mut redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    cipher: &'a Cipher,
    ns: &'a str,
}

impl Backing for TableBacking<'_, '_> {
    fn load(&mut self, key: &str) -> Result<Option<Loaded>, KvError> {
        match self.records.get((self.ns, key))? {
            // The writer parses a value only for the operations that need it.
            Some(blob) => open_sealed(self.cipher, self.ns, key, blob.value(), false).map(Some),
            None => Ok(None),
        }
    }
}

type Reply = oneshot::Sender<Result<WriteOutcome, KvError>>;

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            // A broken database takes no checkpoint either: wait for writes (to refuse).
            let first = if !self.wal.uncovered() || self.is_broken() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(CHECKPOINT_IDLE) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => {
                        self.commit_group(Vec::new(), true);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            self.commit_group(jobs, false);
        }
        if self.wal.uncovered() {
            // Closing: leave the database complete and the log empty.
            self.commit_group(Vec::new(), true);
        }
    }

    /// Runs every job of the group in one transaction and makes it durable once: with
    /// a log append and a non-durable commit, or with a durable commit (a checkpoint)
    /// when `checkpoint` asks for one, one is due, the group has [`Job::Exec`] writes,
    /// or the log cannot be appended to.
    fn commit_group(&mut self, jobs: Vec<Job>, checkpoint: bool) {
        let group = !jobs.is_empty();
        let mut durable = checkpoint
            || self.wal.needs_checkpoint(CHECKPOINT_BYTES, CHECKPOINT_AGE)
            || jobs.iter().any(|j| matches!(j, Job::Exec(_)));
        let mut replies: Vec<(Reply, Result<WriteOutcome, KvError>)> = Vec::new();
        let mut done: Vec<Done> = Vec::new();
        let mut changed: HashMap<String, NsChange> = HashMap::new();
        let mut frame = Vec::new();
        let mut appended = None;
        let mut jobs = jobs.into_iter();
        let outcome = (|| -> Result<(), KvError> {
            let mut wtx = self.db.begin_write()?;
            {
                let mut tables = Tables::open(&wtx)?;
                for job in jobs.by_ref() {
                    let log = (!durable).then_some(&mut frame);
                    match job {
                        Job::Write {
                            ns,
                            req,
                            batch,
                            reply,
                        } => {
                            let mut deleted = Vec::new();
                            let mut result =
                                self.execute(&mut tables, &ns, &req, batch, log, &mut deleted);
                            // Expired records the purger has not reached yet still
                            // count in the namespace's size: free them and try again.
                            if over_quota(&result) {
                                let log = (!durable).then_some(&mut frame);
                                match self.purge(&mut tables, &mut changed, log, usize::MAX) {
                                    Ok(true) => {
                                        let log = (!durable).then_some(&mut frame);
                                        deleted.clear();
                                        result = self.execute(
                                            &mut tables,
                                            &ns,
                                            &req,
                                            batch,
                                            log,
                                            &mut deleted,
                                        );
                                    }
                                    Ok(false) => {}
                                    Err(e) => {
                                        // Answered with the group's failure.
                                        replies.push((reply, result));
                                        return Err(e);
                                    }
                                }
                            }
                            if let Ok(o) = &result {
                                let c = changed.entry(ns).or_default();
                                c.version = o.version;
                                c.deleted.extend(deleted.drain(..).map(|k| (o.version, k)));
                            }
                            replies.push((reply, result));
                        }
                        Job::Purge => {
                            self.purge(&mut tables, &mut changed, log, PURGE_BATCH)?;
                        }
                        Job::Exec(f) => done.push(f(&wtx, &mut tables, &self.cipher)),
                    }
                }
            }
            if !durable && !frame.is_empty() {
                let mark = self.wal.mark();
                match self.wal.append(&frame) {
                    Ok(()) => appended = Some(mark),
                    Err(e) => {
                        tracing::warn!(
                            log = %self.wal.path().display(),
                            error = %e,
                            "cannot append to the KV write-ahead log; this group commits to the database directly"
                        );
                        durable = true;
                    }
                }
            }
            if durable {
                wtx.set_durability(Durability::Immediate)
                    .map_err(|e| KvError::Storage(e.to_string()))?;
                record_checkpoint(&wtx, self.wal.lsn())?;
            } else {
                wtx.set_durability(Durability::None)
                    .map_err(|e| KvError::Storage(e.to_string()))?;
            }
            wtx.commit()?;
            Ok(())
        })();
        if outcome.is_ok() && durable {
            self.wal.reset();
        }
        if outcome.is_err()
            && let Some(mark) = appended
            && let Err(e) = self.wal.undo(mark)
        {
            tracing::error!(
                log = %self.wal.path().display(),
                error = %e,
                "cannot take a failed group's frame back out of the KV write-ahead log: a restart may apply writes that were answered with an error"
            );
        }
        match outcome {
            Ok(()) => {
                if group {
                    self.stats.groups.fetch_add(1, Ordering::Relaxed);
                }
                let writes = replies.iter().filter(|(_, r)| r.is_ok()).count() as u64;
                self.stats.writes.fetch_add(writes, Ordering::Relaxed);
                if durable {
                    self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                }
                // Watchers first: once a write is answered, they know of it.
                let any = !changed.is_empty();
                for (ns, change) in changed {
                    self.watchers.notify(&ns, change);
                }
                if any {
                    self.changes.notify_one();
                }
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
                for d in done {
                    d(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "kv commit failed; the group's writes were not applied");
                self.check_usable();
                for (reply, _) in replies {
                    let _ = reply.send(Err(KvError::Storage(e.to_string())));
                }
                for d in done {
                    d(Err(e.to_string()));
                }
                // Jobs the failure came before (the transaction did not even begin).
                for job in jobs {
                    if let Job::Write { reply, .. } = job {
                        let _ = reply.send(Err(KvError::Storage(e.to_string())));
                    }
                    // An `Exec` dropped unrun: its caller gets `unanswered()`.
                }
            }
        }
    }

    fn is_broken(&self) -> bool {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// After a failed commit: whether the database still takes writes. redb refuses every
    /// transaction after an I/O error until it is reopened; the store then says so
    /// (readiness, status, every write) instead of failing each write alike.
    fn check_usable(&self) {
        if let Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) =
            self.db.begin_write()
        {
            let mut broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
            if broken.is_none() {
                let why = "the KV database hit an I/O error (a full disk?) and takes no more \
                           writes until the daemon restarts; acknowledged writes are safe"
                    .to_string();
                tracing::error!("{why}");
                *broken = Some(why);
            }
        }
    }

    /// Runs one request against `ns` and writes what it changed, also into `log` when
    /// the group goes to the write-ahead log.
    fn execute(
        &self,
        tables: &mut Tables<'_>,
        ns: &str,
        req: &BatchRequest,
        batch: bool,
        mut log: Option<&mut Vec<u8>>,
        deleted: &mut Vec<String>,
    ) -> Result<WriteOutcome, KvError> {
        let meta = tables
            .namespaces
            .get(ns)?
            .map(|v| v.value())
            .unwrap_or((0, 0, 0));
        let (version, bytes, keys) = meta;
        let mut backing = TableBacking {
            records: &mut tables.records,
            cipher: &self.cipher,
            ns,
        };
        let mut txn = NsTxn::new(&mut backing, now_ms(), version, bytes, self.limits);
        let results = txn.run(req, batch)?;
        if !txn.changed() {
            return Ok(WriteOutcome { version, results });
        }
        let new_version = txn.write_version();
        let new_bytes = txn.bytes();
        let new_keys = (keys as i64 + txn.key_delta()).max(0) as u64;
        let entries = std::mem::take(&mut txn.entries);
        drop(txn);
        for (key, entry) in entries.into_iter().filter(|(_, e)| e.dirty) {
            let key = key.as_str();
            if let Some(at) = entry.orig_expires {
                let set = false;
                write(tables, &mut log, Change::Expiry { at, ns, key, set })?;
            }
            let cur = entry.cur.as_ref();
            if cur.is_none() {
                deleted.push(key.to_string());
            }
            let blob = cur.map(|(rec, json)| self.cipher.seal(&aad(ns, key), &encode(rec, json)));
            let blob = blob.as_deref();
            write(tables, &mut log, Change::Record { ns, key, blob })?;
            if let Some(at) = cur.and_then(|(rec, _)| rec.expires_ms) {
                let set = true;
                write(tables, &mut log, Change::Expiry { at, ns, key, set })?;
            }
        }
        let meta = (new_version, new_bytes, new_keys);
        write(tables, &mut log, Change::Namespace { ns, meta })?;
        Ok(WriteOutcome {
            version: new_version,
            results,
        })
    }

    /// Deletes up to `limit` expired records and reports whether there were any.
    fn purge(
        &self,
        tables: &mut Tables<'_>,
        changed: &mut HashMap<String, NsChange>,
        mut log: Option<&mut Vec<u8>>,
        limit: usize,
    ) -> Result<bool, KvError> {
        let now = now_ms();
        let due: Vec<(u64, String, String)> = tables
            .expiry
            .range(..(now + 1, "", ""))?
            .take(limit)
            .map(|item| {
                item.map(|(k, _)| {
                    let (at, ns, key) = k.value();
                    (at, ns.to_string(), key.to_string())
                })
            })
            .collect::<Result<_, _>>()?;
        let any = !due.is_empty();
        // Per namespace: bytes and keys freed, and the keys with the version each was
        // written at (`None`: unreadable).
        type Gone = Vec<(Option<u64>, String)>;
        let mut freed: HashMap<String, (u64, u64, Gone)> = HashMap::new();
        for (at, ns, key) in due {
            let (ns, key) = (ns.as_str(), key.as_str());
            let c = Change::Expiry {
                at,
                ns,
                key,
                set: false,
            };
            write(tables, &mut log, c)?;
            let sealed = tables.records.get((ns, key))?.map(|b| b.value().to_vec());
            if let Some(sealed) = sealed {
                let len = sealed.len();
                let written = self
                    .cipher
                    .open(&aad(ns, key), &sealed)
                    .ok()
                    .and_then(|plain| Some(u64::from_le_bytes(plain.get(..8)?.try_into().ok()?)));
                write(
                    tables,
                    &mut log,
                    Change::Record {
                        ns,
                        key,
                        blob: None,
                    },
                )?;
                let json_len = len.saturating_sub(SEAL_OVERHEAD + HEADER_LEN);
                let f = freed.entry(ns.to_string()).or_default();
                f.0 += (key.len() + json_len) as u64;
                f.1 += 1;
                f.2.push((written, key.to_string()));
            }
        }
        for (ns, (bytes, keys, gone)) in freed {
            let (version, b, k) = tables
                .namespaces
                .get(ns.as_str())?
                .map(|v| v.value())
                .unwrap_or((0, 0, 0));
            let v = version + 1;
            let meta = (v, b.saturating_sub(bytes), k.saturating_sub(keys));
            write(tables, &mut log, Change::Namespace { ns: &ns, meta })?;
            let c = changed.entry(ns).or_default();
            c.version = v;
            // An expired key was last visible as of the version it was written at: a
            // watch that began after that never saw it go.
            c.deleted
                .extend(gone.into_iter().map(|(at, key)| (at.unwrap_or(v), key)));
        }
        Ok(any)
    }
}

/// Whether a write was refused for its namespace's quota.
fn over_quota(result: &Result<WriteOutcome, KvError>) -> bool {
    let mut e = match result {
        Err(e) => e,
        Ok(_) => return false,
    };
    while let KvError::Batch { source, .. } = e {
        e = source;
    }
    matches!(
        e,
        KvError::TooLarge {
            what: "namespace",
            ..
        }
    )
}

/// Makes `change` in the group's tables and, when the group goes to the write-ahead
/// log, records it in the group's frame.
fn write(
    tables: &mut Tables<'_>,
    log: &mut Option<&mut Vec<u8>>,
    change: Change<'_>,
) -> Result<(), KvError> {
    change.apply(tables)?;
    if let Some(frame) = log {
        change.encode(frame);
    }
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Make sure the writer is gone before the database closes.
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        self.stop_reader();
    }
}

/// The database file inside a state directory.
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("sandkeep.redb")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::ops::Op;
    use serde_json::json;

    fn store(dir: &Path, key: u8) -> Result<KvStore, KvError> {
        KvStore::open(StoreOptions {
            path: db_path(dir),
            cipher: Cipher::new(&[key; 32]),
            limits: Limits {
                max_value_bytes: 65536,
                max_namespace_bytes: 1 << 20,
            },
            queue_capacity: 1024,
        })
    }

    pub(super) type Gate =
        Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>;

    pub(super) fn pass_gate(gate: &Gate) {
        let held = gate.lock().unwrap().take();
        if let Some((entered, release)) = held {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_racing_stop_writes_is_refused_or_drained() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1).unwrap();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        *s.inner.send_gate.lock().unwrap() = Some((entered_tx, release_rx));
        let late = tokio::spawn({
            let s = s.clone();
            async move { s.write("ns", set("late", json!(1)), false).await }
        });
        // The write passed its first check of `accepting` and is about to queue.
        tokio::task::spawn_blocking(move || entered.recv().unwrap())
            .await
            .unwrap();
        // What the final export does: stop writes, drain, read.
        s.stop_writes();
        s.drain().await.unwrap();
        assert_eq!(s.get("ns", "late").await.unwrap(), None);
        release.send(()).unwrap();
        let result = late.await.unwrap();
        assert!(
            matches!(result, Err(KvError::ShuttingDown)),
            "a write acknowledged after the drain that the export followed: {result:?}"
        );
        assert_eq!(s.get("ns", "late").await.unwrap(), None);
        s.close();
    }

    fn set(key: &str, value: Value) -> BatchRequest {
        BatchRequest::single(Op::Set {
            key: key.into(),
            value: value.into(),
            nx: false,
            xx: false,
            if_version: None,
            ttl: None,
            keep_ttl: false,
            get: false,
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_persist_and_wrong_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(dir.path(), 1).unwrap();
            let o = s
                .write("ns", set("a", json!({"x": "plaintext-marker"})), false)
                .await
                .unwrap();
            assert_eq!(o.version, 1);
            s.close();
        }
        let raw = std::fs::read(db_path(dir.path())).unwrap();
        assert!(!raw.windows(16).any(|w| w == b"plaintext-marker"));
        assert!(store(dir.path(), 2).is_err(), "another key must be refused");
        let s = store(dir.path(), 1).unwrap();
        let rec = s.get("ns", "a").await.unwrap().unwrap();
        assert_eq!(rec.value, json!({"x": "plaintext-marker"}));
        assert_eq!(rec.version, 1);
        assert_eq!(s.ns_meta("ns").await.unwrap().keys, 1);
        assert_eq!(s.get("other", "a").await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_and_versions_are_dense() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.write("ns", set(&format!("k{i}"), json!(i)), false)
                    .await
                    .unwrap()
                    .version
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap());
        }
        versions.sort();
        assert_eq!(versions, (1..=200).collect::<Vec<_>>());
        let (keys, more, meta) = s.list("ns", "k1", None, 5).await.unwrap();
        assert_eq!(keys, vec!["k1", "k10", "k100", "k101", "k102"]);
        assert!(more);
        assert_eq!(meta.version, 200);
        let (keys, _, _) = s.list("ns", "k1", Some("k199".into()), 5).await.unwrap();
        assert!(keys.is_empty(), "{keys:?}");
    }

    fn del(key: &str) -> BatchRequest {
        BatchRequest::single(Op::Delete {
            key: key.into(),
            if_version: None,
            get: false,
        })
    }

    /// A first start whose disk was full left zero-filled files (no redb header, no log
    /// magic): the next start opens a new store instead of refusing them for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_a_failed_first_start_left_zero_filled_are_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_path(dir.path());
        std::fs::write(&db, vec![0u8; 8192]).unwrap();
        std::fs::write(wal_path(&db), vec![0u8; 1 << 20]).unwrap();
        let s = store(dir.path(), 1).unwrap();
        s.write("ns", set("k", json!(1)), false).await.unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap().unwrap().value, json!(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchers_learn_of_deletions_they_did_not_see() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1).unwrap();
        s.write("ns", set("gone-before", json!(1)), false)
            .await
            .unwrap();
        s.write("ns", del("gone-before"), false).await.unwrap();
        let _rx = s.subscribe("ns", 0);
        let since = s.ns_meta("ns").await.unwrap().version;
        assert!(!s.deleted_after("ns", "gone-before", since));
        // Created and deleted in two commits after `since`.
        s.write("ns", set("k", json!(1)), false).await.unwrap();
        s.write("ns", del("k"), false).await.unwrap();
        assert!(s.deleted_after("ns", "k", since));
        assert!(!s.deleted_after("ns", "k", since + 2));
        assert!(!s.deleted_after("ns", "other", since));
        assert!(!s.deleted_after("elsewhere", "k", 0));
        // Expired and purged counts as deleted.
        let mut req = set("t", json!(1));
        if let Op::Set { ttl, .. } = &mut req.ops[0] {
            *ttl = Some(crate::kv::Ttl(Duration::from_millis(1)));
        }
        let before_write = s.ns_meta("ns").await.unwrap().version;
        s.write("ns", req, false).await.unwrap();
        let before_purge = s.ns_meta("ns").await.unwrap().version;
        let stop = tokio_util::sync::CancellationToken::new();
        let purger = tokio::spawn(s.clone().run_purger(stop.clone()));
        let purged = async {
            while s.ns_meta("ns").await.unwrap().version == before_purge {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), purged)
            .await
            .expect("purged");
        stop.cancel();
        purger.await.unwrap();
        assert!(s.deleted_after("ns", "t", before_write));
        // A watch that began once it was written saw it (or saw it had expired).
        assert!(!s.deleted_after("ns", "t", before_purge));
        // Once more deletions came than are kept, any key may have been deleted.
        let since = s.ns_meta("ns").await.unwrap().version;
        for i in 0..=DELETIONS_KEPT {
            s.write("ns", set(&format!("x{i}"), json!(i)), false)
                .await
                .unwrap();
            s.write("ns", del(&format!("x{i}")), false).await.unwrap();
        }
        assert!(s.deleted_after("ns", "never-there", since));
        let recent = s.ns_meta("ns").await.unwrap().version - 2;
        assert!(!s.deleted_after("ns", "never-there", recent));
    }

    /// A store in `dir` that took one write (`a` = 1) and was closed, which checkpointed
    /// it: the LSN that checkpoint covers, and the payload of a log frame that makes
    /// `b` = `value` the namespace's second write, as the writer would log it.
    async fn second_write_frame(dir: &Path, value: &str) -> (u64, Vec<u8>) {
        {
            let s = store(dir, 1).unwrap();
            s.write("ns", set("a", json!(1)), false).await.unwrap();
            s.close();
        }
        let applied = {
            let db = Database::create(db_path(dir)).unwrap();
            checkpointed_lsn(&db.begin_read().unwrap()).unwrap()
        };
        let rec = Record {
            value: json!(value),
            version: 2,
            created_ms: 5,
            updated_ms: 5,
            expires_ms: None,
        };
        let json = serde_json::to_vec(&rec.value).unwrap();
        let blob = Cipher::new(&[1; 32]).seal(&aad("ns", "b"), &encode(&rec, &json));
        let mut frame = Vec::new();
        let blob = Some(blob.as_slice());
        Change::Record {
            ns: "ns",
            key: "b",
            blob,
        }
        .encode(&mut frame);
        // Key and value bytes of `a` (2) and `b`.
        let meta = (2, 2 + 1 + json.len() as u64, 2);
        Change::Namespace { ns: "ns", meta }.encode(&mut frame);
        (applied, frame)
    }

    /// The state a crash leaves: frames in the log that the database's last checkpoint
    /// does not cover, and a torn frame after them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_is_replayed_at_open_once() {
        let dir = tempfile::tempdir().unwrap();
        let (applied, frame) = second_write_frame(dir.path(), "from the log").await;
        assert!(applied >= 1, "closing checkpointed the first write");
        let path = wal_path(&db_path(dir.path()));
        let (mut log, pending) = Wal::open(&path, applied).unwrap();
        assert!(pending.frames.is_empty());
        log.append(&frame).unwrap();
        // A second frame that a crash cut short: only its header made it.
        log.append(b"never acknowledged").unwrap();
        drop(log);
        let torn_at = {
            let data = std::fs::read(&path).unwrap();
            let at = data
                .windows(b"never acknowledged".len())
                .position(|w| w == b"never acknowledged")
                .unwrap();
            at as u64
        };
        // The rest of its payload never reached the disk: the zeros the log was grown
        // with are there.
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
            &[0; 15],
            torn_at + 3,
        )
        .unwrap();

        let s = store(dir.path(), 1).unwrap();
        let b = s.get("ns", "b").await.unwrap().unwrap();
        assert_eq!(b.value, json!("from the log"));
        assert_eq!(b.version, 2);
        let meta = s.ns_meta("ns").await.unwrap();
        assert_eq!((meta.version, meta.keys), (2, 2));
        // Later writes continue from the replayed state, and the next open does not
        // apply the frame again over them.
        let o = s
            .write("ns", set("b", json!("newer")), false)
            .await
            .unwrap();
        assert_eq!(o.version, 3);
        s.close();
        drop(s);
        let s = store(dir.path(), 1).unwrap();
        assert_eq!(
            s.get("ns", "b").await.unwrap().unwrap().value,
            json!("newer")
        );
        assert_eq!(s.ns_meta("ns").await.unwrap().version, 3);
        assert_eq!(s.get("ns", "a").await.unwrap().unwrap().value, json!(1));
    }

    /// While the log cannot be appended to, groups commit durably to the database
    /// instead: every write is answered and kept, and none of them is in the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_go_to_the_database_while_the_log_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = wal_path(&db_path(dir.path()));
        let s = store(dir.path(), 1).unwrap();
        s.write("ns", set("before", json!(0)), false).await.unwrap();
        super::wal::tests::fail_appends(&path, true);
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.write("ns", set(&format!("failing-{i}"), json!(i)), false)
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().expect("answered from a durable commit");
        }
        // Durable already: in the database file, not only in redb's write buffer (key
        // names are stored in clear).
        let db_file = std::fs::read(db_path(dir.path())).unwrap();
        for i in 0..20 {
            let k = format!("failing-{i}");
            assert!(
                db_file.windows(k.len()).any(|w| w == k.as_bytes()),
                "{k} was answered but is not in the database file"
            );
        }
        super::wal::tests::fail_appends(&path, false);
        s.write("ns", set("after", json!(1)), false).await.unwrap();
        let log = std::fs::read(&path).unwrap();
        let has = |k: &str| log.windows(k.len()).any(|w| w == k.as_bytes());
        assert!(has("after"), "the log is used again");
        assert!(
            !has("failing-"),
            "writes during the failure went to the database"
        );
        s.close();
        drop(s);
        let s = store(dir.path(), 1).unwrap();
        for i in 0..20 {
            let k = format!("failing-{i}");
            assert_eq!(s.get("ns", &k).await.unwrap().unwrap().value, json!(i));
        }
        assert_eq!(s.ns_meta("ns").await.unwrap().version, 22);
    }

    /// A log an older build left (the first format, frames back to back) is replayed,
    /// then rewritten, and later writes go through it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_of_the_first_format_is_replayed_and_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let (applied, frame) = second_write_frame(dir.path(), "old format").await;
        let path = wal_path(&db_path(dir.path()));
        wal::tests::v1_log(&path, &[(applied + 1, &frame)]);

        let s = store(dir.path(), 1).unwrap();
        assert_eq!(
            s.get("ns", "b").await.unwrap().unwrap().value,
            json!("old format")
        );
        let o = s.write("ns", set("c", json!(3)), false).await.unwrap();
        assert_eq!(o.version, 3);
        // The write is a frame of the current format, not a database commit.
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..8], b"SKWAL\x00\x00\x02");
        assert_eq!(data[4096 + 8..4096 + 16], (applied + 2).to_le_bytes());
        s.close();
        drop(s);
        let s = store(dir.path(), 1).unwrap();
        assert_eq!(s.get("ns", "c").await.unwrap().unwrap().value, json!(3));
        assert_eq!(s.ns_meta("ns").await.unwrap().keys, 3);
    }

    /// A disk that fills up: redb refuses every transaction after its I/O error until it
    /// is reopened. Every write gets a storage error (not `shutting_down`), the store
    /// says it is broken, and a restart has every acknowledged write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_breaks_the_store_loudly_and_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1).unwrap();
        for i in 0..20 {
            s.write("ns", set(&format!("k{i}"), json!(i)), false)
                .await
                .unwrap();
        }
        assert_eq!(s.broken(), None);
        disk_full(&db_path(dir.path()), true);
        let big = json!("x".repeat(60_000));
        let mut refused = 0;
        for i in 0..20 {
            match s
                .write("ns", set(&format!("big{i}"), big.clone()), false)
                .await
            {
                Ok(_) => {}
                Err(KvError::Storage(_)) => refused += 1,
                Err(e) => panic!("write {i}: {e:?}"),
            }
        }
        assert!(refused > 0, "the full disk refused nothing");
        let why = s.broken().expect("the store says it is broken");
        assert!(why.contains("restart"), "{why}");
        // Space again: the database still needs a reopen, and says so.
        disk_full(&db_path(dir.path()), false);
        let err = s
            .write("ns", set("after", json!(1)), false)
            .await
            .unwrap_err();
        assert!(matches!(err, KvError::Storage(_)), "{err:?}");
        s.close();
        drop(s);
        let s = store(dir.path(), 1).unwrap();
        for i in 0..20 {
            let v = s.get("ns", &format!("k{i}")).await.unwrap().unwrap().value;
            assert_eq!(v, json!(i));
        }
        s.write("ns", set("after", json!(1)), false).await.unwrap();
    }

    /// Databases whose writes fail with ENOSPC.
    static FULL: crate::kv::Faults = crate::kv::Faults::new();

    fn disk_full(path: &Path, full: bool) {
        FULL.set(path, full);
    }

    /// The store's database, on a backend that [`disk_full`] can fill up.
    pub(super) fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = redb::backends::FileBackend::new(file)?;
        Database::builder().create_with_backend(FillingDisk {
            inner,
            path: path.to_path_buf(),
        })
    }

    #[derive(Debug)]
    struct FillingDisk {
        inner: redb::backends::FileBackend,
        path: PathBuf,
    }

    impl FillingDisk {
        fn check(&self) -> std::io::Result<()> {
            if FULL.on(&self.path) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FillingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    /// Removing the database file (to start afresh) leaves its log behind: the new
    /// database starts empty, without the old frames, and takes writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_without_its_database_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = wal_path(&db_path(dir.path()));
        {
            let s = store(dir.path(), 1).unwrap();
            s.write("ns", set("old", json!(1)), false).await.unwrap();
            s.close();
        }
        // Leave a frame in the log, as a crash would, then remove the database.
        {
            let (mut log, _) = Wal::open(&path, 0).unwrap();
            let mut frame = Vec::new();
            Change::Namespace {
                ns: "ns",
                meta: (9, 9, 9),
            }
            .encode(&mut frame);
            log.append(&frame).unwrap();
        }
        std::fs::remove_file(db_path(dir.path())).unwrap();
        let s = store(dir.path(), 1).unwrap();
        assert_eq!(s.get("ns", "old").await.unwrap(), None);
        assert_eq!(s.ns_meta("ns").await.unwrap(), NsMeta::default());
        let o = s.write("ns", set("new", json!(2)), false).await.unwrap();
        assert_eq!(o.version, 1);
        s.close();
        drop(s);
        let s = store(dir.path(), 1).unwrap();
        assert_eq!(s.get("ns", "new").await.unwrap().unwrap().value, json!(2));
    }

    /// Expired records count in the namespace's size only until they are purged; a
    /// write the quota would refuse purges them first, with no purger running.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quota_does_not_count_expired_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1).unwrap();
        let big = json!("x".repeat(60_000));
        let ops = |prefix: &str, ttl: Option<Duration>| BatchRequest {
            ops: (0..16)
                .map(|i| Op::Set {
                    key: format!("{prefix}{i}"),
                    value: big.clone().into(),
                    nx: false,
                    xx: false,
                    if_version: None,
                    ttl: ttl.map(crate::kv::Ttl),
                    keep_ttl: false,
                    get: false,
                })
                .collect(),
            ..BatchRequest::default()
        };
        let ttl = Some(Duration::from_millis(100));
        s.write("ns", ops("old", ttl), true).await.unwrap();
        s.write("other", ops("old", ttl), true).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Without the expired records the namespace is empty; with them, over.
        s.write("ns", ops("new", None), true).await.unwrap();
        s.write("ns", set("one-more", json!(1)), false)
            .await
            .unwrap();
        let meta = s.ns_meta("ns").await.unwrap();
        assert_eq!(meta.keys, 17);
        assert_eq!(s.ns_meta("other").await.unwrap().keys, 0);
        assert_eq!(s.next_expiry().await.unwrap(), None);
        // Over the quota with nothing expired: still refused.
        let e = s.write("ns", ops("more", None), true).await.unwrap_err();
        assert!(matches!(e, KvError::Batch { .. }), "{e:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purger_deletes_expired_and_frees_space() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 1).unwrap();
        let req = BatchRequest::single(Op::Set {
            key: "t".into(),
            value: json!("v").into(),
            nx: false,
            xx: false,
            if_version: None,
            ttl: Some(crate::kv::Ttl(Duration::from_millis(100))),
            keep_ttl: false,
            get: false,
        });
        s.write("ns", req, false).await.unwrap();
        s.write("ns", set("keep", json!(1)), false).await.unwrap();
        assert_eq!(s.ns_meta("ns").await.unwrap().keys, 2);
        let stop = tokio_util::sync::CancellationToken::new();
        let purger = tokio::spawn(s.clone().run_purger(stop.clone()));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(s.get("ns", "t").await.unwrap(), None, "invisible at once");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let meta = s.ns_meta("ns").await.unwrap();
        assert_eq!(meta.keys, 1);
        assert_eq!(meta.version, 3, "the purge is a write");
        assert_eq!(meta.bytes, 4 + 1);
        assert_eq!(s.next_expiry().await.unwrap(), None);
        stop.cancel();
        purger.await.unwrap();
    }
}
