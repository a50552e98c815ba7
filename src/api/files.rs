//! File store routes: `PUT|GET|HEAD|DELETE /v1/files/{path}` and `GET /v1/files`.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::json_ok;
use super::{ApiError, AppState, Ctx, FilePath, read_body, unless_lost, wait_unless_stopping};
use crate::auth::Scope;
use crate::files::validate_path;

/// How long `PUT ...?sync=true` waits for remote storage before answering 504 (the file
/// is stored locally either way and keeps being retried).
const SYNC_WAIT: Duration = Duration::from_secs(60);

fn checked(state: &AppState, path: &str) -> Result<(), ApiError> {
    validate_path(path, &state.config.conversation_prefix()).map_err(ApiError::from)
}

pub async fn put_file(
    State(state): State<AppState>,
    ctx: Ctx,
    FilePath(path): FilePath,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::FilesWrite)?;
    ctx.query.allow(&["if_absent", "sync"])?;
    let if_absent = ctx.query.flag("if_absent")?;
    let sync = ctx.query.flag("sync")?;
    checked(&state, &path)?;
    let limit = state.config.files.max_file_bytes;
    let data = read_body(&headers, body, limit).await.map_err(|e| {
        if e.code == "too_large" {
            let current = e
                .extra
                .get("current_size_bytes")
                .and_then(|v| v.as_u64())
                .unwrap_or(limit + 1);
            ApiError::too_large("file", limit, current)
        } else {
            e
        }
    })?;
    let size = data.len();
    let (created, _) = state.files.put(&path, data, if_absent).await?;
    if sync {
        // As `POST /v1/sync`: a conversation lost is said at once, not after SYNC_WAIT.
        let waited = wait_unless_stopping(
            &state,
            SYNC_WAIT,
            unless_lost(&state, state.replica.flush()),
            "the file is stored locally; the daemon is stopping and its final sync carries it",
        )
        .await?;
        match waited {
            Ok(None) => return Err(super::system::conversation_lost(&state)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    format!("the file is stored locally but not in remote storage: {e}"),
                ));
            }
            Err(_) => {
                let last = state.replica.status().last_error;
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!(
                        "the file is stored locally but did not reach remote storage within {} s{}; it is retried in the background",
                        SYNC_WAIT.as_secs(),
                        last.map(|e| format!(" (last replication error: {e})"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_ok(
        status,
        json!({"path": path, "size": size, "created": created, "synced": sync}),
    ))
}

pub async fn get_file(
    State(state): State<AppState>,
    ctx: Ctx,
    FilePath(path): FilePath,
) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::FilesRead)?;
    ctx.query.allow(&[])?;
    checked(&state, &path)?;
    match state.files.get(&path).await? {
        Some(data) => {
            let mut resp = (StatusCode::OK, data).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(resp)
        }
        None => Err(ApiError::not_found(format!("file `{path}` does not exist"))),
    }
}

pub async fn delete_file(
    State(state): State<AppState>,
    ctx: Ctx,
    FilePath(path): FilePath,
) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::FilesWrite)?;
    ctx.query.allow(&[])?;
    checked(&state, &path)?;
    let (deleted, _) = state.files.delete(&path).await?;
    Ok(json_ok(StatusCode::OK, json!({"deleted": deleted})))
}

/// `/v1/files/` with any method: the path is empty.
/// `/v1/files/`: an empty path, once the caller is authenticated (`Ctx`).
pub async fn empty_path(_: Ctx) -> ApiError {
    crate::kv::KvError::InvalidPath("invalid file path: the path is empty".into()).into()
}

pub async fn list_files(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::FilesRead)?;
    ctx.query.allow(&["prefix"])?;
    let prefix = ctx.query.get("prefix").unwrap_or("");
    let paths = state.files.list(prefix).await?;
    Ok(json_ok(StatusCode::OK, json!({"paths": paths})))
}
