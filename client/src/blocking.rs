//! The same client for code without an async runtime (tilectl): each call runs on a
//! current-thread runtime owned by the client; streams are iterators.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use tokio::runtime::Runtime;

use crate::error::ClientError;
use crate::native::{
    CacheReport, Health, ImportProgress, ImportRequest, ModelAction, ModelSummary, Status,
};
use crate::openai::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, ModelList,
};
use crate::stream::EventStream;

/// A blocking client of `tileflowd`; see [`crate::Client`] for what each call does. Not for
/// use inside an async runtime (it would block that runtime's thread).
#[derive(Debug)]
pub struct Client {
    inner: crate::Client,
    runtime: Runtime,
}

/// A streamed answer as an iterator of chunks (see [`EventStream`]).
#[derive(Debug)]
pub struct Chunks<'a, T> {
    runtime: &'a Runtime,
    stream: EventStream<T>,
}

impl<T: DeserializeOwned> Iterator for Chunks<'_, T> {
    type Item = Result<T, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.runtime.block_on(self.stream.next())
    }
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Client {
            inner: crate::Client::new(socket),
            runtime,
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        self.inner.socket()
    }

    /// The async client underneath.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// `GET /v1/models`.
    pub fn models(&self) -> Result<ModelList, ClientError> {
        self.runtime.block_on(self.inner.models())
    }

    /// `POST /v1/completions`, whole answer.
    pub fn completions(&self, r: &CompletionRequest) -> Result<CompletionResponse, ClientError> {
        self.runtime.block_on(self.inner.completions(r))
    }

    /// `POST /v1/completions` streamed.
    pub fn completions_stream(
        &self,
        r: &CompletionRequest,
    ) -> Result<Chunks<'_, CompletionResponse>, ClientError> {
        let stream = self.runtime.block_on(self.inner.completions_stream(r))?;
        Ok(self.chunks(stream))
    }

    /// `POST /v1/chat/completions`, whole answer.
    pub fn chat(&self, r: &ChatCompletionRequest) -> Result<ChatCompletionResponse, ClientError> {
        self.runtime.block_on(self.inner.chat(r))
    }

    /// `POST /v1/chat/completions` streamed.
    pub fn chat_stream(
        &self,
        r: &ChatCompletionRequest,
    ) -> Result<Chunks<'_, ChatCompletionResponse>, ClientError> {
        let stream = self.runtime.block_on(self.inner.chat_stream(r))?;
        Ok(self.chunks(stream))
    }

    /// `GET /api/models`.
    pub fn list_models(&self) -> Result<Vec<ModelSummary>, ClientError> {
        self.runtime.block_on(self.inner.list_models())
    }

    /// `GET /api/models/{name}`.
    pub fn show_model(&self, name: &str) -> Result<ModelSummary, ClientError> {
        self.runtime.block_on(self.inner.show_model(name))
    }

    /// `POST /api/models/{name}/load`.
    pub fn load_model(&self, name: &str) -> Result<ModelAction, ClientError> {
        self.runtime.block_on(self.inner.load_model(name))
    }

    /// `POST /api/models/{name}/unload`.
    pub fn unload_model(&self, name: &str) -> Result<ModelAction, ClientError> {
        self.runtime.block_on(self.inner.unload_model(name))
    }

    /// `DELETE /api/models/{name}`.
    pub fn remove_model(&self, name: &str) -> Result<ModelAction, ClientError> {
        self.runtime.block_on(self.inner.remove_model(name))
    }

    /// `POST /api/models/import` with NDJSON progress.
    pub fn import_model(
        &self,
        r: &ImportRequest,
        on_progress: impl FnMut(&ImportProgress),
    ) -> Result<String, ClientError> {
        self.runtime
            .block_on(self.inner.import_model(r, on_progress))
    }

    /// `GET /api/status`.
    pub fn status(&self) -> Result<Status, ClientError> {
        self.runtime.block_on(self.inner.status())
    }

    /// `GET /api/cache`.
    pub fn cache(&self) -> Result<CacheReport, ClientError> {
        self.runtime.block_on(self.inner.cache())
    }

    /// `GET /health`.
    pub fn health(&self) -> Result<Health, ClientError> {
        self.runtime.block_on(self.inner.health())
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        self.runtime.block_on(self.inner.metrics())
    }

    fn chunks<T>(&self, stream: EventStream<T>) -> Chunks<'_, T> {
        Chunks {
            runtime: &self.runtime,
            stream,
        }
    }
}
