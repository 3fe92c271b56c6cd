//! The async client: one method per route, typed requests and answers.

use std::path::{Path, PathBuf};

use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ClientError;
use crate::framing::LineSplitter;
use crate::native::{
    CacheReport, Health, ImportProgress, ImportRequest, ModelAction, ModelListing, ModelSummary,
    Status,
};
use crate::openai::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ModelList,
};
use crate::stream::EventStream;
use crate::transport::{read_body, send, BodyReader};

/// The socket `tileflowd` listens on unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tileflowd.sock";

/// A client of `tileflowd` over its Unix socket. Cheap to clone; every call opens its own
/// connection, so calls may run concurrently. Calls must run inside a tokio runtime (see
/// [`blocking::Client`](crate::blocking::Client) for code without one).
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`. Nothing is opened until the first call.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/models`: the loaded models, OpenAI-style.
    pub async fn models(&self) -> Result<ModelList, ClientError> {
        self.get_json("/v1/models").await
    }

    /// `POST /v1/completions`, whole answer (`stream` is sent as false).
    pub async fn completions(
        &self,
        request: &CompletionRequest,
    ) -> Result<CompletionResponse, ClientError> {
        let request = CompletionRequest {
            stream: false,
            ..request.clone()
        };
        self.post_json("/v1/completions", &request).await
    }

    /// `POST /v1/completions` streamed: one chunk per token, the finish reason on the last
    /// (`stream` is sent as true).
    pub async fn completions_stream(
        &self,
        request: &CompletionRequest,
    ) -> Result<EventStream<CompletionResponse>, ClientError> {
        let request = CompletionRequest {
            stream: true,
            ..request.clone()
        };
        self.post_stream("/v1/completions", &request).await
    }

    /// `POST /v1/chat/completions`, whole answer.
    pub async fn chat(
        &self,
        request: &ChatCompletionRequest,
    ) -> Result<ChatCompletionResponse, ClientError> {
        let request = ChatCompletionRequest {
            stream: false,
            ..request.clone()
        };
        self.post_json("/v1/chat/completions", &request).await
    }

    /// `POST /v1/chat/completions` streamed: the first chunk carries the role, the others
    /// content deltas, the last the finish reason.
    pub async fn chat_stream(
        &self,
        request: &ChatCompletionRequest,
    ) -> Result<EventStream<ChatCompletionResponse>, ClientError> {
        let request = ChatCompletionRequest {
            stream: true,
            ..request.clone()
        };
        self.post_stream("/v1/chat/completions", &request).await
    }

    /// `GET /api/models`: every model in the store, loaded or not.
    pub async fn list_models(&self) -> Result<Vec<ModelSummary>, ClientError> {
        Ok(self.get_json::<ModelListing>("/api/models").await?.models)
    }

    /// `GET /api/models/{name}`: one model, with its spec.
    pub async fn show_model(&self, name: &str) -> Result<ModelSummary, ClientError> {
        self.get_json(&model_route(name, "")).await
    }

    /// `POST /api/models/{name}/load` (admin).
    pub async fn load_model(&self, name: &str) -> Result<ModelAction, ClientError> {
        self.post_empty(&model_route(name, "/load")).await
    }

    /// `POST /api/models/{name}/unload` (admin).
    pub async fn unload_model(&self, name: &str) -> Result<ModelAction, ClientError> {
        self.post_empty(&model_route(name, "/unload")).await
    }

    /// `DELETE /api/models/{name}` (admin): unloads it if loaded and removes its pack.
    pub async fn remove_model(&self, name: &str) -> Result<ModelAction, ClientError> {
        let route = model_route(name, "");
        let response = send(&self.socket, Method::DELETE, &route, None).await?;
        self.decode(&route, response).await
    }

    /// `POST /api/models/import` (admin): imports a checkpoint directory on the daemon's host,
    /// calling `on_progress` with each progress line; returns the stored model's name. An
    /// error reported as the last line is [`ClientError::Api`].
    pub async fn import_model(
        &self,
        request: &ImportRequest,
        mut on_progress: impl FnMut(&ImportProgress),
    ) -> Result<String, ClientError> {
        let route = "/api/models/import";
        let response = send(&self.socket, Method::POST, route, Some(to_json(request)?)).await?;
        let mut body = BodyReader::new(&self.socket, route, response);
        let mut lines = LineSplitter::default();
        let protocol = |message: String| ClientError::Protocol {
            route: route.into(),
            message,
        };
        loop {
            let (batch, end) = match body.next_data().await? {
                Some(bytes) => (lines.push(&bytes), false),
                None => (lines.finish().into_iter().collect(), true),
            };
            for line in batch.iter().filter(|l| !l.trim().is_empty()) {
                let p: ImportProgress =
                    serde_json::from_str(line).map_err(|source| ClientError::Decode {
                        route: route.into(),
                        source,
                    })?;
                match p.status.as_str() {
                    "success" => {
                        return Ok(p.name.or(request.name.clone()).unwrap_or_default());
                    }
                    "error" => {
                        let detail = p.error.ok_or_else(|| {
                            protocol("an error line without an error object".into())
                        })?;
                        return Err(ClientError::Api {
                            status: None,
                            detail,
                        });
                    }
                    _ => on_progress(&p),
                }
            }
            if end {
                return Err(protocol(
                    "the progress stream ended without a success or error line".into(),
                ));
            }
        }
    }

    /// `GET /api/status`: version, device, uptime and each loaded model's queue, KV and
    /// cache state.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get_json("/api/status").await
    }

    /// `GET /api/cache`: each loaded model's expert cache per tier.
    pub async fn cache(&self) -> Result<CacheReport, ClientError> {
        self.get_json("/api/cache").await
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get_json("/health").await
    }

    /// `GET /metrics`: the Prometheus (OpenMetrics) text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let response = send(&self.socket, Method::GET, "/metrics", None).await?;
        let body = read_body(&self.socket, "/metrics", response).await?;
        String::from_utf8(body.to_vec()).map_err(|e| ClientError::Protocol {
            route: "/metrics".into(),
            message: format!("not UTF-8: {e}"),
        })
    }

    async fn get_json<T: DeserializeOwned>(&self, route: &str) -> Result<T, ClientError> {
        let response = send(&self.socket, Method::GET, route, None).await?;
        self.decode(route, response).await
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        route: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let response = send(&self.socket, Method::POST, route, Some(to_json(body)?)).await?;
        self.decode(route, response).await
    }

    async fn post_empty<T: DeserializeOwned>(&self, route: &str) -> Result<T, ClientError> {
        let response = send(&self.socket, Method::POST, route, None).await?;
        self.decode(route, response).await
    }

    async fn post_stream<B: Serialize, T: DeserializeOwned>(
        &self,
        route: &str,
        body: &B,
    ) -> Result<EventStream<T>, ClientError> {
        let response = send(&self.socket, Method::POST, route, Some(to_json(body)?)).await?;
        Ok(EventStream::new(BodyReader::new(
            &self.socket,
            route,
            response,
        )))
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        route: &str,
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<T, ClientError> {
        let body = read_body(&self.socket, route, response).await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
            route: route.to_string(),
            source,
        })
    }
}

fn to_json<B: Serialize>(body: &B) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(body).map_err(|source| ClientError::Decode {
        route: "(request body)".into(),
        source,
    })
}

/// `/api/models/{name}{suffix}` with the name percent-encoded, so that no name can reach
/// another route.
fn model_route(name: &str, suffix: &str) -> String {
    let mut route = String::from("/api/models/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            route.push(char::from(b));
        } else {
            route.push_str(&format!("%{b:02X}"));
        }
    }
    route.push_str(suffix);
    route
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_one_path_segment() {
        assert_eq!(model_route("olmoe", "/load"), "/api/models/olmoe/load");
        assert_eq!(model_route("a/../b c", ""), "/api/models/a%2F..%2Fb%20c");
    }
}
