//! KV route handlers: each turns a request into an [`Op`] (or a read) on the store and
//! the store's answer into API.md's body and status.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Map, Value, json};

use super::error::json_ok;
use super::{ActionParam, ApiError, AppState, Ctx, KeyParam, read_body};
use crate::auth::Scope;
use crate::kv::ops::{self, MAX_BATCH_OPS};
use crate::kv::{BatchRequest, KvError, Op, Ttl, validate};

/// Default and largest page of `GET /v1/kv`.
const LIST_DEFAULT: usize = 100;
const LIST_MAX: usize = 1000;
/// Default and longest wait of `watch`.
const WATCH_DEFAULT_S: u64 = 30;
const WATCH_MAX_S: u64 = 300;

/// Records the request in the metrics and turns the result into a response.
fn finish(
    state: &AppState,
    op: &'static str,
    started: Instant,
    result: Result<Response, ApiError>,
) -> Response {
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status == StatusCode::CONFLICT {
                state.metrics.kv_conflict(e.code);
            }
            e.into_response()
        }
    };
    state
        .metrics
        .kv_request(op, resp.status().as_u16(), started.elapsed());
    resp
}

/// Body limit of single-key routes: room for a value at the limit, pretty-printed.
fn value_body_limit(state: &AppState) -> u64 {
    state
        .config
        .kv
        .max_value_bytes
        .saturating_mul(2)
        .saturating_add(4096)
}

async fn write_one(state: &AppState, ns: &str, op: Op) -> Result<Value, ApiError> {
    let mut outcome = state.kv.write(ns, BatchRequest::single(op), false).await?;
    outcome
        .results
        .pop()
        .ok_or_else(|| ApiError::from(KvError::Internal("no result".into())))
}

pub async fn get_key(
    State(state): State<AppState>,
    ctx: Ctx,
    key: Result<KeyParam, ApiError>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let KeyParam(key) = key?;
        ctx.query.allow(&["path", "meta"])?;
        let ns = ctx.namespace(Scope::KvRead)?;
        let path = ops::parse_path(ctx.query.get("path"))?;
        let meta = ctx.query.flag("meta")?;
        if path.is_none() {
            // The value whole: answered as stored, never parsed.
            let (rec, ns_meta) = state.kv.get_stored(&ns, &key, meta).await?;
            let rec = rec.ok_or_else(|| KvError::NotFound(key.clone()))?;
            let body = ops::StoredBody::new(&key, rec, meta.then_some(ns_meta.version))?;
            return Ok((StatusCode::OK, axum::Json(body)).into_response());
        }
        let (rec, ns_meta) = if meta {
            let (r, m) = state.kv.get_with_meta(&ns, &key).await?;
            (r, Some(m))
        } else {
            (state.kv.get(&ns, &key).await?, None)
        };
        let rec = rec.ok_or_else(|| KvError::NotFound(key.clone()))?;
        let body = ops::get_body(&key, &rec, path.as_ref(), ns_meta.map(|m| m.version))?;
        Ok(json_ok(StatusCode::OK, body))
    }
    .await;
    finish(&state, "get", started, result)
}

pub async fn put_key(
    State(state): State<AppState>,
    ctx: Ctx,
    key: Result<KeyParam, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = async {
        let KeyParam(key) = key?;
        ctx.query
            .allow(&["nx", "xx", "if_version", "ttl", "keep_ttl", "get"])?;
        let ns = ctx.namespace(Scope::KvWrite)?;
        let q = &ctx.query;
        let get = q.flag("get")?;
        if get {
            ctx.grant.require(Scope::KvRead)?;
        }
        let (nx, xx, keep_ttl) = (q.flag("nx")?, q.flag("xx")?, q.flag("keep_ttl")?);
        if nx && xx {
            return Err(ApiError::invalid_param("`nx` and `xx` exclude each other"));
        }
        let ttl = q.get("ttl").map(|t| Ttl::parse_str(t, "ttl")).transpose()?;
        if ttl.is_some() && keep_ttl {
            return Err(ApiError::invalid_param(
                "`ttl` and `keep_ttl` exclude each other",
            ));
        }
        let bytes = read_body(&headers, body, value_body_limit(&state)).await?;
        let value = validate::parse_json(&bytes)?;
        let op = Op::Set {
            key,
            value: value.into(),
            nx,
            xx,
            if_version: q.u64("if_version")?,
            ttl,
            keep_ttl,
            get,
        };
        let body = write_one(&state, &ns, op).await?;
        let status = if body["created"] == json!(true) {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(json_ok(status, body))
    }
    .await;
    finish(&state, "set", started, result)
}

pub async fn patch_key(
    State(state): State<AppState>,
    ctx: Ctx,
    key: Result<KeyParam, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = async {
        let KeyParam(key) = key?;
        ctx.query.allow(&["path", "if_version"])?;
        let ns = ctx.namespace(Scope::KvWrite)?;
        let path = ops::parse_path(ctx.query.get("path"))?;
        let bytes = read_body(&headers, body, value_body_limit(&state)).await?;
        let value = validate::parse_json(&bytes)?;
        let op = Op::Patch {
            key,
            path,
            value,
            if_version: ctx.query.u64("if_version")?,
        };
        Ok(json_ok(StatusCode::OK, write_one(&state, &ns, op).await?))
    }
    .await;
    finish(&state, "patch", started, result)
}

pub async fn delete_key(
    State(state): State<AppState>,
    ctx: Ctx,
    key: Result<KeyParam, ApiError>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let KeyParam(key) = key?;
        ctx.query.allow(&["if_version", "get"])?;
        let ns = ctx.namespace(Scope::KvWrite)?;
        let get = ctx.query.flag("get")?;
        if get {
            ctx.grant.require(Scope::KvRead)?;
        }
        let op = Op::Delete {
            key,
            if_version: ctx.query.u64("if_version")?,
            get,
        };
        Ok(json_ok(StatusCode::OK, write_one(&state, &ns, op).await?))
    }
    .await;
    finish(&state, "delete", started, result)
}

/// A small JSON object body of an action route; empty means `{}`. Unknown fields are
/// refused.
async fn action_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    allowed: &[&str],
) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(headers, body, value_body_limit(state)).await?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Map::new());
    }
    match validate::parse_json(&bytes)? {
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
                return Err(ApiError::invalid_param(format!("unknown field `{k}`")));
            }
            Ok(m)
        }
        _ => Err(ApiError::invalid_param("the body must be a JSON object")),
    }
}

pub async fn post_action(
    State(state): State<AppState>,
    ctx: Ctx,
    key: Result<KeyParam, ApiError>,
    ActionParam(action): ActionParam,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let name: &'static str = match action.as_str() {
        "incr" => "incr",
        "decr" => "decr",
        "lpush" => "lpush",
        "rpush" => "rpush",
        "lpop" => "lpop",
        "rpop" => "rpop",
        "expire" => "expire",
        _ => return key.map_or_else(IntoResponse::into_response, |_| no_such_action(&action)),
    };
    let key = match key {
        Ok(KeyParam(key)) => key,
        Err(e) => return finish(&state, name, started, Err(e)),
    };
    let result = async {
        ctx.query.allow(&[])?;
        let ns = ctx.namespace(Scope::KvWrite)?;
        let op = match name {
            "incr" | "decr" => {
                let mut b = action_body(&state, &headers, body, &["by"]).await?;
                Op::Incr {
                    key,
                    by: ops::parse_by(b.remove("by").as_ref(), name == "decr")?,
                }
            }
            "lpush" | "rpush" => {
                let mut b = action_body(&state, &headers, body, &["value", "values"]).await?;
                Op::Push {
                    key,
                    front: name == "lpush",
                    values: ops::push_values(b.remove("value"), b.remove("values"))?,
                }
            }
            "lpop" | "rpop" => {
                ctx.grant.require(Scope::KvRead)?;
                let b = action_body(&state, &headers, body, &["count"]).await?;
                Op::Pop {
                    key,
                    front: name == "lpop",
                    count: ops::parse_count(b.get("count"))?,
                }
            }
            _ => {
                let b = action_body(&state, &headers, body, &["ttl"]).await?;
                let ttl = b.get("ttl").ok_or_else(|| {
                    ApiError::invalid_param("`ttl` is required (0 or null clears)")
                })?;
                Op::Expire {
                    key,
                    ttl: Ttl::from_json(ttl, true)?,
                }
            }
        };
        Ok(json_ok(StatusCode::OK, write_one(&state, &ns, op).await?))
    }
    .await;
    finish(&state, name, started, result)
}

pub async fn get_action(
    State(state): State<AppState>,
    ctx: Ctx,
    key: Result<KeyParam, ApiError>,
    ActionParam(action): ActionParam,
) -> Response {
    let started = Instant::now();
    let name = match action.as_str() {
        "len" => "len",
        "watch" => "watch",
        _ => return key.map_or_else(IntoResponse::into_response, |_| no_such_action(&action)),
    };
    let result = match key {
        Ok(KeyParam(key)) if name == "len" => len(&state, &ctx, key).await,
        Ok(KeyParam(key)) => watch(&state, &ctx, key).await,
        Err(e) => Err(e),
    };
    finish(&state, name, started, result)
}

/// `/v1/kv/{key}/{action}` with PUT, PATCH or DELETE.
pub async fn other_method_action(ActionParam(action): ActionParam) -> Response {
    no_such_action(&action)
}

/// An action asked with a method it does not take: 405 with the one it takes for a
/// known action, else 404.
fn no_such_action(action: &str) -> Response {
    match action {
        "len" | "watch" => action_method_not_allowed(action, "GET"),
        "incr" | "decr" | "lpush" | "rpush" | "lpop" | "rpop" | "expire" => {
            action_method_not_allowed(action, "POST")
        }
        _ => ApiError::not_found(format!("no action `{action}`")).into_response(),
    }
}

/// `/v1/kv/` with any method: the key is empty.
/// `/v1/kv/`: an empty key, once the caller is authenticated (`Ctx`).
pub async fn empty_key(_: Ctx) -> ApiError {
    KvError::InvalidKey("the key is empty (1 to 255 bytes)".into()).into()
}

/// 405 for a known action asked with the other method, with the one it takes.
fn action_method_not_allowed(action: &str, allow: &'static str) -> Response {
    let mut r = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("`{action}` takes {allow}"),
    )
    .into_response();
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

async fn len(state: &AppState, ctx: &Ctx, key: String) -> Result<Response, ApiError> {
    ctx.query.allow(&[])?;
    let ns = ctx.namespace(Scope::KvRead)?;
    let rec = state
        .kv
        .get(&ns, &key)
        .await?
        .ok_or_else(|| KvError::NotFound(key.clone()))?;
    match rec.value {
        Value::Array(a) => Ok(json_ok(StatusCode::OK, json!({"length": a.len()}))),
        _ => Err(KvError::WrongType(format!("value of `{key}` is not a list")).into()),
    }
}

/// Long poll: answers once the key's version exceeds `after_version` (or the key is
/// deleted), 204 when `timeout_s` passes first, 503 when the daemon shuts down. A key
/// missing at the start is reported deleted at once only when the namespace has changed
/// since `after_version`; otherwise the watch waits for it to appear.
async fn watch(state: &AppState, ctx: &Ctx, key: String) -> Result<Response, ApiError> {
    ctx.query.allow(&["after_version", "timeout_s"])?;
    let ns = ctx.namespace(Scope::KvRead)?;
    let timeout = ctx.query.u64("timeout_s")?.unwrap_or(WATCH_DEFAULT_S);
    if timeout > WATCH_MAX_S {
        return Err(ApiError::invalid_param(format!(
            "`timeout_s` is at most {WATCH_MAX_S}"
        )));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    // Subscribe before the first read so no commit between the two is missed.
    let mut changes = state.kv.subscribe(&ns, 0);
    // Every change in the namespace wakes the watch to read the key again: its value
    // stays as stored (not parsed) until it is answered.
    let (mut current, meta) = state.kv.get_stored(&ns, &key, true).await?;
    let given = ctx.query.u64("after_version")?;
    let after = given.unwrap_or_else(|| current.as_ref().map_or(0, |l| l.record.version));
    // A key missing at the start counts as deleted only when the namespace changed
    // after `after_version`: then the caller's copy may have been deleted since. The
    // answer carries the namespace version, so a watch resumed from it waits.
    let mut existed = given.is_some_and(|v| v > 0 && meta.version > v);
    // A key created and deleted between two reads is missing at both: the store's
    // deletions since the first read tell it.
    let since = meta.version;
    let mut ns_version = meta.version;
    let shutdown = state.lifecycle.shutdown.clone();
    loop {
        match current.take() {
            Some(l) if l.record.version > after => {
                let body = ops::StoredBody::new(&key, l, Some(ns_version))?;
                return Ok((StatusCode::OK, axum::Json(body)).into_response());
            }
            Some(_) => existed = true,
            None if existed || state.kv.deleted_after(&ns, &key, since) => {
                return Ok(json_ok(
                    StatusCode::OK,
                    json!({"key": key, "deleted": true, "version": ns_version}),
                ));
            }
            None => {}
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(KvError::ShuttingDown.into());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            _ = shutdown.cancelled() => return Err(KvError::ShuttingDown.into()),
        }
        let (rec, meta) = state.kv.get_stored(&ns, &key, true).await?;
        current = rec;
        ns_version = meta.version;
    }
}

pub async fn list(State(state): State<AppState>, ctx: Ctx) -> Response {
    let started = Instant::now();
    let result = async {
        ctx.query.allow(&["prefix", "limit", "cursor", "meta"])?;
        let ns = ctx.namespace(Scope::KvRead)?;
        // Any larger count is clamped, however many digits it has.
        let limit = match ctx.query.get("limit") {
            None => LIST_DEFAULT,
            Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                match v.trim_start_matches('0') {
                    "" => return Err(ApiError::invalid_param("`limit` must be at least 1")),
                    n => n.parse::<usize>().map_or(LIST_MAX, |n| n.min(LIST_MAX)),
                }
            }
            Some(v) => {
                return Err(ApiError::invalid_param(format!(
                    "`limit` must be a positive integer, got `{v}`"
                )));
            }
        };
        let after = ctx
            .query
            .get("cursor")
            .filter(|c| !c.is_empty())
            .map(|c| {
                B64URL
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        ApiError::invalid_param("`cursor` is not a cursor from this API")
                    })
            })
            .transpose()?;
        let prefix = ctx.query.get("prefix").unwrap_or("").to_string();
        let (keys, more, meta) = state.kv.list(&ns, &prefix, after, limit).await?;
        let next = if more {
            keys.last().map(|k| B64URL.encode(k.as_bytes()))
        } else {
            None
        };
        let mut body = json!({"keys": keys, "count": keys.len(), "next_cursor": next});
        if ctx.query.flag("meta")? {
            body["version"] = meta.version.into();
        }
        Ok(json_ok(StatusCode::OK, body))
    }
    .await;
    finish(&state, "list", started, result)
}

pub async fn batch(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = async {
        ctx.query.allow(&[])?;
        // A caller who can neither read nor write the namespace is refused before the
        // body is read; the scopes its operations need are checked once it is parsed.
        let ns = ctx.granted_namespace()?;
        if ctx.grant.require(Scope::KvRead).is_err() {
            ctx.grant.require(Scope::KvWrite)?;
        }
        let limit = value_body_limit(&state).saturating_mul(MAX_BATCH_OPS as u64);
        let bytes = read_body(&headers, body, limit).await?;
        let req = BatchRequest::parse(&bytes)?;
        let reads = req.ops.iter().any(|o| {
            matches!(
                o,
                Op::Get { .. }
                    | Op::Pop { .. }
                    | Op::Set { get: true, .. }
                    | Op::Delete { get: true, .. }
            )
        });
        let writes = req.ops.iter().any(|o| !matches!(o, Op::Get { .. }));
        ctx.grant.require(if writes {
            Scope::KvWrite
        } else {
            Scope::KvRead
        })?;
        if reads {
            ctx.grant.require(Scope::KvRead)?;
        }
        let outcome = state.kv.write(&ns, req, true).await?;
        Ok(json_ok(
            StatusCode::OK,
            json!({"version": outcome.version, "results": outcome.results}),
        ))
    }
    .await;
    finish(&state, "batch", started, result)
}
