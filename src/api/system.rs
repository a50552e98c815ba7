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
    let (namespaces, bytes) = state.kv.stats().await?;
    let phase = match state.lifecycle.phase() {
        Phase::Starting => "restoring",
        Phase::Ready => "ready",
        Phase::ShuttingDown => "shutting_down",
    };
    Ok(json_ok(
        StatusCode::OK,
        json!({
            "state": phase,
            "user": state.config.identity.user,
            "conversation": state.config.identity.conversation,
            "uptime_s": state.started.elapsed().as_secs(),
            "kv": {"namespaces": namespaces, "bytes": bytes},
        }),
    ))
}

pub async fn shutdown(State(state): State<AppState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.grant.require(Scope::Admin)?;
    tracing::info!("shutdown requested over the API");
    state.lifecycle.request_shutdown();
    Ok(json_ok(
        StatusCode::ACCEPTED,
        json!({"status": "shutting_down"}),
    ))
}
