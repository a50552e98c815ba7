//! Snapshot and git bundle routes: `POST/GET /v1/snapshots`, `POST /v1/git/bundle`.
//! All need the `admin` scope when auth is on.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::error::json_ok;
use super::{ApiError, AppState, Ctx};
use crate::auth::Scope;
use crate::gitbundle::GitError;
use crate::snapshot::SnapshotError;

impl From<SnapshotError> for ApiError {
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::Workspace { .. } => {
                ApiError::new(StatusCode::CONFLICT, "workspace_unavailable", e.to_string())
            }
            SnapshotError::Remote(_) => {
                tracing::warn!(error = %e, "snapshot request failed");
                ApiError::new(StatusCode::BAD_GATEWAY, "remote_error", e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "snapshot request failed");
                ApiError::internal()
            }
        }
    }
}

impl From<GitError> for ApiError {
    fn from(e: GitError) -> Self {
        match e {
            GitError::Io { .. } => {
                ApiError::new(StatusCode::CONFLICT, "workspace_unavailable", e.to_string())
            }
            GitError::Remote(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "remote_error", e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "git bundle request failed");
                ApiError::internal()
            }
        }
    }
}

/// Longest `GET /v1/snapshots` waits for remote storage.
const LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /v1/snapshots`: takes a snapshot now.
pub async fn take_snapshot(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    ctx.query.allow(&[])?;
    let taken = super::unless_stopping(
        &state,
        state.snapshots.take(),
        "the daemon is stopping: a snapshot is no part of its final sync, and none is taken now",
    )
    .await??;
    Ok(json_ok(StatusCode::CREATED, json!(taken)))
}

/// `GET /v1/snapshots`: stored snapshots, newest first.
pub async fn list_snapshots(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    ctx.query.allow(&[])?;
    // A listing is quick or the remote is in trouble: no client waits out the SDK's
    // retries of a server that hangs.
    let listed = tokio::time::timeout(LIST_TIMEOUT, state.snapshots.list())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "remote_error",
                format!(
                    "remote storage did not list the snapshots within {} s",
                    LIST_TIMEOUT.as_secs()
                ),
            )
        })??;
    Ok(json_ok(StatusCode::OK, json!({"snapshots": listed})))
}

/// `POST /v1/git/bundle`: writes every repository's bundle now. A repository whose
/// bundle fails is listed in `errors`; the others are still written.
pub async fn write_bundles(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    ctx.query.allow(&[])?;
    let round = super::unless_stopping(
        &state,
        state.git.write_all(true),
        "the daemon is stopping: its final sync writes the bundles that changed",
    )
    .await??;
    // Nothing written, and only because remote storage failed: the route's 502 (a
    // repository that cannot be read is listed, and the others' bundles still count).
    if round.bundles.is_empty()
        && let Some(first) = round.errors.first()
        && round.errors.iter().all(|f| f.remote)
    {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "remote_error",
            format!("remote storage failed: {}", first.error),
        )
        .with("errors", json!(round.errors)));
    }
    Ok(json_ok(
        StatusCode::OK,
        json!({"bundles": round.bundles, "errors": round.errors}),
    ))
}
