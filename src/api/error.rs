//! The one error type at the HTTP edge: every non-2xx answer is
//! `{"error": code, "message": text, ...extra}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::auth::AuthError;
use crate::kv::KvError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn with(mut self, field: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(field.into(), value.into());
        self
    }

    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_param", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(what: &str, limit: u64, current: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{what} of {current} bytes exceeds the limit of {limit} bytes"),
        )
        .with("limit_bytes", limit)
        .with("current_size_bytes", current)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (see the daemon's log)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        body.extend(self.extra);
        let mut resp = (self.status, axum::Json(Value::Object(body))).into_response();
        if matches!(
            self.status,
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized(m) => Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m),
            AuthError::Forbidden(m) => Self::new(StatusCode::FORBIDDEN, "forbidden", m),
        }
    }
}

impl From<KvError> for ApiError {
    fn from(e: KvError) -> Self {
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            KvError::InvalidJson(_) => Self::new(S::BAD_REQUEST, "invalid_json", msg),
            KvError::InvalidKey(_) => Self::new(S::BAD_REQUEST, "invalid_key", msg),
            KvError::InvalidPath(_) => Self::new(S::BAD_REQUEST, "invalid_path", msg),
            KvError::InvalidParam(_) => Self::new(S::BAD_REQUEST, "invalid_param", msg),
            KvError::WrongType(_) => Self::new(S::BAD_REQUEST, "wrong_type", msg),
            KvError::ReservedKey(_) => Self::new(S::BAD_REQUEST, "reserved_key", msg),
            KvError::Overflow(_) => Self::new(S::BAD_REQUEST, "overflow", msg),
            KvError::NotFound(_) => Self::new(S::NOT_FOUND, "not_found", msg),
            KvError::PathNotFound(_) => Self::new(S::NOT_FOUND, "path_not_found", msg),
            KvError::VersionMismatch {
                key,
                expected,
                actual,
            } => {
                let e = Self::new(S::CONFLICT, "version_mismatch", msg)
                    .with("expected_version", expected)
                    .with("actual_version", actual);
                match key {
                    Some(key) => e.with("key", key),
                    None => e,
                }
            }
            KvError::Exists(_) => Self::new(S::CONFLICT, "exists", msg),
            KvError::NotExists(_) => Self::new(S::CONFLICT, "not_exists", msg),
            KvError::FileExists(_) => Self::new(S::PRECONDITION_FAILED, "exists", msg),
            KvError::TooLarge {
                what,
                limit_bytes,
                current_size_bytes,
            } => Self::too_large(what, limit_bytes, current_size_bytes),
            KvError::InvalidValue(_) => Self::new(S::UNPROCESSABLE_ENTITY, "invalid_value", msg),
            KvError::Busy => Self::new(S::SERVICE_UNAVAILABLE, "busy", msg),
            KvError::ShuttingDown => Self::new(S::SERVICE_UNAVAILABLE, "shutting_down", msg),
            KvError::Storage(_) | KvError::Internal(_) => {
                tracing::error!(error = %msg, "kv request failed");
                Self::internal()
            }
            KvError::Batch { index, source } => {
                let mut inner = ApiError::from(*source);
                inner.message = format!("operation {index}: {}", inner.message);
                inner.with("index", index)
            }
        }
    }
}

/// Answers for unknown routes and methods, in the same shape.
pub async fn no_route() -> ApiError {
    ApiError::not_found("no such route")
}

pub fn method_not_allowed() -> Response {
    let mut r = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
    .into_response();
    r.headers_mut().remove(header::RETRY_AFTER);
    r
}

pub fn json_ok(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

pub fn empty_json() -> Value {
    json!({})
}
