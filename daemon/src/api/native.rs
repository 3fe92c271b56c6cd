//! The native API: `/api/models` (list, show, import, load, unload, rm), `/api/status`,
//! `/api/cache`, `/health`, `/metrics`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tileflow_client::native::CacheReport;
use tileflow_engine::pack::import::CheckpointSource;
use tileflow_engine::pack::write::{write_pack, Progress};
use tileflow_engine::store::{Store, StoreError, StoredModel};

use super::error::ApiError;
use super::{AppState, JsonBody, Peer};

fn admin(state: &AppState, peer: &Peer) -> Result<(), ApiError> {
    if peer.is_admin(&state.admin_group) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this route is for root and members of the {:?} group (peer uid {})",
            state.admin_group,
            peer.uid.map_or("unknown".to_string(), |u| u.to_string())
        )))
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
        StoreError::BadName { .. } => ApiError::invalid(e.to_string()),
        StoreError::Exists { .. } => ApiError {
            status: StatusCode::CONFLICT,
            kind: "conflict_error",
            code: None,
            message: e.to_string(),
        },
        other => ApiError::internal(other.to_string()),
    }
}

fn summary(m: &StoredModel, loaded: bool) -> Value {
    let mut v = m.summary_json();
    v["loaded"] = Value::Bool(loaded);
    v
}

/// `GET /api/models`: every model in the store.
pub async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let loaded: Vec<String> = state.loaded().iter().map(|m| m.name.clone()).collect();
    let store = state.store.clone();
    let list = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(store_error)?;
    let models: Vec<Value> = list
        .into_iter()
        .filter_map(Result::ok)
        .map(|m| {
            let is_loaded = loaded.contains(&m.name);
            summary(&m, is_loaded)
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

/// `GET /api/models/{name}`.
pub async fn show_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let loaded = state.model(&name).is_ok();
    let m = state.store.get(&name).map_err(store_error)?;
    let mut v = summary(&m, loaded);
    v["spec"] = serde_json::to_value(&m.manifest.spec).unwrap_or(Value::Null);
    Ok(Json(v))
}

/// `POST /api/models/{name}/load` (admin).
pub async fn load_model(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &peer)?;
    state.store.get(&name).map_err(store_error)?;
    let info = state.engine.load(&name).await.map_err(ApiError::internal)?;
    state.insert_model(info);
    Ok(Json(json!({ "status": "loaded", "name": name })))
}

/// `POST /api/models/{name}/unload` (admin).
pub async fn unload_model(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &peer)?;
    state.remove_model(&name);
    if state.engine.unload(&name).await {
        Ok(Json(json!({ "status": "unloaded", "name": name })))
    } else {
        Err(ApiError::model_not_found(&name))
    }
}

/// `DELETE /api/models/{name}` (admin): unloads it if loaded, then removes the pack.
pub async fn remove_model(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&state, &peer)?;
    state.remove_model(&name);
    state.engine.unload(&name).await;
    state.store.remove(&name).map_err(store_error)?;
    Ok(Json(json!({ "status": "removed", "name": name })))
}

/// `POST /api/models/import` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// A checkpoint directory on the daemon's host.
    pub path: PathBuf,
    /// The name in the store (default: the directory's name).
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /api/models/import` (admin): NDJSON progress lines, then a last line with the result
/// (an error mid-stream is that last line).
pub async fn import_model(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    JsonBody(req): JsonBody<ImportRequest>,
) -> Result<Response, ApiError> {
    admin(&state, &peer)?;
    let name = match req.name {
        Some(n) => n,
        None => req
            .path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "cannot name a model after {}; give \"name\"",
                    req.path.display()
                ))
            })?,
    };
    Store::check_name(&name).map_err(store_error)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let line = |v: Value| format!("{v}\n");
        let result = (|| -> Result<(), String> {
            let chain = |e: &dyn std::error::Error| tileflow_engine::error_chain(e);
            let source = CheckpointSource::open(&req.path).map_err(|e| chain(&e))?;
            let txn = store.begin(&name).map_err(|e| chain(&e))?;
            let progress = |p: Progress| {
                let _ = tx.send(line(
                    json!({"status": "importing", "done_bytes": p.done, "total_bytes": p.total}),
                ));
            };
            write_pack(&source, &name, txn.dir(), &progress).map_err(|e| chain(&e))?;
            txn.commit().map_err(|e| chain(&e))?;
            Ok(())
        })();
        let last = match result {
            Ok(()) => json!({"status": "success", "name": name}),
            Err(message) => {
                json!({"status": "error", "error": {"message": message, "type": "import_error", "code": null}})
            }
        };
        let _ = tx.send(line(last));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|l| (Ok::<_, std::convert::Infallible>(l), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

/// `GET /api/status`.
pub async fn status(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models = state.engine.status().await;
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device": state.device,
        "uptime_seconds": state.started.elapsed().as_secs(),
        "state_dir": state.store.models_dir().parent().map(|p| p.display().to_string()),
        "models": models,
    }))
}

/// `GET /api/cache`: each loaded model's expert tiers: the configuration in effect, the
/// device and host tiers, the storage path, prefetch outcomes, stalls and failures.
pub async fn cache(State(state): State<Arc<AppState>>) -> Json<CacheReport> {
    let models = state
        .engine
        .reports()
        .await
        .into_iter()
        .map(|r| r.cache)
        .collect();
    Json(CacheReport { models })
}

/// `GET /health`.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// A route that exists, asked with a method it does not serve (an error object, not an empty 405).
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        code: Some("method_not_allowed"),
        message: format!("{} does not accept {method}", uri.path()),
    }
}

/// Any other route.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}
