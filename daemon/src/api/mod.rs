//! The HTTP API on the Unix socket: OpenAI-compatible `/v1/*`, the native `/api/*`, `/health`
//! and `/metrics`. Handlers validate, tokenize and hand jobs to the engine thread.

mod auth;
mod error;
mod native;
mod openai;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tileflow_engine::store::Store;

pub use auth::Peer;
pub use error::ApiError;

use crate::engine::{EngineHandle, ModelInfo};
use crate::metrics::{Metrics, RequestLabels};

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// The engine thread.
    pub engine: EngineHandle,
    /// Loaded models, for tokenizing on the API side.
    pub models: RwLock<BTreeMap<String, Arc<ModelInfo>>>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The model store.
    pub store: Store,
    /// Group whose members may use admin routes.
    pub admin_group: String,
    /// Per-request timeout (changes live on reload).
    pub request_timeout: RwLock<Duration>,
    /// How long SIGTERM waits for running requests (changes live).
    pub drain_grace: RwLock<Duration>,
    /// Largest request body (changes live).
    pub max_body_bytes: RwLock<u64>,
    /// When the daemon started.
    pub started: Instant,
    /// The compute device in use, as named in status.
    pub device: String,
}

impl AppState {
    /// A loaded model, or 404.
    pub fn model(&self, name: &str) -> Result<Arc<ModelInfo>, ApiError> {
        let models = self
            .models
            .read()
            .map_err(|_| ApiError::internal("model table poisoned"))?;
        models
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::model_not_found(name))
    }

    /// Every loaded model.
    pub fn loaded(&self) -> Vec<Arc<ModelInfo>> {
        self.models
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The per-request timeout in force.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
            .read()
            .map(|d| *d)
            .unwrap_or(Duration::from_secs(600))
    }

    /// Records a model as loaded.
    pub fn insert_model(&self, info: ModelInfo) {
        if let Ok(mut m) = self.models.write() {
            m.insert(info.name.clone(), Arc::new(info));
        }
    }

    /// Forgets a loaded model.
    pub fn remove_model(&self, name: &str) {
        if let Ok(mut m) = self.models.write() {
            m.remove(name);
        }
    }
}

/// A JSON body whose rejections are OpenAI error objects (400 naming the field, 413 over
/// `server.max_body_bytes`, 415 without a JSON content type).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return Err(ApiError {
                status: axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                kind: "invalid_request_error",
                code: None,
                message: "expected a JSON body with Content-Type: application/json".into(),
            });
        }
        let limit = state.max_body_bytes.read().map(|l| *l).unwrap_or(1 << 20);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError {
                status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                kind: "invalid_request_error",
                code: Some("body_too_large"),
                message: format!(
                    "the request body is larger than server.max_body_bytes ({limit} bytes)"
                ),
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::invalid_code("invalid_json", format!("invalid request body: {e}"))
        })
    }
}

/// Times one request and counts it when it ends (as "cancelled" if the client went away).
#[derive(Debug)]
pub struct RequestGuard {
    metrics: Arc<Metrics>,
    model: String,
    arrived: Instant,
    last_token: Option<Instant>,
    queued: bool,
    finished: bool,
}

impl RequestGuard {
    /// Starts timing a request to `model`.
    pub fn new(metrics: Arc<Metrics>, model: &str, arrived: Instant) -> RequestGuard {
        RequestGuard {
            metrics,
            model: model.to_string(),
            arrived,
            last_token: None,
            queued: false,
            finished: false,
        }
    }

    /// The job joined a batch.
    pub fn admitted(&mut self) {
        if !self.queued {
            self.queued = true;
            self.metrics
                .queue_time
                .observe(self.arrived.elapsed().as_secs_f64());
        }
    }

    /// A token arrived.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self
                .metrics
                .time_to_first_token
                .observe((now - self.arrived).as_secs_f64()),
            Some(t) => self
                .metrics
                .inter_token_latency
                .observe((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    /// The request ended for `reason`.
    pub fn finish(&mut self, reason: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.metrics
            .e2e_request_latency
            .observe(self.arrived.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                model: self.model.clone(),
                finish_reason: reason.to_string(),
            })
            .inc();
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}

/// The router of the Unix socket.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/api/models", get(native::list_models))
        .route("/api/models/import", post(native::import_model))
        .route(
            "/api/models/{name}",
            get(native::show_model).delete(native::remove_model),
        )
        .route("/api/models/{name}/load", post(native::load_model))
        .route("/api/models/{name}/unload", post(native::unload_model))
        .route("/api/status", get(native::status))
        .route("/api/cache", get(native::cache))
        .route("/health", get(native::health))
        .route("/metrics", get(native::metrics))
        .fallback(native::not_found)
        .method_not_allowed_fallback(native::method_not_allowed)
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The router of the optional loopback TCP listener: `/metrics` only.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(native::metrics))
        .fallback(native::not_found)
        .method_not_allowed_fallback(native::method_not_allowed)
        .with_state(state)
}
