//! Every non-2xx answer is an OpenAI error object with a stable `type` per kind of error.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tileflow_client::openai::{ErrorBody, ErrorDetail};
use tileflow_engine::sched::SubmitError;

use crate::engine::Refusal;

/// An API error: status, stable type, optional code, message naming the input.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable type (also the label of error metrics).
    pub kind: &'static str,
    /// Finer code.
    pub code: Option<&'static str>,
    /// Message.
    pub message: String,
}

impl ApiError {
    /// 400 invalid_request_error.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }

    /// 400 with a code.
    pub fn invalid_code(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some(code),
            ..ApiError::invalid(message)
        }
    }

    /// 404 for a model.
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: Some("model_not_found"),
            message: format!(
                "model {model:?} is not loaded (load it with `tilectl model load {model}`)"
            ),
        }
    }

    /// 404 for anything else.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: None,
            message: message.into(),
        }
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            code: None,
            message: message.into(),
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "engine_error",
            code: None,
            message: message.into(),
        }
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "unavailable_error",
            code: None,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                code: self.code.map(str::to_string),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::NotLoaded(m) => ApiError::model_not_found(&m),
            Refusal::Gone => ApiError::unavailable("the daemon is shutting down"),
            Refusal::Submit(e) => {
                let message = e.to_string();
                match e {
                    SubmitError::QueueFull(_) => ApiError {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        kind: "rate_limit_error",
                        code: Some("queue_full"),
                        message,
                    },
                    SubmitError::ContextLength { .. } | SubmitError::TooLarge { .. } => {
                        ApiError::invalid_code("context_length_exceeded", message)
                    }
                    SubmitError::TokenOutOfRange { .. } => {
                        ApiError::invalid_code("invalid_token_id", message)
                    }
                    SubmitError::EmptyPrompt | SubmitError::Params(_) => ApiError::invalid(message),
                }
            }
        }
    }
}
