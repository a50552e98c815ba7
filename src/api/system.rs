//! Health, readiness, metrics, status and shutdown routes.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::json_ok;
use super::{ApiError, AppState, Ctx};
use crate::auth::Scope;
use crate::lifecycle::Phase;

pub async fn healthz() -> Response {
    json_ok(StatusCode::OK, json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.lifecycle.phase() {
        Phase::Ready if let Some(why) = state.kv.broken() => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why).into_response()
        }
        Phase::Ready => json_ok(StatusCode::OK, json!({"status": "ready"})),
        Phase::Starting => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the daemon is starting",
        )
        .into_response(),
        Phase::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is shutting down",
        )
        .into_response(),
    }
}

pub async fn metrics(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    // The lag as of now, also while a round hangs (the engine sets it between rounds).
    state.metrics.sync_lag.set(state.sync.lag().as_secs_f64());
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response())
}

pub async fn status(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    ctx.query.allow(&[])?;
    let (namespaces, bytes) = state.kv.stats().await?;
    let (file_count, file_bytes) = state.files.stats().await?;
    let replica = state.replica.status();
    let sync = state.sync.status();
    let git = state.git.status().await;
    let snapshots = state.snapshots.status();
    let owner = state.owner.status();
    let kv_broken = state.kv.broken();
    let phase = match state.lifecycle.phase() {
        Phase::Starting => "restoring",
        Phase::ShuttingDown => "shutting_down",
        // Remote storage refuses or ignores this daemon (bad credentials, an outage
        // since start): nothing reaches it, whatever the mirror has to do.
        Phase::Ready
            if sync.degraded
                || !owner.writes_allowed
                || replica.last_error.is_some()
                || kv_broken.is_some() =>
        {
            "degraded"
        }
        Phase::Ready => "ready",
    };
    Ok(json_ok(
        StatusCode::OK,
        json!({
            "state": phase,
            "user": state.config.identity.user,
            "conversation": state.config.identity.conversation,
            "uptime_s": state.started.elapsed().as_secs(),
            "workspace": {
                "path": state.config.workspace,
                "available": sync.workspace_available,
                "files": sync.files,
                "bytes": sync.bytes,
                "skipped_files": sync.skipped_files,
                "manifest_generation": sync.generation,
            },
            "sync": {
                "pending_files": sync.pending_files,
                "full_rescan_pending": sync.full_rescan_pending,
                "last_sync_at": sync.last_sync_at,
                "lag_ms": sync.lag_ms,
                "debounce_ms": sync.debounce_ms,
                "burst": sync.burst,
                "last_error": sync.last_error,
                "degraded": sync.degraded,
                "watch_mode": sync.watch_mode,
                "held_deletes": sync.held_deletes,
            },
            "kv": {"namespaces": namespaces, "bytes": bytes, "last_error": kv_broken},
            "files": {"count": file_count, "bytes": file_bytes},
            "replication": replica,
            "restore": state.lifecycle.restored(),
            "snapshots": snapshots,
            "git": git,
            "owner": owner,
        }),
    ))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct SyncBody {
    timeout_s: Option<u64>,
    confirm_deletes: bool,
}

/// 409 `conversation_lost`: another daemon took the conversation over (or it was
/// released, at a stop), so nothing from here reaches remote storage any more.
pub(super) fn conversation_lost(state: &AppState) -> ApiError {
    let owner = state.owner.status();
    if owner.state != crate::owner::OwnerState::Lost {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the daemon is stopping: its final sync carries on with what this sync waited for",
        );
    }
    let holder = owner
        .holder
        .map_or_else(|| "another daemon".to_string(), |h| h.to_string());
    ApiError::new(
        StatusCode::CONFLICT,
        "conversation_lost",
        format!(
            "{holder} took this conversation over: nothing from this daemon reaches remote \
             storage any more (restart it to wait for the conversation, or stop it)"
        ),
    )
}

/// Longest `timeout_s` of `POST /v1/sync`.
const SYNC_MAX_TIMEOUT_S: u64 = 3600;

/// A barrier: answers once everything changed before the call is in remote storage.
pub async fn sync(
    State(state): State<AppState>,
    ctx: Ctx,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    ctx.query.allow(&[])?;
    let bytes = super::read_body(&headers, body, 4096).await?;
    let req: SyncBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        SyncBody::default()
    } else {
        super::json_object(&bytes)?
    };
    let timeout = req.timeout_s.unwrap_or(60);
    if timeout == 0 || timeout > SYNC_MAX_TIMEOUT_S {
        return Err(ApiError::invalid_param(format!(
            "`timeout_s` must be 1-{SYNC_MAX_TIMEOUT_S}"
        )));
    }
    // The three parts run side by side; which finished tells a timeout's answer.
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let (ws_done, stores_done) = (AtomicBool::new(false), AtomicBool::new(false));
    let git_done = AtomicBool::new(false);
    let workspace = async {
        let stats = state.sync.sync(req.confirm_deletes).await?;
        ws_done.store(true, Relaxed);
        Ok::<_, crate::sync::SyncError>(stats)
    };
    // Git bundles of the repositories that changed (a sync ignores git.interval).
    // Remote storage failing is tried again (the sync waits for it, up to its
    // timeout); a repository that cannot be read is logged, as in the periodic pass.
    let bundles = async {
        // Each failing repository is logged by the bundler.
        let bytes = match state.git.write_changed_until_stored().await {
            Ok(round) => round.bundles.iter().map(|b| b.bytes).sum::<u64>(),
            Err(e) => {
                tracing::warn!(error = %e, "sync: git bundles skipped");
                0
            }
        };
        git_done.store(true, Relaxed);
        bytes
    };
    // KV exports and the file store.
    let stores = async {
        let r = state.replica.flush().await.map_err(|e| {
            crate::sync::SyncError::Remote(format!("kv and file store replication: {e}"))
        })?;
        stores_done.store(true, Relaxed);
        Ok::<_, crate::sync::SyncError>(r.bytes_uploaded)
    };
    // A daemon another one took the conversation from cannot succeed: says so at once.
    let work = super::unless_lost(&state, async {
        let (ws, git_bytes, store_bytes) = tokio::join!(workspace, bundles, stores);
        ws.and_then(|mut stats| {
            stats.bytes_uploaded += git_bytes + store_bytes?;
            Ok(stats)
        })
    });
    let waited = super::wait_unless_stopping(
        &state,
        std::time::Duration::from_secs(timeout),
        work,
        "the daemon is stopping: its final sync carries on with what this sync waited for",
    )
    .await?;
    match waited {
        Ok(None) => Err(conversation_lost(&state)),
        Ok(Some(Ok(stats))) => {
            // A 200 with deletions a guard holds back says so.
            let mut body = json!(stats);
            body["held_deletes"] = json!(state.sync.status().held_deletes);
            Ok(json_ok(StatusCode::OK, body))
        }
        Ok(Some(Err(crate::sync::SyncError::WorkspaceUnavailable(m)))) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "workspace_unavailable",
            m,
        )),
        Ok(Some(Err(e))) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            e.to_string(),
        )),
        Err(_) => {
            let s = state.sync.status();
            let (workspace, stores) = (!ws_done.load(Relaxed), !stores_done.load(Relaxed));
            let git = !git_done.load(Relaxed);
            // The last error of the first part behind that has one.
            let last_error = workspace
                .then_some(s.last_error)
                .flatten()
                .or_else(|| stores.then(|| state.replica.status().last_error).flatten())
                .or_else(|| git.then(|| state.git.waiting_on()).flatten());
            Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "not everything reached remote storage within {timeout} s{}",
                    last_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ),
            )
            .with(
                "pending",
                json!({
                    "files": s.pending_files,
                    "full_rescan": s.full_rescan_pending,
                    "workspace": workspace,
                    "stores": stores,
                    "git": git,
                }),
            ))
        }
    }
}

/// `POST /v1/shutdown`: 202 at once; with `wait=true`, 200 once the final sync is over,
/// with the daemon's exit code (0, or 75 when it was cut short) and what was left.
pub async fn shutdown(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    ctx.query.allow(&["wait"])?;
    let wait = ctx.query.flag("wait")?;
    tracing::info!(wait, "shutdown requested over the API");
    state.lifecycle.request_shutdown();
    if !wait {
        return Ok(json_ok(
            StatusCode::ACCEPTED,
            json!({"status": "shutting_down"}),
        ));
    }
    let (code, left) = state.lifecycle.final_sync_outcome().await;
    Ok(json_ok(
        StatusCode::OK,
        json!({"status": "stopping", "exit_code": code, "left": left}),
    ))
}
