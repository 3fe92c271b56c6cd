//! One HTTP/1.1 exchange over the daemon's Unix socket: a fresh connection per request (the
//! daemon is local, so connecting costs microseconds, and a streamed answer owns its
//! connection until it ends).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::error::ClientError;
use crate::openai::ErrorBody;

/// The `Host` header of every request (as in the Python client's base URL).
pub const HOST_NAME: &str = "tileflowd";

/// Sends `method route` with an optional JSON body; returns the response of a 2xx status and
/// turns any other status into [`ClientError::Api`] (or `Protocol` when the body is not the
/// error object).
pub async fn send(
    socket: &Path,
    method: Method,
    route: &str,
    json: Option<Vec<u8>>,
) -> Result<Response<Incoming>, ClientError> {
    let http = |source| ClientError::Http {
        path: socket.to_path_buf(),
        route: route.to_string(),
        source,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection is driven beside the caller until the response body is consumed or
    // dropped; its errors surface through the request and the body.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::new(Full::new(Bytes::from(json.clone().unwrap_or_default())));
    *request.method_mut() = method;
    *request.uri_mut() = route.parse().map_err(|e| ClientError::Protocol {
        route: route.to_string(),
        message: format!("not a valid request path: {e}"),
    })?;
    let headers = request.headers_mut();
    headers.insert(HOST, HeaderValue::from_static(HOST_NAME));
    headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    if json.is_some() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let response = sender.send_request(request).await.map_err(http)?;
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let body = read_body(socket, route, response).await?;
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => Err(ClientError::Api {
            status: Some(status),
            detail: e.error,
        }),
        Err(_) => Err(ClientError::Protocol {
            route: route.to_string(),
            message: format!(
                "status {status} with a body that is not an error object: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        }),
    }
}

/// The whole body of `response`.
pub async fn read_body(
    socket: &Path,
    route: &str,
    response: Response<Incoming>,
) -> Result<Bytes, ClientError> {
    response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|source| ClientError::Http {
            path: socket.to_path_buf(),
            route: route.to_string(),
            source,
        })
}

/// A streamed body, read frame by frame.
#[derive(Debug)]
pub struct BodyReader {
    socket: PathBuf,
    route: String,
    body: Incoming,
}

impl BodyReader {
    /// Reads `response`'s body as it arrives.
    pub fn new(socket: &Path, route: &str, response: Response<Incoming>) -> BodyReader {
        BodyReader {
            socket: socket.to_path_buf(),
            route: route.to_string(),
            body: response.into_body(),
        }
    }

    /// The route this body answers.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The next piece of data, or `None` at the end of the body.
    pub async fn next_data(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(source)) => {
                    return Err(ClientError::Http {
                        path: self.socket.clone(),
                        route: self.route.clone(),
                        source,
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}
