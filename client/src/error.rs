//! What can go wrong talking to the daemon.

use std::io;
use std::path::PathBuf;

use crate::openai::ErrorDetail;

/// An error of a [`Client`](crate::Client) call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket (or it may not be opened): the message says which socket
    /// and what to check; the source is the OS error.
    #[error("cannot connect to {}: {}", path.display(), connect_hint(source))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon answered with its error object (a non-2xx status, or an error reported in
    /// the middle of a stream).
    #[error("{} ({})", detail.message, api_tag(*status, detail))]
    Api {
        /// HTTP status of the answer (None for an error reported in the middle of a stream,
        /// whose status was 200).
        status: Option<u16>,
        /// The server's error object.
        detail: ErrorDetail,
    },
    /// The HTTP exchange on the socket failed (the daemon closed the connection, …).
    #[error("HTTP exchange with tileflowd on {} failed ({route})", path.display())]
    Http {
        /// The socket path.
        path: PathBuf,
        /// The route.
        route: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The answer is not what the API promises.
    #[error("unexpected answer from {route}: {message}")]
    Protocol {
        /// The route.
        route: String,
        /// What was wrong with it.
        message: String,
    },
    /// The answer's JSON does not decode as the expected type.
    #[error("cannot decode the answer of {route}")]
    Decode {
        /// The route.
        route: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The blocking client could not start its runtime.
    #[error("cannot start the client's async runtime")]
    Runtime(#[source] io::Error),
}

impl ClientError {
    /// The server's error object, if the daemon answered with one.
    pub fn api_error(&self) -> Option<&ErrorDetail> {
        match self {
            ClientError::Api { detail, .. } => Some(detail),
            _ => None,
        }
    }

    /// Whether the daemon could not be reached at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

/// "404 not_found_error, model_not_found": the status, type and code of an error object.
fn api_tag(status: Option<u16>, detail: &ErrorDetail) -> String {
    let mut tag = status.map(|s| format!("{s} ")).unwrap_or_default();
    tag.push_str(&detail.kind);
    if let Some(code) = &detail.code {
        tag.push_str(", ");
        tag.push_str(code);
    }
    tag
}

fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            "permission denied (the socket is for root and its group, `tileflow` by default)"
        }
        _ => "is tileflowd running?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_error_names_the_socket() {
        let e = ClientError::Connect {
            path: "/run/tileflowd.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(
            e.to_string(),
            "cannot connect to /run/tileflowd.sock: is tileflowd running?"
        );
        assert!(e.is_connect());
    }

    #[test]
    fn api_error_shows_message_type_and_code() {
        let e = ClientError::Api {
            status: Some(404),
            detail: ErrorDetail {
                message: "model \"x\" is not loaded".into(),
                kind: "not_found_error".into(),
                code: Some("model_not_found".into()),
            },
        };
        assert_eq!(
            e.to_string(),
            "model \"x\" is not loaded (404 not_found_error, model_not_found)"
        );
        assert_eq!(
            e.api_error().map(|d| d.kind.as_str()),
            Some("not_found_error")
        );
        let mid_stream = ClientError::Api {
            status: None,
            detail: ErrorDetail {
                message: "m".into(),
                kind: "import_error".into(),
                code: None,
            },
        };
        assert_eq!(mid_stream.to_string(), "m (import_error)");
    }
}
