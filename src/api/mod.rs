//! The HTTP API served on the Unix socket: routing, the per-request context (auth and
//! query parameters), bounded body reading, and the handlers in [`kv`], [`system`] and
//! [`backup`].

pub mod backup;
pub mod error;
pub mod files;
pub mod kv;
pub mod linger;
pub mod server;
pub mod system;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path};
use axum::http::{HeaderMap, header, request::Parts};
use axum::routing::{any, get, post};
use http_body_util::BodyExt;

use crate::auth::{Authenticator, Grant, Scope};
use crate::config::Config;
use crate::kv::KvStore;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

pub use error::ApiError;

/// What every handler shares: one handle, cloned per request (axum clones the state
/// for the route and again for each `State` extractor).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The daemon's parts the routes use, behind [`AppState`].
pub struct Shared {
    pub config: Arc<Config>,
    pub kv: KvStore,
    pub sync: crate::sync::SyncHandle,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    pub started: Instant,
    pub snapshots: Arc<crate::snapshot::Snapshots>,
    pub git: Arc<crate::gitbundle::GitBundler>,
    pub files: crate::files::FileStore,
    pub replica: crate::replicate::ReplicaHandle,
    /// This daemon's claim on the conversation (`owner` in `/v1/status`).
    pub owner: Arc<crate::owner::Owner>,
}

/// The whole router; `lifecycle::run` serves it on the socket, tests may call it directly.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/v1/status", get(system::status))
        .route("/v1/shutdown", post(system::shutdown))
        .route("/v1/sync", post(system::sync))
        .route(
            "/v1/snapshots",
            get(backup::list_snapshots).post(backup::take_snapshot),
        )
        .route("/v1/git/bundle", post(backup::write_bundles))
        .route("/v1/files", get(files::list_files))
        .route("/v1/files/", any(files::empty_path))
        .route(
            "/v1/files/{*path}",
            get(files::get_file)
                .put(files::put_file)
                .delete(files::delete_file),
        )
        .route("/v1/kv", get(kv::list))
        .route("/v1/kv/", any(kv::empty_key))
        .route(
            "/v1/kv/batch",
            post(kv::batch)
                .get(kv::get_key)
                .put(kv::put_key)
                .patch(kv::patch_key)
                .delete(kv::delete_key),
        )
        .route(
            "/v1/kv/{key}",
            get(kv::get_key)
                .put(kv::put_key)
                .patch(kv::patch_key)
                .delete(kv::delete_key),
        )
        .route(
            "/v1/kv/{key}/{action}",
            get(kv::get_action)
                .post(kv::post_action)
                .put(kv::other_method_action)
                .patch(kv::other_method_action)
                .delete(kv::other_method_action),
        )
        .fallback(error::no_route)
        .method_not_allowed_fallback(|| async { error::method_not_allowed() })
        .with_state(state)
}

/// Query parameters of a request, in order.
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses a query string (`application/x-www-form-urlencoded`). A name or value
    /// that does not decode to UTF-8 is refused, not turned into U+FFFD: `prefix=%FF`
    /// must not quietly list keys that start with the replacement character.
    pub fn parse(q: &str) -> Result<Self, ApiError> {
        let decode = |raw: &str| {
            let spaced = raw.replace('+', " ");
            percent_encoding::percent_decode_str(&spaced)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    ApiError::invalid_param(format!(
                        "query parameter `{raw}` is not valid UTF-8 once decoded"
                    ))
                })
        };
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let k = decode(k)?;
            let v = decode(v).map_err(|_| {
                ApiError::invalid_param(format!(
                    "the value of query parameter `{k}` is not valid UTF-8 once decoded"
                ))
            })?;
            // `nx=true&nx=false` must not be read either way without a word.
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(ApiError::invalid_param(format!(
                    "query parameter `{k}` is given more than once"
                )));
            }
            pairs.push((k, v));
        }
        Ok(Self(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses parameters the route does not know (`ns` is always allowed): a typo such
    /// as `if_verison` must not silently turn a conditional write into a blind one.
    pub fn allow(&self, names: &[&str]) -> Result<(), ApiError> {
        match self
            .0
            .iter()
            .find(|(k, _)| k != "ns" && !names.contains(&k.as_str()))
        {
            Some((k, _)) => Err(ApiError::invalid_param(format!(
                "unknown query parameter `{k}`"
            ))),
            None => Ok(()),
        }
    }

    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(v) => Err(ApiError::invalid_param(format!(
                "`{name}` must be true or false (or 1, 0, or given bare for true), got `{v}`"
            ))),
        }
    }

    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::invalid_param(format!(
                        "`{name}` must be a non-negative integer, got `{v}`"
                    ))
                })
            })
            .transpose()
    }
}

/// Per-request context for `/v1/` routes: the caller's grant and the query.
pub struct Ctx {
    pub grant: Grant,
    pub query: Query,
}

impl Ctx {
    /// The namespace of this request (`?ns=`, else the token's single namespace, else
    /// `default`), checked against the grant; and the scope the route needs.
    pub fn namespace(&self, scope: Scope) -> Result<String, ApiError> {
        self.grant.require(scope)?;
        self.granted_namespace()
    }

    /// The namespace of this request, checked against the grant's namespaces only: for
    /// a route whose scope depends on its body, to refuse a caller before the body is read.
    pub fn granted_namespace(&self) -> Result<String, ApiError> {
        let ns = self
            .query
            .get("ns")
            .unwrap_or_else(|| self.grant.default_namespace());
        crate::kv::validate::namespace(ns)?;
        self.grant.namespace(ns)?;
        Ok(ns.to_string())
    }
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Who asks comes first: a caller without a valid token learns nothing about the
        // request, not even that its query is malformed.
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        let grant = state.auth.authenticate(header)?;
        let query = match parts.uri.query() {
            Some(q) => Query::parse(q)?,
            None => Query::default(),
        };
        // While the daemon restores, only its status and metrics may be asked (and it
        // may be stopped): the stores and the workspace are not what they will be.
        if state.lifecycle.phase() == crate::lifecycle::Phase::Starting
            && !matches!(parts.uri.path(), "/v1/status" | "/v1/shutdown" | "/metrics")
        {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the daemon is starting (restoring or reconciling); retry shortly",
            ));
        }
        Ok(Self { grant, query })
    }
}

/// The `{key}` of a KV route, percent-decoded and validated. On `/v1/kv/batch` (whose
/// static route shadows the key `batch`) it is `batch`.
pub struct KeyParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for KeyParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let params = route_params(parts).await?;
        let key = match params.into_iter().find(|(k, _)| k == "key") {
            Some((_, v)) => v,
            None => "batch".to_string(),
        };
        crate::kv::validate::key(&key)?;
        Ok(Self(key))
    }
}

/// The named parameters of the matched route, percent-decoded. One that is not UTF-8
/// gets a JSON answer like every other error (not axum's plain text), with the code of
/// what it names: `invalid_key`, `invalid_path` (a file path) or `invalid_param`.
async fn route_params(parts: &mut Parts) -> Result<Vec<(String, String)>, ApiError> {
    use crate::kv::KvError;
    use axum::extract::path::ErrorKind;
    use axum::extract::rejection::PathRejection;
    let kind = |name: &str, message: String| -> ApiError {
        match name {
            "key" => KvError::InvalidKey(message),
            "path" => KvError::InvalidPath(message),
            _ => KvError::InvalidParam(message),
        }
        .into()
    };
    let params = Path::<Vec<(String, String)>>::from_request_parts(parts, &())
        .await
        .map(|p| p.0)
        .map_err(|e| {
            let message = e.body_text();
            let name = match &e {
                PathRejection::FailedToDeserializePathParams(f) => match f.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => key.as_str(),
                    _ => "",
                },
                _ => "",
            };
            kind(name, message)
        })?;
    // A `%` that starts no escape would be taken as itself, so that `%zz` and `%25zz`
    // named one key: refused, as an undecodable escape is.
    let raw = parts.uri.path().as_bytes();
    let stray = raw.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !raw
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if stray {
        let name = params
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|k| *k != "action");
        let message =
            "a `%` in the URL path must start an escape such as `%25` (a literal `%`)".to_string();
        return Err(kind(name.unwrap_or(""), message));
    }
    Ok(params)
}

/// The `{*path}` of a file store route, percent-decoded (validated by the handler).
pub struct FilePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for FilePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let params = route_params(parts).await?;
        Ok(Self(
            params
                .into_iter()
                .map(|(_, v)| v)
                .next()
                .unwrap_or_default(),
        ))
    }
}

/// The `{action}` of `/v1/kv/{key}/{action}`.
pub struct ActionParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ActionParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let params = route_params(parts).await?;
        match params.into_iter().find(|(k, _)| k == "action") {
            Some((_, v)) => Ok(Self(v)),
            None => Err(ApiError::not_found("no such route")),
        }
    }
}

/// Waits for a barrier (`work`, at most `limit`) on remote storage, as
/// [`unless_stopping`].
pub async fn wait_unless_stopping<T>(
    state: &AppState,
    limit: std::time::Duration,
    work: impl std::future::Future<Output = T>,
    message: &'static str,
) -> Result<Result<T, tokio::time::error::Elapsed>, ApiError> {
    unless_stopping(state, tokio::time::timeout(limit, work), message).await
}

/// Runs `work` (waiting for remote storage) unless this daemon loses the conversation
/// first: `None` then, at once. A daemon another one took the conversation from writes
/// nothing more, so waiting would only end at the caller's timeout.
pub async fn unless_lost<T>(
    state: &AppState,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let ended = state.owner.ended();
    tokio::select! {
        biased;
        _ = ended.cancelled() => None,
        w = work => Some(w),
    }
}

/// Runs `work` for a request unless the daemon is stopping: once a stop is asked for,
/// the request is answered 503 `shutting_down` with `message` (before the work begins,
/// or by giving it up), rather than left to the server's drain, its writes keeping the
/// conversation from being released.
pub async fn unless_stopping<T>(
    state: &AppState,
    work: impl std::future::Future<Output = T>,
    message: &'static str,
) -> Result<T, ApiError> {
    let shutdown = state.lifecycle.shutdown.clone();
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            message,
        )),
        w = work => Ok(w),
    }
}

/// Parses a body that must be a JSON object into `T`: malformed JSON is
/// `invalid_json`; another JSON value (an array would fill a struct by position), or a
/// field of the wrong type or name, is `invalid_param`.
pub fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = serde_json::from_slice(bytes).map_err(|e| -> ApiError {
        if e.is_data() {
            ApiError::invalid_param(format!("body: {e}"))
        } else {
            crate::kv::validate::json_error(e).into()
        }
    })?;
    crate::kv::ops::require_object(bytes)?;
    Ok(value)
}

/// The body length a request announces with `Content-Length`, if it does (readably).
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

/// Reads a request body of at most `limit` bytes. A declared length over the limit is
/// refused before anything is read; a body without one is cut off at the limit.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: u64) -> Result<Bytes, ApiError> {
    read_body_within(headers, body, limit, server::IDLE_TIMEOUT).await
}

/// Request body bytes read into memory so far by the reads under way, across every
/// connection (see [`Reading`]).
static BODY_BYTES_READING: AtomicU64 = AtomicU64::new(0);

/// The most request body bytes held by reads under way at once: past it, a body that
/// grows is refused with 503 `busy` (unless it is the only one being read, so that any
/// body within its own limit can always be sent). Without it, clients that each
/// half-send a large body would fill memory (each within its own limit), and the
/// sidecar's memory limit would kill it, final sync and all.
const BODY_BYTES_READING_MAX: u64 = 256 << 20;

/// The bytes of one body read so far, counted in a total of all reads (such as
/// [`BODY_BYTES_READING`]) until dropped.
struct Reading {
    total: &'static AtomicU64,
    max: u64,
    n: u64,
}

impl Reading {
    /// Counts `n` more bytes; `false` (counting nothing) when that passes `max` while
    /// other bodies are being read.
    fn grow(&mut self, n: u64) -> bool {
        let before = self.total.fetch_add(n, Ordering::SeqCst);
        let others = before.saturating_sub(self.n);
        if others > 0 && before + n > self.max {
            self.total.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        self.n += n;
        true
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.total.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// [`read_body`], giving up with 408 `timeout` when the body sends nothing for `idle`:
/// a client that announced a body and never sends it must not hold its connection
/// (and a file descriptor) for ever.
async fn read_body_within(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    idle: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let reading = Reading {
        total: &BODY_BYTES_READING,
        max: BODY_BYTES_READING_MAX,
        n: 0,
    };
    read_body_counted(headers, body, limit, idle, reading).await
}

/// [`read_body_within`], counting what it reads in `reading`.
async fn read_body_counted(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    idle: std::time::Duration,
    mut reading: Reading,
) -> Result<Bytes, ApiError> {
    let declared = declared_length(headers);
    if let Some(n) = declared
        && n > limit
    {
        return Err(ApiError::too_large("request body", limit, n));
    }
    let mut limited = http_body_util::Limited::new(body, limit as usize);
    let mut chunks: Vec<Bytes> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle, limited.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!("the request body sent nothing for {} s", idle.as_secs_f64()),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ApiError::too_large(
                    "request body",
                    limit,
                    declared.unwrap_or(limit + 1),
                ));
            }
            Ok(Some(Err(e))) => {
                return Err(ApiError::invalid_param(format!(
                    "cannot read the request body: {e}"
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if !reading.grow(data.len() as u64) {
                return Err(ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    format!(
                        "too many request bodies are being read at once (over {} bytes); \
                         retry",
                        reading.max
                    ),
                ));
            }
            chunks.push(data);
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => chunks.concat().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_body_that_stalls_is_given_up() {
        let idle = std::time::Duration::from_millis(100);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        let stalled = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from("ab"))])
            .chain(futures::stream::pending());
        let started = std::time::Instant::now();
        let err = read_body_within(&headers, Body::from_stream(stalled), 100, idle)
            .await
            .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (axum::http::StatusCode::REQUEST_TIMEOUT, "timeout")
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // A slow body that keeps sending is read whole, in its chunks' order.
        let slow = futures::stream::iter(["ab", "cd", "e"]).then(|c| async move {
            tokio::time::sleep(std::time::Duration::from_millis(60)).await;
            Ok::<_, std::io::Error>(Bytes::from(c))
        });
        let got = read_body_within(&headers, Body::from_stream(slow), 100, idle)
            .await
            .unwrap();
        assert_eq!(got, "abcde");
    }

    /// Bodies being read hold at most so many bytes together: one that would pass the
    /// total while another is read gets 503 `busy`; alone, any body is read.
    #[tokio::test]
    async fn bodies_being_read_at_once_are_bounded_together() {
        static TOTAL: AtomicU64 = AtomicU64::new(0);
        let reading = || Reading {
            total: &TOTAL,
            max: 100,
            n: 0,
        };
        let idle = std::time::Duration::from_secs(5);
        let headers = HeaderMap::new();
        // One that sent 60 bytes and stalls.
        let stalled = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![b'a'; 60]))])
            .chain(futures::stream::pending());
        let first = tokio::spawn(async move {
            read_body_counted(&headers, Body::from_stream(stalled), 1000, idle, reading()).await
        });
        while TOTAL.load(Ordering::SeqCst) < 60 {
            tokio::task::yield_now().await;
        }
        let body = || Body::from(vec![b'b'; 60]);
        let headers = HeaderMap::new();
        let err = read_body_counted(&headers, body(), 1000, idle, reading())
            .await
            .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy")
        );
        assert_eq!(TOTAL.load(Ordering::SeqCst), 60);
        // Within the total, or alone (over it), a body is read.
        let small = read_body_counted(&headers, Body::from("ccc"), 1000, idle, reading());
        assert_eq!(small.await.unwrap(), "ccc");
        first.abort();
        let _ = first.await;
        assert_eq!(TOTAL.load(Ordering::SeqCst), 0);
        let big = Body::from(vec![b'd'; 500]);
        let got = read_body_counted(&headers, big, 1000, idle, reading()).await;
        assert_eq!(got.unwrap().len(), 500);
        assert_eq!(TOTAL.load(Ordering::SeqCst), 0);
    }
}
