//! What each KV operation does, staged in memory.
//!
//! A request (one route call, or one batch) runs against an [`NsTxn`]: an overlay over
//! the stored records of one namespace. Operations read and write the overlay only, so
//! when one fails the overlay is dropped and nothing changed; when all succeed the
//! store flushes the overlay into the redb transaction. Every write of one request gets
//! the same new namespace version.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::jsonpath::JsonPath;
use super::validate::{self, MAX_DEPTH};
use super::{KvError, Record};

/// Longest TTL accepted: 100 years.
const MAX_TTL_SECS: f64 = 100.0 * 365.0 * 86_400.0;
/// Most operations in one batch.
pub const MAX_BATCH_OPS: usize = 100;

/// A time to live, parsed from seconds (integer or fraction), strictly positive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttl(pub Duration);

impl Ttl {
    pub fn from_secs_f64(secs: f64, name: &str) -> Result<Self, KvError> {
        // Below a millisecond (the deadlines' unit) a TTL would expire at once: more
        // likely a unit mistake than a wish, as Redis refuses `PX 0`.
        if !(0.001..=MAX_TTL_SECS).contains(&secs) {
            return Err(KvError::InvalidParam(format!(
                "`{name}` must be a number of seconds from 0.001 (1 ms) to 100 years"
            )));
        }
        Ok(Self(Duration::from_secs_f64(secs)))
    }

    pub fn parse_str(s: &str, name: &str) -> Result<Self, KvError> {
        let secs: f64 = s.parse().map_err(|_| {
            KvError::InvalidParam(format!("`{name}` must be a number of seconds, got `{s}`"))
        })?;
        Self::from_secs_f64(secs, name)
    }

    /// A JSON ttl: a positive number; `allow_clear` lets 0 or null mean "no TTL".
    pub fn from_json(v: &Value, allow_clear: bool) -> Result<Option<Self>, KvError> {
        match v {
            Value::Null if allow_clear => Ok(None),
            Value::Number(n) => {
                let secs = n.as_f64().unwrap_or(f64::NAN);
                if allow_clear && secs == 0.0 {
                    Ok(None)
                } else {
                    Self::from_secs_f64(secs, "ttl").map(Some)
                }
            }
            _ => Err(KvError::InvalidParam(
                "`ttl` must be a number of seconds".into(),
            )),
        }
    }

    fn deadline(self, now_ms: u64) -> u64 {
        now_ms
            .saturating_add(self.0.as_millis() as u64)
            .max(now_ms + 1)
    }
}

/// A value a `set` stores, with its serialized form. The form is made where the
/// request is parsed, on the executor's threads, not on the single writer thread
/// that every write goes through (serializing a 64 KiB string is most of a big
/// write's work there).
#[derive(Clone, Debug)]
pub struct NewValue {
    value: Value,
    /// `None` if it could not be serialized (a `Value`'s can always be): the writer
    /// then tries again and answers with the error.
    json: Option<Vec<u8>>,
}

impl NewValue {
    pub fn new(value: Value) -> Self {
        let json = serde_json::to_vec(&value).ok();
        NewValue { value, json }
    }
}

impl From<Value> for NewValue {
    fn from(value: Value) -> Self {
        NewValue::new(value)
    }
}

/// One operation on one key, as a route or a batch entry asks for it.
#[derive(Clone, Debug)]
pub enum Op {
    Get {
        key: String,
        path: Option<(JsonPath, String)>,
        meta: bool,
    },
    Set {
        key: String,
        value: NewValue,
        nx: bool,
        xx: bool,
        if_version: Option<u64>,
        ttl: Option<Ttl>,
        keep_ttl: bool,
        get: bool,
    },
    Patch {
        key: String,
        path: Option<(JsonPath, String)>,
        value: Value,
        if_version: Option<u64>,
    },
    Delete {
        key: String,
        if_version: Option<u64>,
        get: bool,
    },
    Incr {
        key: String,
        /// What is added: a DECR's `by` negated, so from -2^63 to 2^63 (a DECR by
        /// i64::MIN of a negative value fits).
        by: i128,
    },
    Push {
        key: String,
        front: bool,
        values: Vec<Value>,
    },
    Pop {
        key: String,
        front: bool,
        count: Option<usize>,
    },
    Expire {
        key: String,
        ttl: Option<Ttl>,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Get { key, .. }
            | Op::Set { key, .. }
            | Op::Patch { key, .. }
            | Op::Delete { key, .. }
            | Op::Incr { key, .. }
            | Op::Push { key, .. }
            | Op::Pop { key, .. }
            | Op::Expire { key, .. } => key,
        }
    }

    /// The name used in metrics and batch bodies.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Get { .. } => "get",
            Op::Set { .. } => "set",
            Op::Patch { .. } => "patch",
            Op::Delete { .. } => "delete",
            Op::Incr { by, .. } if *by < 0 => "decr",
            Op::Incr { .. } => "incr",
            Op::Push { front: true, .. } => "lpush",
            Op::Push { .. } => "rpush",
            Op::Pop { front: true, .. } => "lpop",
            Op::Pop { .. } => "rpop",
            Op::Expire { .. } => "expire",
        }
    }
}

/// The body of `GET /v1/kv/{key}` (and of a batch `get`): the value, or the part of it
/// at `path`; with `namespace_version`, the meta fields too.
pub fn get_body(
    key: &str,
    rec: &Record,
    path: Option<&(JsonPath, String)>,
    namespace_version: Option<u64>,
) -> Result<Value, KvError> {
    let value = match path {
        Some((p, text)) => p
            .get(&rec.value)
            .cloned()
            .ok_or_else(|| KvError::PathNotFound(text.clone()))?,
        None => rec.value.clone(),
    };
    let mut body = Map::new();
    body.insert("key".into(), key.into());
    body.insert("value".into(), value);
    if let Some(v) = namespace_version {
        rec.meta_into(&mut body);
        body.insert("namespace_version".into(), v.into());
    }
    Ok(Value::Object(body))
}

/// The body of a GET without `path`, as [`get_body`] makes it, but with the value
/// copied in as stored: not parsed and serialized again, which for a large value is
/// most of what a read costs.
#[derive(Serialize)]
pub struct StoredBody<'a> {
    key: &'a str,
    value: Box<RawValue>,
    #[serde(flatten)]
    meta: Map<String, Value>,
}

impl<'a> StoredBody<'a> {
    pub fn new(
        key: &'a str,
        loaded: Loaded,
        namespace_version: Option<u64>,
    ) -> Result<Self, KvError> {
        let (record, value) = loaded.into_raw()?;
        let mut meta = Map::new();
        if let Some(v) = namespace_version {
            record.meta_into(&mut meta);
            meta.insert("namespace_version".into(), v.into());
        }
        Ok(Self { key, value, meta })
    }
}

/// Checks `if_version` against a key's version (absent: 0).
fn check_version(key: &str, if_version: Option<u64>, actual: u64) -> Result<(), KvError> {
    match if_version {
        Some(expected) if expected != actual => Err(KvError::VersionMismatch {
            key: Some(key.to_string()),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

/// Parses a `path` parameter, keeping its text for messages.
pub fn parse_path(path: Option<&str>) -> Result<Option<(JsonPath, String)>, KvError> {
    path.map(|p| Ok((JsonPath::parse(p)?, p.to_string())))
        .transpose()
}

/// `by` for incr/decr: a signed 64-bit integer; what is added (negated for a decr).
pub fn parse_by(v: Option<&Value>, negate: bool) -> Result<i128, KvError> {
    let by = match v {
        None | Some(Value::Null) => 1,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| KvError::InvalidParam("`by` must be a signed 64-bit integer".into()))?,
        Some(_) => {
            return Err(KvError::InvalidParam(
                "`by` must be a signed 64-bit integer".into(),
            ));
        }
    };
    let by = i128::from(by);
    Ok(if negate { -by } else { by })
}

/// Values to push: exactly one of `value` / `values` (non-empty).
pub fn push_values(value: Option<Value>, values: Option<Value>) -> Result<Vec<Value>, KvError> {
    match (value, values) {
        (Some(v), None) => Ok(vec![v]),
        (None, Some(Value::Array(vs))) if !vs.is_empty() => Ok(vs),
        (None, Some(_)) => Err(KvError::InvalidParam(
            "`values` must be a non-empty array".into(),
        )),
        _ => Err(KvError::InvalidParam(
            "give exactly one of `value` or `values`".into(),
        )),
    }
}

/// `count` for pops: a non-negative integer.
pub fn parse_count(v: Option<&Value>) -> Result<Option<usize>, KvError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|c| Some(c.min(usize::MAX as u64) as usize))
            .ok_or_else(|| KvError::InvalidParam("`count` must be a non-negative integer".into())),
        Some(_) => Err(KvError::InvalidParam(
            "`count` must be a non-negative integer".into(),
        )),
    }
}

/// A batch as posted to `/v1/kv/batch`.
#[derive(Clone, Debug, Default)]
pub struct BatchRequest {
    pub if_version: Option<u64>,
    pub checks: Vec<(String, u64)>,
    pub ops: Vec<Op>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// An explicit `null` taken as the field left out, as the other optional fields are.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    if_version: Option<u64>,
    #[serde(default, deserialize_with = "null_as_default")]
    checks: Vec<RawCheck>,
    operations: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    key: String,
    version: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOp {
    op: String,
    key: String,
    #[serde(default, deserialize_with = "present")]
    value: Option<Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    values: Option<Value>,
    by: Option<Value>,
    path: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    nx: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    xx: bool,
    #[serde(default, deserialize_with = "present")]
    ttl: Option<Value>,
    count: Option<Value>,
    if_version: Option<u64>,
    #[serde(default, deserialize_with = "null_as_default")]
    keep_ttl: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    get: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    meta: bool,
}

/// Refuses a body that parsed but is not a JSON object (serde fills a struct from an
/// array by position). Called after a successful parse, so that malformed JSON keeps
/// the parser's own error.
pub fn require_object(body: &[u8]) -> Result<(), KvError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => Ok(()),
        Some(_) => Err(KvError::InvalidParam(
            "the body must be a JSON object".into(),
        )),
    }
}

impl BatchRequest {
    /// Parses and validates a batch body; errors in operation `i` carry `index: i`.
    pub fn parse(body: &[u8]) -> Result<Self, KvError> {
        let raw: RawBatch = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                // Not serde's "expected struct RawBatch" for an array.
                require_object(body)
                    .err()
                    .unwrap_or_else(|| KvError::InvalidParam(format!("batch body: {e}")))
            } else {
                validate::json_error(e)
            }
        })?;
        require_object(body)?;
        if raw.operations.len() > MAX_BATCH_OPS {
            return Err(KvError::InvalidParam(format!(
                "a batch holds at most {MAX_BATCH_OPS} operations, got {}",
                raw.operations.len()
            )));
        }
        let mut checks = Vec::with_capacity(raw.checks.len());
        for c in raw.checks {
            validate::key(&c.key)?;
            checks.push((c.key, c.version));
        }
        let ops = raw
            .operations
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse_op(v).map_err(|e| e.at(i)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            if_version: raw.if_version,
            checks,
            ops,
        })
    }

    pub fn single(op: Op) -> Self {
        Self {
            ops: vec![op],
            ..Self::default()
        }
    }
}

/// The fields each batch operation takes besides `op` and `key`: those of its
/// single-key route. Any other field is refused, so that a misplaced `if_version` cannot
/// make a conditional write a blind one.
fn op_fields(op: &str) -> Option<&'static [&'static str]> {
    Some(match op {
        "get" => &["path", "meta"],
        "set" => &["value", "nx", "xx", "if_version", "ttl", "keep_ttl", "get"],
        "patch" => &["value", "path", "if_version"],
        "delete" => &["if_version", "get"],
        "incr" | "decr" => &["by"],
        "lpush" | "rpush" => &["value", "values"],
        "lpop" | "rpop" => &["count"],
        "expire" => &["ttl"],
        _ => return None,
    })
}

fn parse_op(v: Value) -> Result<Op, KvError> {
    if !v.is_object() {
        return Err(KvError::InvalidParam(
            "an operation must be a JSON object".into(),
        ));
    }
    if let Value::Object(m) = &v
        && let Some(Value::String(op)) = m.get("op")
        && let Some(fields) = op_fields(op)
        && let Some(k) = m
            .keys()
            .find(|k| !matches!(k.as_str(), "op" | "key") && !fields.contains(&k.as_str()))
    {
        return Err(KvError::InvalidParam(format!(
            "`{op}` takes no `{k}` (it takes {})",
            fields
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let raw: RawOp =
        serde_json::from_value(v).map_err(|e| KvError::InvalidParam(format!("operation: {e}")))?;
    validate::key(&raw.key)?;
    let need_value = |v: Option<Value>| {
        v.ok_or_else(|| KvError::InvalidParam(format!("`{}` needs a `value`", raw.op)))
    };
    let key = raw.key.clone();
    Ok(match raw.op.as_str() {
        "get" => Op::Get {
            key,
            path: parse_path(raw.path.as_deref())?,
            meta: raw.meta,
        },
        "set" => {
            if raw.nx && raw.xx {
                return Err(KvError::InvalidParam(
                    "`nx` and `xx` exclude each other".into(),
                ));
            }
            // `null` is no TTL here (only `expire` clears one with it).
            let ttl = raw.ttl.filter(|t| !t.is_null());
            if ttl.is_some() && raw.keep_ttl {
                return Err(KvError::InvalidParam(
                    "`ttl` and `keep_ttl` exclude each other".into(),
                ));
            }
            Op::Set {
                key,
                value: NewValue::new(need_value(raw.value)?),
                nx: raw.nx,
                xx: raw.xx,
                if_version: raw.if_version,
                ttl: ttl
                    .as_ref()
                    .map(|t| Ttl::from_json(t, false))
                    .transpose()?
                    .flatten(),
                keep_ttl: raw.keep_ttl,
                get: raw.get,
            }
        }
        "patch" => Op::Patch {
            key,
            path: parse_path(raw.path.as_deref())?,
            value: need_value(raw.value)?,
            if_version: raw.if_version,
        },
        "delete" => Op::Delete {
            key,
            if_version: raw.if_version,
            get: raw.get,
        },
        "incr" | "decr" => Op::Incr {
            key,
            by: parse_by(raw.by.as_ref(), raw.op == "decr")?,
        },
        "lpush" | "rpush" => Op::Push {
            key,
            front: raw.op == "lpush",
            values: push_values(raw.value, raw.values)?,
        },
        "lpop" | "rpop" => Op::Pop {
            key,
            front: raw.op == "lpop",
            count: parse_count(raw.count.as_ref())?,
        },
        "expire" => Op::Expire {
            key,
            ttl: match raw.ttl {
                Some(t) => Ttl::from_json(&t, true)?,
                None => {
                    return Err(KvError::InvalidParam("`expire` needs a `ttl`".into()));
                }
            },
        },
        other => {
            return Err(KvError::InvalidParam(format!(
                "unknown op `{other}` (get, set, delete, patch, incr, decr, lpush, rpush, lpop, rpop, expire)"
            )));
        }
    })
}

/// Size limits enforced on every write.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_value_bytes: u64,
    pub max_namespace_bytes: u64,
}

/// A record as loaded from storage, expired or not, with its serialized value (whose
/// length plus the key's is what the record counts for in the namespace's size).
pub struct Loaded {
    pub record: Record,
    pub json: Vec<u8>,
    /// Whether `record.value` holds the value: a loader may leave it `Null` and the
    /// JSON unparsed until an operation needs the value (a `set` does not).
    pub parsed: bool,
}

impl Loaded {
    /// The record and its value as stored, whole, for an answer or an export that
    /// carries it without parsing it.
    pub fn into_raw(self) -> Result<(Record, Box<RawValue>), KvError> {
        let bad = |e: &dyn std::fmt::Display| KvError::Storage(format!("record value: {e}"));
        let json = String::from_utf8(self.json).map_err(|e| bad(&e))?;
        let value = RawValue::from_string(json).map_err(|e| bad(&e))?;
        Ok((self.record, value))
    }
}

/// Where an [`NsTxn`] reads records it has not touched yet.
pub trait Backing {
    fn load(&mut self, key: &str) -> Result<Option<Loaded>, KvError>;
}

/// One staged key: what storage held and what the request made of it.
pub struct Entry {
    pub orig_size: u64,
    pub orig_present: bool,
    pub orig_expires: Option<u64>,
    /// The visible record now, with its serialized value.
    pub cur: Option<(Record, Vec<u8>)>,
    /// Whether `cur`'s value is parsed (see [`Loaded::parsed`]).
    parsed: bool,
    pub dirty: bool,
}

impl Entry {
    fn cur_size(&self, key: &str) -> u64 {
        self.cur
            .as_ref()
            .map_or(0, |(_, json)| (key.len() + json.len()) as u64)
    }
    fn byte_delta(&self, key: &str) -> i64 {
        if self.dirty {
            self.cur_size(key) as i64 - self.orig_size as i64
        } else {
            0
        }
    }
    fn key_delta(&self) -> i64 {
        if self.dirty {
            self.cur.is_some() as i64 - self.orig_present as i64
        } else {
            0
        }
    }
}

/// The staged state of one namespace during one request.
pub struct NsTxn<'b, B: Backing> {
    backing: &'b mut B,
    pub now_ms: u64,
    /// The namespace version before this request.
    pub base_version: u64,
    base_bytes: u64,
    pub entries: BTreeMap<String, Entry>,
    byte_delta: i64,
    key_delta: i64,
    limits: Limits,
}

impl<'b, B: Backing> NsTxn<'b, B> {
    pub fn new(
        backing: &'b mut B,
        now_ms: u64,
        base_version: u64,
        base_bytes: u64,
        limits: Limits,
    ) -> Self {
        Self {
            backing,
            now_ms,
            base_version,
            base_bytes,
            entries: BTreeMap::new(),
            byte_delta: 0,
            key_delta: 0,
            limits,
        }
    }

    /// The version every write of this request gets.
    pub fn write_version(&self) -> u64 {
        self.base_version + 1
    }

    pub fn changed(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }

    pub fn bytes(&self) -> u64 {
        (self.base_bytes as i64 + self.byte_delta).max(0) as u64
    }

    pub fn key_delta(&self) -> i64 {
        self.key_delta
    }

    fn entry(&mut self, key: &str) -> Result<&mut Entry, KvError> {
        if !self.entries.contains_key(key) {
            let loaded = self.backing.load(key)?;
            let entry = match loaded {
                Some(l) => Entry {
                    orig_size: (key.len() + l.json.len()) as u64,
                    orig_present: true,
                    orig_expires: l.record.expires_ms,
                    cur: (!l.record.is_expired(self.now_ms)).then_some((l.record, l.json)),
                    parsed: l.parsed,
                    dirty: false,
                },
                None => Entry {
                    orig_size: 0,
                    orig_present: false,
                    orig_expires: None,
                    cur: None,
                    parsed: true,
                    dirty: false,
                },
            };
            self.entries.insert(key.to_string(), entry);
        }
        self.entries
            .get_mut(key)
            .ok_or_else(|| KvError::Internal("staged entry vanished".into()))
    }

    /// The visible record of `key`, its value parsed.
    pub fn get(&mut self, key: &str) -> Result<Option<&Record>, KvError> {
        let entry = self.entry(key)?;
        if !entry.parsed {
            if let Some((rec, json)) = &mut entry.cur {
                rec.value = serde_json::from_slice(json)
                    .map_err(|e| KvError::Storage(format!("record value: {e}")))?;
            }
            entry.parsed = true;
        }
        Ok(entry.cur.as_ref().map(|(r, _)| r))
    }

    /// The version and expiry of the visible record of `key`, without its value.
    fn head(&mut self, key: &str) -> Result<Option<(u64, Option<u64>)>, KvError> {
        let cur = self.entry(key)?.cur.as_ref();
        Ok(cur.map(|(r, _)| (r.version, r.expires_ms)))
    }

    fn version_of(&mut self, key: &str) -> Result<u64, KvError> {
        Ok(self.head(key)?.map_or(0, |(version, _)| version))
    }

    /// Stages `value` for `key`, keeping created_at of an existing record; checks value
    /// and namespace limits.
    fn put(&mut self, key: &str, value: Value, expires_ms: Option<u64>) -> Result<(), KvError> {
        let json = validate::storable(&value, self.limits.max_value_bytes)?;
        self.put_json(key, value, json, expires_ms)
    }

    /// [`NsTxn::put`] of a value whose serialized form is at hand.
    fn put_json(
        &mut self,
        key: &str,
        value: Value,
        json: Vec<u8>,
        expires_ms: Option<u64>,
    ) -> Result<(), KvError> {
        validate::check_storable(&value, json.len(), self.limits.max_value_bytes)?;
        let (now, version) = (self.now_ms, self.write_version());
        let entry = self.entry(key)?;
        let (old_b, old_k) = (entry.byte_delta(key), entry.key_delta());
        let created_ms = entry.cur.as_ref().map_or(now, |(r, _)| r.created_ms);
        entry.parsed = true;
        entry.cur = Some((
            Record {
                value,
                version,
                created_ms,
                updated_ms: now,
                expires_ms,
            },
            json,
        ));
        entry.dirty = true;
        let (new_b, new_k) = (entry.byte_delta(key), entry.key_delta());
        self.byte_delta += new_b - old_b;
        self.key_delta += new_k - old_k;
        Ok(())
    }

    /// The namespace quota, judged on what the request leaves behind: over the limit
    /// only when it grew the namespace.
    fn check_quota(&self) -> Result<(), KvError> {
        let after = self.bytes();
        if after > self.limits.max_namespace_bytes && after > self.base_bytes {
            return Err(KvError::TooLarge {
                what: "namespace",
                limit_bytes: self.limits.max_namespace_bytes,
                current_size_bytes: after,
            });
        }
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<Option<Record>, KvError> {
        let entry = self.entry(key)?;
        let (old_b, old_k) = (entry.byte_delta(key), entry.key_delta());
        let Some((old, _)) = entry.cur.take() else {
            return Ok(None);
        };
        entry.dirty = true;
        let (new_b, new_k) = (entry.byte_delta(key), entry.key_delta());
        self.byte_delta += new_b - old_b;
        self.key_delta += new_k - old_k;
        Ok(Some(old))
    }

    /// Runs one operation against the staged state and returns its route's body.
    pub fn apply(&mut self, op: &Op) -> Result<Value, KvError> {
        match op {
            Op::Get { key, path, meta } => {
                // The namespace as this operation sees it (earlier writes of the same
                // batch included).
                let ns_version = if self.changed() {
                    self.write_version()
                } else {
                    self.base_version
                };
                let rec = self
                    .get(key)?
                    .ok_or_else(|| KvError::NotFound(key.clone()))?;
                get_body(key, rec, path.as_ref(), meta.then_some(ns_version))
            }
            Op::Set {
                key,
                value,
                nx,
                xx,
                if_version,
                ttl,
                keep_ttl,
                get,
            } => {
                // The old value is parsed and copied only when it is asked for.
                let previous = if *get {
                    self.get(key)?.map(|r| r.value.clone())
                } else {
                    None
                };
                let existing = self.head(key)?;
                check_version(key, *if_version, existing.map_or(0, |r| r.0))?;
                if *nx && existing.is_some() {
                    return Err(KvError::Exists(key.clone()));
                }
                if *xx && existing.is_none() {
                    return Err(KvError::NotExists(key.clone()));
                }
                let expires = match (ttl, keep_ttl) {
                    (Some(t), _) => Some(t.deadline(self.now_ms)),
                    (None, true) => existing.and_then(|r| r.1),
                    (None, false) => None,
                };
                match &value.json {
                    Some(json) => self.put_json(key, value.value.clone(), json.clone(), expires)?,
                    None => self.put(key, value.value.clone(), expires)?,
                }
                let mut body = json!({
                    "key": key,
                    "version": self.write_version(),
                    "created": existing.is_none(),
                });
                if *get {
                    body["previous"] = previous.unwrap_or(Value::Null);
                }
                Ok(body)
            }
            Op::Patch {
                key,
                path,
                value,
                if_version,
            } => {
                let rec = self
                    .get(key)?
                    .cloned()
                    .ok_or_else(|| KvError::NotFound(key.clone()))?;
                check_version(key, *if_version, rec.version)?;
                let mut doc = rec.value;
                match path {
                    Some((p, text)) => p.set(&mut doc, value.clone(), text)?,
                    None => json_patch::merge(&mut doc, value),
                }
                self.put(key, doc, rec.expires_ms)?;
                Ok(json!({"key": key, "version": self.write_version()}))
            }
            Op::Delete {
                key,
                if_version,
                get,
            } => {
                let v = self.version_of(key)?;
                check_version(key, *if_version, v)?;
                if *get {
                    self.get(key)?;
                }
                let old = self.remove(key)?;
                let mut body = json!({"deleted": old.is_some()});
                if *get {
                    body["previous"] = old.map_or(Value::Null, |r| r.value);
                }
                Ok(body)
            }
            Op::Incr { key, by } => {
                let existing = self.get(key)?.cloned();
                let current = match &existing {
                    None => 0,
                    Some(r) => match &r.value {
                        Value::Number(n) if n.is_i64() => n.as_i64().unwrap_or(0),
                        Value::Number(n) if n.is_u64() => {
                            return Err(KvError::Overflow(format!(
                                "value of `{key}` does not fit a signed 64-bit integer"
                            )));
                        }
                        _ => {
                            return Err(KvError::WrongType(format!(
                                "value of `{key}` is not an integer"
                            )));
                        }
                    },
                };
                let next = i64::try_from(i128::from(current) + *by).map_err(|_| {
                    KvError::Overflow(format!(
                        "{current} + {by} overflows a signed 64-bit integer"
                    ))
                })?;
                self.put(key, next.into(), existing.and_then(|r| r.expires_ms))?;
                Ok(json!({"value": next}))
            }
            Op::Push { key, front, values } => {
                let existing = self.get(key)?.cloned();
                let (mut list, expires) = match existing {
                    None => (Vec::new(), None),
                    Some(Record {
                        value: Value::Array(a),
                        expires_ms,
                        ..
                    }) => (a, expires_ms),
                    Some(_) => {
                        return Err(KvError::WrongType(format!(
                            "value of `{key}` is not a list"
                        )));
                    }
                };
                if values.iter().any(|v| validate::depth(v) >= MAX_DEPTH) {
                    return Err(validate::too_deep());
                }
                if *front {
                    // Each value goes to the front in turn, as Redis LPUSH does: the
                    // last one given ends up first.
                    list.splice(0..0, values.iter().rev().cloned());
                } else {
                    list.extend(values.iter().cloned());
                }
                let len = list.len();
                self.put(key, Value::Array(list), expires)?;
                Ok(json!({"length": len}))
            }
            Op::Pop { key, front, count } => {
                let existing = self.get(key)?.cloned();
                let (mut list, expires) = match existing {
                    None => {
                        return Ok(match count {
                            Some(_) => json!({"values": []}),
                            None => json!({"value": null}),
                        });
                    }
                    Some(Record {
                        value: Value::Array(a),
                        expires_ms,
                        ..
                    }) => (a, expires_ms),
                    Some(_) => {
                        return Err(KvError::WrongType(format!(
                            "value of `{key}` is not a list"
                        )));
                    }
                };
                let n = count.unwrap_or(1).min(list.len());
                let popped: Vec<Value> = if *front {
                    list.drain(..n).collect()
                } else {
                    let mut tail = list.split_off(list.len() - n);
                    tail.reverse();
                    tail
                };
                if n > 0 {
                    self.put(key, Value::Array(list), expires)?;
                }
                Ok(match count {
                    Some(_) => json!({"values": popped}),
                    None => json!({"value": popped.into_iter().next()}),
                })
            }
            Op::Expire { key, ttl } => {
                self.get(key)?;
                let (rec, json) = self
                    .entry(key)?
                    .cur
                    .clone()
                    .ok_or_else(|| KvError::NotFound(key.clone()))?;
                let expires = ttl.map(|t| t.deadline(self.now_ms));
                if expires.is_none() && rec.expires_ms.is_none() {
                    // Clearing a TTL that is not there changes nothing (Redis PERSIST).
                    return Ok(json!({"expires_at": null}));
                }
                // The value as it is stored: not serialized again.
                self.put_json(key, rec.value, json, expires)?;
                Ok(json!({"expires_at": expires.map(super::rfc3339)}))
            }
        }
    }

    /// Runs a whole request: namespace `if_version`, key checks, then every operation.
    pub fn run(&mut self, req: &BatchRequest, batch: bool) -> Result<Vec<Value>, KvError> {
        if let Some(expected) = req.if_version
            && expected != self.base_version
        {
            return Err(KvError::VersionMismatch {
                key: None,
                expected,
                actual: self.base_version,
            });
        }
        for (key, expected) in &req.checks {
            let actual = self.version_of(key)?;
            check_version(key, Some(*expected), actual)?;
        }
        let at = |e: KvError, i: usize| if batch { e.at(i) } else { e };
        let mut results = Vec::with_capacity(req.ops.len());
        // The operation since which the namespace has been over its quota: the one
        // a refusal names. Only the end state counts, as the batch commits whole.
        let mut over_since = None;
        for (i, op) in req.ops.iter().enumerate() {
            results.push(self.apply(op).map_err(|e| at(e, i))?);
            if self.bytes() > self.limits.max_namespace_bytes {
                over_since.get_or_insert(i);
            } else {
                over_since = None;
            }
        }
        if let Some(i) = over_since {
            self.check_quota().map_err(|e| at(e, i))?;
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_value_answered_as_stored_reads_as_the_parsed_one() {
        let values = [
            json!("plain"),
            json!({"b": [1, -2, 3.5, 1e300, 18446744073709551615u64], "a": {"\u{e9}\"": null}}),
            json!([true, false, "line\nbreak \u{1F600}"]),
            json!(-9223372036854775808i64),
        ];
        for value in values {
            let record = Record {
                value: value.clone(),
                version: 7,
                created_ms: 1_700_000_000_000,
                updated_ms: 1_700_000_001_000,
                expires_ms: Some(1_700_000_002_000),
            };
            let stored = || Loaded {
                record: Record {
                    value: Value::Null,
                    ..record.clone()
                },
                json: serde_json::to_vec(&value).unwrap(),
                parsed: false,
            };
            for ns_version in [None, Some(42)] {
                let body = StoredBody::new("k", stored(), ns_version).unwrap();
                assert_eq!(
                    serde_json::to_value(&body).unwrap(),
                    get_body("k", &record, None, ns_version).unwrap(),
                    "{value}"
                );
            }
        }
        let broken = Loaded {
            json: b"{\"a\":".to_vec(),
            ..Loaded {
                record: Record {
                    value: Value::Null,
                    version: 1,
                    created_ms: 0,
                    updated_ms: 0,
                    expires_ms: None,
                },
                json: Vec::new(),
                parsed: false,
            }
        };
        assert!(matches!(
            StoredBody::new("k", broken, None),
            Err(KvError::Storage(_))
        ));
    }

    #[derive(Default)]
    struct Mem(HashMap<String, Record>);
    impl Backing for Mem {
        fn load(&mut self, key: &str) -> Result<Option<Loaded>, KvError> {
            Ok(self.0.get(key).map(|r| Loaded {
                record: r.clone(),
                json: serde_json::to_vec(&r.value).unwrap(),
                parsed: true,
            }))
        }
    }

    const LIMITS: Limits = Limits {
        max_value_bytes: 1000,
        max_namespace_bytes: 2000,
    };

    fn run(mem: &mut Mem, ops: Vec<Op>) -> Result<Vec<Value>, KvError> {
        let mut t = NsTxn::new(mem, 1_000, 7, 0, LIMITS);
        let r = t.run(
            &BatchRequest {
                ops,
                ..Default::default()
            },
            true,
        )?;
        let staged: Vec<(String, Option<Record>)> = t
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, e)| (k.clone(), e.cur.as_ref().map(|(r, _)| r.clone())))
            .collect();
        for (k, r) in staged {
            match r {
                Some(r) => mem.0.insert(k, r),
                None => mem.0.remove(&k),
            };
        }
        Ok(r)
    }

    fn op(v: Value) -> Op {
        parse_op(v).unwrap()
    }

    /// Loads records the way the writer does: values left unparsed.
    struct Unparsed(HashMap<String, Vec<u8>>);
    impl Backing for Unparsed {
        fn load(&mut self, key: &str) -> Result<Option<Loaded>, KvError> {
            Ok(self.0.get(key).map(|json| Loaded {
                record: Record {
                    value: Value::Null,
                    version: 3,
                    created_ms: 1,
                    updated_ms: 1,
                    expires_ms: None,
                },
                json: json.clone(),
                parsed: false,
            }))
        }
    }

    #[test]
    fn values_loaded_unparsed_are_parsed_for_the_operations_that_read_them() {
        let stored = |v: Value| serde_json::to_vec(&v).unwrap();
        let mut b = Unparsed(HashMap::from([
            ("s".to_string(), stored(json!({"old": 1}))),
            ("d".to_string(), stored(json!([1, 2]))),
            ("n".to_string(), stored(json!(41))),
            ("e".to_string(), stored(json!("kept"))),
            ("bad".to_string(), b"{not json".to_vec()),
        ]));
        let mut t = NsTxn::new(&mut b, 1_000, 7, 0, LIMITS);
        let ops = vec![
            op(json!({"op": "set", "key": "s", "value": 2, "get": true})),
            op(json!({"op": "delete", "key": "d", "get": true})),
            op(json!({"op": "incr", "key": "n"})),
            op(json!({"op": "expire", "key": "e", "ttl": 5})),
            op(json!({"op": "get", "key": "e"})),
            // A value that does not parse is overwritten by a set that does not read it.
            op(json!({"op": "set", "key": "bad", "value": "new"})),
        ];
        let req = BatchRequest {
            ops,
            ..Default::default()
        };
        let r = t.run(&req, true).unwrap();
        assert_eq!(r[0]["previous"], json!({"old": 1}));
        assert_eq!(r[1]["previous"], json!([1, 2]));
        assert_eq!(r[2]["value"], json!(42));
        assert_eq!(r[4]["value"], json!("kept"));
        let (rec, json) = t.entries.get("e").unwrap().cur.clone().unwrap();
        assert_eq!((rec.value, json), (json!("kept"), stored(json!("kept"))));
        assert_eq!(rec.expires_ms, Some(6_000));
        let (rec, _) = t.entries.get("bad").unwrap().cur.clone().unwrap();
        assert_eq!(rec.value, json!("new"));
        // One that reads it fails loudly.
        let mut b = Unparsed(HashMap::from([("bad".to_string(), b"{".to_vec())]));
        let mut t = NsTxn::new(&mut b, 1_000, 7, 0, LIMITS);
        let req = BatchRequest::single(op(json!({"op": "get", "key": "bad"})));
        assert!(matches!(t.run(&req, false), Err(KvError::Storage(_))));
    }

    #[test]
    fn set_stores_the_form_made_with_its_value_and_expire_keeps_it() {
        let mut m = Mem::default();
        let mut t = NsTxn::new(&mut m, 1_000, 7, 0, LIMITS);
        let value = json!({"b": [1, 2.5], "a": "x\u{e9}\n"});
        let req = BatchRequest {
            ops: vec![
                op(json!({"op": "set", "key": "k", "value": value})),
                op(json!({"op": "expire", "key": "k", "ttl": 5})),
            ],
            ..Default::default()
        };
        t.run(&req, true).unwrap();
        let (rec, json) = t.entries.get("k").unwrap().cur.clone().unwrap();
        assert_eq!(rec.value, value);
        assert_eq!(json, serde_json::to_vec(&value).unwrap());
        assert_eq!(rec.expires_ms, Some(6_000));
        // The value limit is judged on the serialized form (999 characters and quotes).
        let err = run(
            &mut m,
            vec![op(
                json!({"op": "set", "key": "b", "value": "x".repeat(999)}),
            )],
        )
        .unwrap_err();
        let KvError::Batch { source, .. } = err else {
            panic!("{err:?}")
        };
        assert!(
            matches!(
                *source,
                KvError::TooLarge {
                    what: "value",
                    limit_bytes: 1000,
                    current_size_bytes: 1001
                }
            ),
            "{source:?}"
        );
        assert!(
            run(
                &mut m,
                vec![op(
                    json!({"op": "set", "key": "b", "value": "x".repeat(998)})
                )]
            )
            .is_ok()
        );
    }

    #[test]
    fn push_pop_like_redis() {
        let mut m = Mem::default();
        let r = run(
            &mut m,
            vec![
                op(json!({"op": "lpush", "key": "l", "values": ["a", "b", "c"]})),
                op(json!({"op": "rpush", "key": "l", "value": "z"})),
                op(json!({"op": "rpop", "key": "l", "count": 2})),
                op(json!({"op": "lpop", "key": "l"})),
            ],
        )
        .unwrap();
        assert_eq!(r[0], json!({"length": 3}));
        assert_eq!(r[1], json!({"length": 4}));
        assert_eq!(r[2], json!({"values": ["z", "a"]}));
        assert_eq!(r[3], json!({"value": "c"}));
        assert_eq!(m.0["l"].value, json!(["b"]));
        let r = run(
            &mut m,
            vec![op(json!({"op": "lpop", "key": "l", "count": 5}))],
        )
        .unwrap();
        assert_eq!(r[0], json!({"values": ["b"]}));
        assert_eq!(
            m.0["l"].value,
            json!([]),
            "a list emptied by pops stays as []"
        );
    }

    #[test]
    fn incr_types_and_overflow() {
        let mut m = Mem::default();
        assert_eq!(
            run(&mut m, vec![op(json!({"op": "decr", "key": "n", "by": 5}))]).unwrap()[0],
            json!({"value": -5})
        );
        m.0.get_mut("n").unwrap().value = json!(i64::MAX);
        assert!(matches!(
            run(&mut m, vec![op(json!({"op": "incr", "key": "n"}))]),
            Err(KvError::Batch { source, .. }) if matches!(*source, KvError::Overflow(_))
        ));
        for bad in [json!(1.5), json!(true), json!("1")] {
            m.0.get_mut("n").unwrap().value = bad;
            assert!(matches!(
                run(&mut m, vec![op(json!({"op": "incr", "key": "n"}))]),
                Err(KvError::Batch { source, .. }) if matches!(*source, KvError::WrongType(_))
            ));
        }
        assert!(parse_op(json!({"op": "incr", "key": "n", "by": 1.5})).is_err());
        // A DECR by i64::MIN fits where the value is negative, and only there.
        m.0.get_mut("n").unwrap().value = json!(-1);
        let min = || op(json!({"op": "decr", "key": "n", "by": i64::MIN}));
        assert_eq!(
            run(&mut m, vec![min()]).unwrap()[0],
            json!({"value": i64::MAX})
        );
        assert!(matches!(
            run(&mut m, vec![min()]),
            Err(KvError::Batch { source, .. }) if matches!(*source, KvError::Overflow(_))
        ));
    }

    #[test]
    fn failing_op_reports_index_and_stages_nothing() {
        let mut m = Mem::default();
        let err = run(
            &mut m,
            vec![
                op(json!({"op": "set", "key": "a", "value": 1})),
                op(json!({"op": "set", "key": "a", "value": 2, "nx": true})),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, KvError::Batch { index: 1, .. }), "{err:?}");
        assert!(m.0.is_empty());
    }

    #[test]
    fn namespace_quota() {
        let mut m = Mem::default();
        let big = "x".repeat(900);
        run(
            &mut m,
            vec![op(json!({"op": "set", "key": "a", "value": big}))],
        )
        .unwrap();
        run(
            &mut m,
            vec![op(json!({"op": "set", "key": "b", "value": big}))],
        )
        .unwrap();
        let batch = |m: &mut Mem, base: u64, ops: Vec<Value>| {
            let ops = ops.into_iter().map(op).collect();
            let req = BatchRequest {
                ops,
                ..Default::default()
            };
            let mut t = NsTxn::new(m, 1_000, 2, base, LIMITS);
            t.run(&req, true)
                .map(|_| t.bytes())
                .map_err(|e| format!("{e:?}"))
        };
        let set_c = json!({"op": "set", "key": "c", "value": big});
        let set_d = json!({"op": "set", "key": "d", "value": big});
        let del_a = json!({"op": "delete", "key": "a"});
        let err = batch(&mut m, 1806, vec![set_c.clone()]).unwrap_err();
        assert!(err.starts_with("Batch { index: 0"), "{err}");
        assert!(
            err.contains(
                r#"TooLarge { what: "namespace", limit_bytes: 2000, current_size_bytes: 2709 }"#
            ),
            "{err}"
        );
        // Only what the batch leaves behind counts, whatever the order.
        assert_eq!(
            batch(&mut m, 1806, vec![set_c.clone(), del_a.clone()]),
            Ok(1806)
        );
        assert_eq!(
            batch(&mut m, 1806, vec![del_a.clone(), set_c.clone()]),
            Ok(1806)
        );
        // A refusal names the operation since which the namespace is over.
        let err = batch(&mut m, 1806, vec![set_c.clone(), del_a, set_d]).unwrap_err();
        assert!(err.starts_with("Batch { index: 2"), "{err}");
        // Shrinking is always allowed, even over the quota.
        let shrink = json!({"op": "set", "key": "a", "value": 1});
        assert_eq!(batch(&mut m, 5000, vec![shrink]), Ok(5000 - 903 + 2));
    }

    #[test]
    fn expired_records_are_invisible() {
        let mut m = Mem::default();
        m.0.insert(
            "k".into(),
            Record {
                value: json!(1),
                version: 3,
                created_ms: 1,
                updated_ms: 1,
                expires_ms: Some(999),
            },
        );
        let err = run(&mut m, vec![op(json!({"op": "get", "key": "k"}))]).unwrap_err();
        assert!(
            matches!(err, KvError::Batch { source, .. } if matches!(*source, KvError::NotFound(_)))
        );
        let r = run(
            &mut m,
            vec![op(json!({"op": "set", "key": "k", "value": 2}))],
        )
        .unwrap();
        assert_eq!(r[0]["created"], json!(true));
    }

    #[test]
    fn batch_parse_errors() {
        assert!(matches!(
            BatchRequest::parse(b"{"),
            Err(KvError::InvalidJson(_))
        ));
        assert!(matches!(
            BatchRequest::parse(br#"{"operations": [{"op": "nope", "key": "a"}]}"#),
            Err(KvError::Batch { index: 0, .. })
        ));
        let many = json!({"operations": vec![json!({"op": "get", "key": "a"}); 101]});
        assert!(matches!(
            BatchRequest::parse(many.to_string().as_bytes()),
            Err(KvError::InvalidParam(_))
        ));
        assert!(matches!(
            BatchRequest::parse(br#"{"operations": [{"op": "get", "key": "$x"}]}"#),
            Err(KvError::Batch { index: 0, source }) if matches!(*source, KvError::ReservedKey(_))
        ));
    }

    /// A batch or an operation that is an array is refused in the API's words, not
    /// serde's ("expected struct RawBatch with 3 elements").
    #[test]
    fn arrays_are_no_batch_and_no_operation() {
        let message = |body: &[u8]| match BatchRequest::parse(body) {
            Err(KvError::InvalidParam(m)) => m,
            Err(KvError::Batch { index: 0, source }) => match *source {
                KvError::InvalidParam(m) => m,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        assert_eq!(message(b"[]"), "the body must be a JSON object");
        assert_eq!(message(b" [0, [], []]"), "the body must be a JSON object");
        assert_eq!(
            message(br#"{"operations": [["set", "q"]]}"#),
            "an operation must be a JSON object"
        );
        assert_eq!(
            message(br#"{"operations": [{"op": "set", "key": "q", "value": 1, "nx": 3}]}"#),
            "operation: invalid type: integer `3`, expected a boolean"
        );
    }

    /// An explicit `null` is the field left out for every optional field (a client that
    /// writes absent options as null), except an `expire`'s `ttl`, where it clears one.
    #[test]
    fn null_optional_fields_are_left_out() {
        let req = BatchRequest::parse(
            br#"{"if_version": null, "checks": null, "operations": [
                {"op": "set", "key": "a", "value": 1, "ttl": null, "keep_ttl": true,
                 "nx": null, "xx": null, "get": null, "if_version": null},
                {"op": "incr", "key": "n", "by": null},
                {"op": "expire", "key": "a", "ttl": null},
                {"op": "rpush", "key": "l", "value": 1, "values": null},
                {"op": "get", "key": "a", "meta": null, "path": null}]}"#,
        )
        .unwrap();
        assert_eq!((req.if_version, req.checks.len()), (None, 0));
        assert!(matches!(
            &req.ops[0],
            Op::Set {
                ttl: None,
                keep_ttl: true,
                ..
            }
        ));
        assert!(matches!(&req.ops[1], Op::Incr { by: 1, .. }));
        assert!(matches!(&req.ops[2], Op::Expire { ttl: None, .. }));
        assert!(matches!(&req.ops[3], Op::Push { values, .. } if values.len() == 1));
        assert!(matches!(&req.ops[4], Op::Get { meta: false, .. }));
    }
}
