//! Namespace exports: what replication uploads to `kv/<namespace>.kv` and a restore
//! imports into a new state directory.
//!
//! An export is the namespace's records with their versions, timestamps and expiry
//! times, as gzip-compressed JSON sealed with the store's key (AES-256-GCM, the
//! namespace bound as associated data so exports cannot be swapped), after a short
//! plaintext magic line. Never a copy of the redb file; no value is readable without
//! the key.

use std::io::{Read, Write};

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::crypto::Cipher;
use super::store::{self, NAMESPACES, RECORDS, Tables};
use super::{KvError, KvStore, Record, now_ms};

/// The first bytes of every export object.
pub const MAGIC: &[u8] = b"SANDKEEP-KV-EXPORT 1\n";
const AAD_PREFIX: &[u8] = b"sandkeep:kv-export\0";
/// The most an export's JSON takes: a namespace's quota plus overhead is far less. An
/// export is refused before it is written (no restore could read it), and an object
/// that would be larger is refused before it is read.
const MAX_PLAIN: u64 = 1 << 30;
/// The largest export object: [`MAX_PLAIN`] of JSON, compressed (deflate grows
/// incompressible data by a few bytes per 64 KiB block) and sealed.
pub const MAX_OBJECT: u64 = MAX_PLAIN + (1 << 20);

/// namespace → the version last exported (and known to be in remote storage).
const EXPORTED: TableDefinition<&str, u64> = TableDefinition::new("kv_exported");
/// The ETag remote storage gave the last export of each namespace: the next export is
/// written only over that object (a conditional write), never over another daemon's.
const EXPORTED_ETAG: TableDefinition<&str, &str> = TableDefinition::new("kv_exported_etag");

#[derive(Serialize, Deserialize)]
struct ExportBody {
    format: u32,
    namespace: String,
    version: u64,
    exported_at_ms: u64,
    /// The id of the database it was exported from ([`KvStore::id`]); absent in
    /// exports of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    records: Vec<ExportRecord>,
}

#[derive(Serialize, Deserialize)]
struct ExportRecord {
    key: String,
    version: u64,
    created_ms: u64,
    updated_ms: u64,
    expires_ms: Option<u64>,
    value: Box<RawValue>,
}

/// One namespace as read for (or from) an export.
#[derive(Debug)]
pub struct Export {
    pub namespace: String,
    pub version: u64,
    /// The sealed object.
    pub bytes: Vec<u8>,
    pub keys: usize,
}

fn aad(ns: &str) -> Vec<u8> {
    let mut a = AAD_PREFIX.to_vec();
    a.extend_from_slice(ns.as_bytes());
    a
}

fn bad(what: impl std::fmt::Display) -> KvError {
    KvError::Storage(format!("kv export: {what}"))
}

/// Seals a namespace's body.
fn seal(cipher: &Cipher, body: &ExportBody) -> Result<Vec<u8>, KvError> {
    let json = serde_json::to_vec(body).map_err(bad)?;
    if json.len() as u64 > MAX_PLAIN {
        return Err(bad(format_args!(
            "namespace `{}` would take {} bytes, more than the {MAX_PLAIN} a restore reads",
            body.namespace,
            json.len()
        )));
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json).map_err(bad)?;
    let packed = gz.finish().map_err(bad)?;
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&cipher.seal(&aad(&body.namespace), &packed));
    Ok(out)
}

/// Opens an export of `ns` (the name its object key gives) and checks what it holds;
/// the error says why it cannot be read.
fn open(cipher: &Cipher, ns: &str, bytes: &[u8]) -> Result<ExportBody, String> {
    let sealed = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| format!("`{ns}` is not a sandkeep kv export"))?;
    let packed = cipher.open(&aad(ns), sealed).map_err(|_| {
        format!("`{ns}` cannot be decrypted: it was written with another kv key, or it is damaged")
    })?;
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(packed.as_slice())
        .take(MAX_PLAIN + 1)
        .read_to_end(&mut json)
        .map_err(|e| format!("`{ns}`: {e}"))?;
    if json.len() as u64 > MAX_PLAIN {
        return Err(format!(
            "`{ns}` holds more than the {MAX_PLAIN} bytes an export takes"
        ));
    }
    let body: ExportBody = serde_json::from_slice(&json).map_err(|e| format!("`{ns}`: {e}"))?;
    if body.namespace != ns {
        return Err(format!("`{ns}` holds namespace `{}`", body.namespace));
    }
    for r in &body.records {
        super::validate::key(&r.key).map_err(|e| format!("`{ns}`: {e}"))?;
    }
    Ok(body)
}

/// Decrypts an export and tells what it holds (for tests and tools).
pub fn inspect(cipher: &Cipher, ns: &str, bytes: &[u8]) -> Result<(u64, usize), KvError> {
    let body = open(cipher, ns, bytes).map_err(bad)?;
    Ok((body.version, body.records.len()))
}

/// What [`KvStore::import`] did with an export.
#[derive(Debug, PartialEq, Eq)]
pub enum Imported {
    /// The namespace was new here and now holds the export's keys (this many).
    Keys(usize),
    /// The namespace exists here already (a restore that was cut short imported it);
    /// it was left as it is.
    AlreadyHere,
    /// The export cannot be read: not an export, sealed with another KV key, damaged,
    /// or holding an invalid key. Nothing was stored.
    Unreadable(String),
}

impl KvStore {
    /// Namespaces whose current version is not the one last exported, with that
    /// version.
    pub async fn exports_due(&self) -> Result<Vec<(String, u64)>, KvError> {
        Ok(self
            .export_versions()
            .await?
            .into_iter()
            .filter(|(_, version, last)| *last != Some(*version))
            .map(|(ns, version, _)| (ns, version))
            .collect())
    }

    /// Namespaces whose current version is in remote storage (unless someone deleted
    /// its export since).
    pub async fn exports_current(&self) -> Result<Vec<String>, KvError> {
        Ok(self
            .export_versions()
            .await?
            .into_iter()
            .filter(|(_, version, last)| *last == Some(*version))
            .map(|(ns, ..)| ns)
            .collect())
    }

    /// Each namespace with its current version and the version last exported.
    async fn export_versions(&self) -> Result<Vec<(String, u64, Option<u64>)>, KvError> {
        self.read_txn(|rtx, _| {
            let namespaces = match rtx.open_table(NAMESPACES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
                Err(e) => return Err(e.into()),
            };
            let exported = match rtx.open_table(EXPORTED) {
                Ok(t) => Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for item in namespaces.iter()? {
                let (ns, meta) = item?;
                let (version, _, _) = meta.value();
                let last = match &exported {
                    Some(t) => t.get(ns.value())?.map(|v| v.value()),
                    None => None,
                };
                out.push((ns.value().to_string(), version, last));
            }
            Ok(out)
        })
        .await
    }

    /// The sealed export of `ns` as it is now (expired records left out).
    pub async fn export(&self, ns: &str) -> Result<Export, KvError> {
        let ns = ns.to_string();
        let store = self.id().to_string();
        self.read_txn(move |rtx, cipher| {
            let version = match rtx.open_table(NAMESPACES) {
                Ok(t) => t.get(ns.as_str())?.map_or(0, |v| v.value().0),
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(e.into()),
            };
            let now = now_ms();
            let mut records = Vec::new();
            match rtx.open_table(RECORDS) {
                Ok(table) => {
                    for item in table.range((ns.as_str(), "")..)? {
                        let (k, v) = item?;
                        let (kns, key) = k.value();
                        if kns != ns {
                            break;
                        }
                        let loaded = store::open_record(cipher, &ns, key, v.value())?;
                        if loaded.record.is_expired(now) {
                            continue;
                        }
                        let (r, value) = loaded.into_raw()?;
                        records.push(ExportRecord {
                            key: key.to_string(),
                            version: r.version,
                            created_ms: r.created_ms,
                            updated_ms: r.updated_ms,
                            expires_ms: r.expires_ms,
                            value,
                        });
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let keys = records.len();
            let body = ExportBody {
                format: 1,
                namespace: ns.clone(),
                version,
                exported_at_ms: now,
                store: Some(store),
                records,
            };
            Ok(Export {
                bytes: seal(cipher, &body)?,
                namespace: ns,
                version,
                keys,
            })
        })
        .await
    }

    /// Records that version `version` of `ns` is in remote storage, as the object
    /// with `etag`.
    pub async fn mark_exported(&self, ns: &str, version: u64, etag: &str) -> Result<(), KvError> {
        let (ns, etag) = (ns.to_string(), etag.to_string());
        self.exec(true, move |wtx, _, _| {
            wtx.open_table(EXPORTED)?.insert(ns.as_str(), version)?;
            wtx.open_table(EXPORTED_ETAG)?
                .insert(ns.as_str(), etag.as_str())?;
            Ok(())
        })
        .await
    }

    /// The version of `ns` last exported, and the ETag of that object when known.
    pub async fn last_export(&self, ns: &str) -> Result<(Option<u64>, Option<String>), KvError> {
        let ns = ns.to_string();
        self.read_txn(move |rtx, _| {
            let version = match rtx.open_table(EXPORTED) {
                Ok(t) => t.get(ns.as_str())?.map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let etag = match rtx.open_table(EXPORTED_ETAG) {
                Ok(t) => t.get(ns.as_str())?.map(|v| v.value().to_string()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            Ok((version, etag))
        })
        .await
    }

    /// The namespace version an export of `ns` holds, and whether it was exported
    /// from this database.
    pub fn export_origin(&self, ns: &str, bytes: &[u8]) -> Result<(u64, bool), String> {
        open(&self.cipher(), ns, bytes)
            .map(|body| (body.version, body.store.as_deref() == Some(self.id())))
    }

    /// Imports the export `bytes` of `ns` into a namespace that holds nothing yet:
    /// values, versions, timestamps and expiry times as they were. Records that expired
    /// meanwhile are left out. An error is a local storage failure (worth retrying); an
    /// export that cannot be read is [`Imported::Unreadable`].
    pub async fn import(&self, ns: &str, bytes: &[u8]) -> Result<Imported, KvError> {
        self.import_export(ns, bytes, None).await
    }

    /// Replaces what this store holds of `ns` with the export `bytes` (the object with
    /// `etag`): another daemon exported the namespace since this one last did, and the
    /// conversation's state is what the owner wrote. Local changes since this store's
    /// last export are dropped.
    pub async fn replace_with_export(
        &self,
        ns: &str,
        bytes: &[u8],
        etag: &str,
    ) -> Result<Imported, KvError> {
        self.import_export(ns, bytes, Some(etag.to_string())).await
    }

    /// [`import`](Self::import), or with `replacing` (the export's ETag)
    /// [`replace_with_export`](Self::replace_with_export).
    async fn import_export(
        &self,
        ns: &str,
        bytes: &[u8],
        replacing: Option<String>,
    ) -> Result<Imported, KvError> {
        super::validate::namespace(ns)?;
        let body = match open(&self.cipher(), ns, bytes) {
            Ok(body) => body,
            Err(why) => return Ok(Imported::Unreadable(why)),
        };
        let ns = ns.to_string();
        self.exec(true, move |wtx, tables: &mut Tables<'_>, cipher| {
            if let Some(etag) = &replacing {
                let mut keys: Vec<String> = Vec::new();
                for item in tables.records.range((ns.as_str(), "")..)? {
                    let (k, _) = item?;
                    let (n, key) = k.value();
                    if n != ns.as_str() {
                        break;
                    }
                    keys.push(key.to_string());
                }
                for key in &keys {
                    tables.records.remove((ns.as_str(), key.as_str()))?;
                }
                tables.expiry.retain(|(_, n, _), ()| n != ns.as_str())?;
                tables.namespaces.remove(ns.as_str())?;
                wtx.open_table(EXPORTED_ETAG)?
                    .insert(ns.as_str(), etag.as_str())?;
            } else if tables.namespaces.get(ns.as_str())?.is_some() {
                return Ok(Imported::AlreadyHere);
            }
            let now = now_ms();
            let (mut bytes, mut keys) = (0u64, 0u64);
            for r in &body.records {
                if r.expires_ms.is_some_and(|e| e <= now) {
                    continue;
                }
                let json = r.value.get().as_bytes();
                let record = Record {
                    value: serde_json::Value::Null,
                    version: r.version,
                    created_ms: r.created_ms,
                    updated_ms: r.updated_ms,
                    expires_ms: r.expires_ms,
                };
                let blob = cipher.seal(&store::aad(&ns, &r.key), &store::encode(&record, json));
                tables
                    .records
                    .insert((ns.as_str(), r.key.as_str()), blob.as_slice())?;
                if let Some(at) = r.expires_ms {
                    tables
                        .expiry
                        .insert((at, ns.as_str(), r.key.as_str()), ())?;
                }
                bytes += (r.key.len() + json.len()) as u64;
                keys += 1;
            }
            tables
                .namespaces
                .insert(ns.as_str(), (body.version, bytes, keys))?;
            wtx.open_table(EXPORTED)?
                .insert(ns.as_str(), body.version)?;
            Ok(Imported::Keys(keys as usize))
        })
        .await
    }
}

/// The namespace an object key `.../kv/<namespace>.kv` names.
pub fn namespace_of(key: &str, kv_prefix: &str) -> Option<String> {
    let name = key.strip_prefix(kv_prefix)?.strip_suffix(".kv")?;
    super::validate::namespace(name).ok()?;
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::ops::{Limits, Op, Ttl};
    use crate::kv::{BatchRequest, StoreOptions};
    use serde_json::json;
    use std::time::Duration;

    fn options(dir: &std::path::Path, name: &str) -> StoreOptions {
        StoreOptions {
            path: dir.join(name),
            cipher: Cipher::new(&[3; 32]),
            limits: Limits {
                max_value_bytes: 1 << 16,
                max_namespace_bytes: 1 << 24,
            },
            queue_capacity: 64,
        }
    }

    fn store(dir: &std::path::Path, name: &str) -> KvStore {
        KvStore::open(options(dir, name)).unwrap()
    }

    fn set(key: &str, value: serde_json::Value, ttl: Option<Duration>) -> BatchRequest {
        BatchRequest::single(Op::Set {
            key: key.into(),
            value: value.into(),
            nx: false,
            xx: false,
            if_version: None,
            ttl: ttl.map(Ttl),
            keep_ttl: false,
            get: false,
        })
    }

    #[tokio::test]
    async fn export_and_import_keep_records_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let a = store(tmp.path(), "a.redb");
        a.write("ns", set("k1", json!({"x": [1, 2]}), None), false)
            .await
            .unwrap();
        a.write("ns", set("k1", json!("v2"), None), false)
            .await
            .unwrap();
        a.write(
            "ns",
            set("ttl", json!(1), Some(Duration::from_secs(3600))),
            false,
        )
        .await
        .unwrap();
        a.write(
            "ns",
            set("short", json!(1), Some(Duration::from_millis(1))),
            false,
        )
        .await
        .unwrap();
        a.write("other", set("o", json!(true), None), false)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let due = a.exports_due().await.unwrap();
        assert_eq!(due.len(), 2);
        let export = a.export("ns").await.unwrap();
        assert_eq!((export.version, export.keys), (4, 2)); // `short` expired
        a.mark_exported("ns", export.version, "etag").await.unwrap();
        assert_eq!(a.exports_due().await.unwrap(), vec![("other".into(), 1)]);
        assert!(!export.bytes.windows(2).any(|w| w == b"v2"));

        let b = store(tmp.path(), "b.redb");
        assert_eq!(
            b.import("ns", &export.bytes).await.unwrap(),
            Imported::Keys(2)
        );
        for key in ["k1", "ttl"] {
            assert_eq!(
                a.get("ns", key).await.unwrap(),
                b.get("ns", key).await.unwrap()
            );
        }
        let (ma, mb) = (
            a.ns_meta("ns").await.unwrap(),
            b.ns_meta("ns").await.unwrap(),
        );
        assert_eq!((mb.version, mb.keys), (ma.version, 2));
        // Imported is exported: nothing due.
        assert!(b.exports_due().await.unwrap().is_empty());
        // Not over an existing namespace, not under another name, not with another key.
        assert_eq!(
            b.import("ns", &export.bytes).await.unwrap(),
            Imported::AlreadyHere
        );
        assert!(matches!(
            b.import("ns2", &export.bytes).await.unwrap(),
            Imported::Unreadable(_)
        ));
        let c = KvStore::open(StoreOptions {
            cipher: Cipher::new(&[4; 32]),
            ..options(tmp.path(), "c.redb")
        })
        .unwrap();
        assert!(matches!(
            c.import("ns", &export.bytes).await.unwrap(),
            Imported::Unreadable(why) if why.contains("cannot be decrypted")
        ));
        assert_eq!(c.ns_meta("ns").await.unwrap().version, 0, "nothing stored");
        assert!(inspect(&Cipher::new(&[4; 32]), "ns", &export.bytes).is_err());
        assert!(inspect(&Cipher::new(&[3; 32]), "ns", b"garbage").is_err());
    }
}
