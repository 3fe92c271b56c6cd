//! Streamed answers: the SSE chunks of `/v1/*` with `stream: true`.

use std::collections::VecDeque;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::error::ClientError;
use crate::framing::SseParser;
use crate::openai::ErrorBody;
use crate::transport::BodyReader;

/// The chunks of a streamed completion or chat completion, in order. Ends after the
/// server's `data: [DONE]`; an error object sent mid-stream is returned as
/// [`ClientError::Api`], and a stream cut before `[DONE]` as [`ClientError::Protocol`].
#[derive(Debug)]
pub struct EventStream<T> {
    body: BodyReader,
    parser: SseParser,
    pending: VecDeque<String>,
    finished: bool,
    chunk: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> EventStream<T> {
    pub(crate) fn new(body: BodyReader) -> EventStream<T> {
        EventStream {
            body,
            parser: SseParser::default(),
            pending: VecDeque::new(),
            finished: false,
            chunk: PhantomData,
        }
    }

    /// The next chunk; `None` once the stream has ended (or failed).
    pub async fn next(&mut self) -> Option<Result<T, ClientError>> {
        if self.finished {
            return None;
        }
        let result = self.next_inner().await;
        if !matches!(result, Some(Ok(_))) {
            self.finished = true;
        }
        result
    }

    async fn next_inner(&mut self) -> Option<Result<T, ClientError>> {
        loop {
            if let Some(data) = self.pending.pop_front() {
                return self.decode(&data);
            }
            match self.body.next_data().await {
                Err(e) => return Some(Err(e)),
                Ok(Some(bytes)) => self.pending.extend(self.parser.push(&bytes)),
                Ok(None) => match self.parser.finish() {
                    Some(data) => self.pending.push_back(data),
                    None => {
                        return Some(Err(ClientError::Protocol {
                            route: self.body.route().to_string(),
                            message: "the stream ended before `data: [DONE]`".into(),
                        }))
                    }
                },
            }
        }
    }

    fn decode(&self, data: &str) -> Option<Result<T, ClientError>> {
        if data.trim() == "[DONE]" {
            return None;
        }
        let route = self.body.route();
        if let Ok(e) = serde_json::from_str::<ErrorBody>(data) {
            return Some(Err(ClientError::Api {
                status: None,
                detail: e.error,
            }));
        }
        Some(
            serde_json::from_str(data).map_err(|source| ClientError::Decode {
                route: route.to_string(),
                source,
            }),
        )
    }
}
