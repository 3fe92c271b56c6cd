//! `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use tileflow_client::openai::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatLogprobs,
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ModelCard,
    ModelList, Prompt, TokenLogprob, TopLogprob, Usage,
};
use tileflow_engine::sampler::SamplingParams;
use tileflow_engine::sched::{JobEvent, JobRequest};
use tileflow_engine::tokenizer::ChatMessage;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::{AppState, JsonBody, RequestGuard};
use crate::engine::ModelInfo;

/// `GET /v1/models`: the loaded models.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let data = state
        .loaded()
        .into_iter()
        .map(|m| ModelCard {
            id: m.name.clone(),
            object: "model".into(),
            created: m.created,
            owned_by: "tileflow".into(),
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{n:x}")
}

/// Sampling parameters shared by both endpoints, validated with the field named.
#[allow(clippy::too_many_arguments)]
fn sampling(
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<tileflow_client::openai::Stop>,
    logprobs: Option<u32>,
    ignore_eos: bool,
    n: Option<u32>,
) -> Result<SamplingParams, ApiError> {
    if let Some(n) = n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(format!(
            "n = {n} is not supported; only n = 1"
        )));
    }
    let top_k = match top_k {
        None => 0,
        Some(k) if k <= 0 => 0,
        Some(k) => usize::try_from(k).map_err(|_| ApiError::invalid("top_k is too large"))?,
    };
    let params = SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_k,
        top_p: top_p.unwrap_or(1.0),
        seed,
        max_tokens: max_tokens.unwrap_or(16),
        stop: stop.map(|s| s.into_vec()).unwrap_or_default(),
        stop_token_ids: Vec::new(),
        logprobs: logprobs.map(|n| n as usize),
        ignore_eos,
    };
    params
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(params)
}

/// What the engine produced for one job so far.
#[derive(Debug, Default)]
struct Collected {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    text: String,
    finish: Option<&'static str>,
}

/// Waits for every event of a job (non-streamed answers).
async fn collect(
    rx: &mut UnboundedReceiver<JobEvent>,
    guard: &mut RequestGuard,
) -> Result<Collected, ApiError> {
    let mut c = Collected::default();
    while let Some(event) = rx.recv().await {
        match event {
            JobEvent::Admitted => guard.admitted(),
            JobEvent::Token {
                id,
                logprob,
                top_logprobs,
                text,
            } => {
                guard.token();
                c.ids.push(id);
                c.logprobs.push(logprob);
                c.top.push(top_logprobs);
                c.text.push_str(&text);
            }
            JobEvent::Done { finish_reason, .. } => {
                c.finish = Some(finish_reason);
                guard.finish(finish_reason);
                return Ok(c);
            }
            JobEvent::Failed { kind, message } => {
                guard.finish(if kind == "timeout" {
                    "timeout"
                } else {
                    "error"
                });
                return Err(failed(kind, message));
            }
        }
    }
    guard.finish("error");
    Err(ApiError::unavailable("the engine dropped the request"))
}

fn failed(kind: &'static str, message: String) -> ApiError {
    if kind == "timeout" {
        ApiError {
            status: axum::http::StatusCode::GATEWAY_TIMEOUT,
            kind: "timeout_error",
            code: Some("request_timeout"),
            message,
        }
    } else {
        ApiError {
            kind: "engine_error",
            ..ApiError::internal(message)
        }
    }
}

/// A token as text for logprobs: its decoded piece, or `token_id:N`.
fn token_text(model: &ModelInfo, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        model.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

fn top_map(model: &ModelInfo, top: &[(u32, f32)], as_ids: bool) -> BTreeMap<String, f32> {
    top.iter()
        .map(|&(id, lp)| (token_text(model, id, as_ids), lp))
        .collect()
}

/// Submits a job and returns its events, counting the request.
async fn submit(
    state: &Arc<AppState>,
    model: &str,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<(UnboundedReceiver<JobEvent>, RequestGuard, usize), ApiError> {
    let arrived = Instant::now();
    let prompt_len = prompt.len();
    let deadline = Some(arrived + state.request_timeout());
    let mut guard = RequestGuard::new(state.metrics.clone(), model, arrived);
    match state
        .engine
        .submit(
            model,
            JobRequest {
                prompt,
                params,
                deadline,
            },
        )
        .await
    {
        Ok((_, rx)) => Ok((rx, guard, prompt_len)),
        Err(e) => {
            guard.finish("error");
            Err(e.into())
        }
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let model = state.model(&req.model)?;
    let mut params = sampling(
        req.max_tokens,
        req.temperature,
        req.top_p,
        req.top_k,
        req.seed,
        req.stop,
        req.logprobs,
        req.ignore_eos,
        req.n,
    )?;
    params.stop_token_ids = req.stop_token_ids.unwrap_or_default();
    let (prompt_ids, prompt_text) = match req.prompt {
        None => return Err(ApiError::invalid("missing field `prompt`")),
        Some(Prompt::Text(t)) => {
            let ids = model
                .tokenizer
                .encode(&t, true)
                .map_err(|e| ApiError::invalid(format!("prompt: {e}")))?;
            (ids, t)
        }
        Some(Prompt::Tokens(ids)) => {
            let text = model.tokenizer.decode(&ids, false).unwrap_or_default();
            (ids, text)
        }
    };
    let logprobs = req.logprobs.is_some();
    let as_ids = req.return_tokens_as_token_ids;
    let echo = req.echo.then_some((prompt_ids.clone(), prompt_text));
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let (mut rx, mut guard, prompt_len) = submit(&state, &model.name, prompt_ids, params).await?;
    let id = request_id("cmpl");
    let created = now_secs();
    let name = model.name.clone();
    let response = move |choice: CompletionChoice, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion".into(),
        created,
        model: name.clone(),
        choices: vec![choice],
        usage,
    };
    if !req.stream {
        let c = collect(&mut rx, &mut guard).await?;
        let mut text = String::new();
        let mut lp = CompletionLogprobs::default();
        // Offsets count bytes of decoded text, also when tokens are rendered as `token_id:N`.
        let piece_len = |id: u32| {
            model
                .tokenizer
                .decode(&[id], false)
                .map(|s| s.len())
                .unwrap_or(0)
        };
        if let Some((ids, t)) = &echo {
            text.push_str(t);
            let mut offset = 0;
            for &pid in ids {
                lp.text_offset.push(offset);
                offset += piece_len(pid);
                lp.tokens.push(token_text(&model, pid, as_ids));
                lp.token_logprobs.push(None);
                lp.top_logprobs.push(None);
            }
        }
        let base = text.len();
        text.push_str(&c.text);
        let mut offset = base;
        for (i, &tid) in c.ids.iter().enumerate() {
            let piece = token_text(&model, tid, as_ids);
            lp.text_offset.push(offset);
            offset += piece_len(tid);
            lp.tokens.push(piece);
            lp.token_logprobs.push(Some(c.logprobs[i]));
            lp.top_logprobs
                .push(Some(top_map(&model, &c.top[i], as_ids)));
        }
        let usage = Usage {
            prompt_tokens: prompt_len,
            completion_tokens: c.ids.len(),
            total_tokens: prompt_len + c.ids.len(),
        };
        let choice = CompletionChoice {
            index: 0,
            text,
            logprobs: logprobs.then_some(lp),
            finish_reason: c.finish.map(str::to_string),
        };
        return Ok(Json(response(choice, Some(usage))).into_response());
    }
    // Streamed: one chunk per token, a last chunk with the finish reason, [DONE].
    let first = echo.map(|(_, t)| {
        let choice = CompletionChoice {
            index: 0,
            text: t,
            logprobs: None,
            finish_reason: None,
        };
        serde_json::to_string(&response(choice, None)).unwrap_or_default()
    });
    let chunks = sse_events(rx, guard, first, move |event| match event {
        JobEvent::Token {
            id: tid,
            logprob,
            top_logprobs,
            text,
        } => {
            let lp = logprobs.then(|| CompletionLogprobs {
                tokens: vec![token_text(&model, tid, as_ids)],
                token_logprobs: vec![Some(logprob)],
                top_logprobs: vec![Some(top_map(&model, &top_logprobs, as_ids))],
                text_offset: vec![0],
            });
            let choice = CompletionChoice {
                index: 0,
                text,
                logprobs: lp,
                finish_reason: None,
            };
            vec![serde_json::to_string(&response(choice, None)).unwrap_or_default()]
        }
        JobEvent::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
        } => {
            let choice = CompletionChoice {
                index: 0,
                text: String::new(),
                logprobs: None,
                finish_reason: Some(finish_reason.into()),
            };
            let mut out = vec![serde_json::to_string(&response(choice, None)).unwrap_or_default()];
            if include_usage {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                };
                let mut last = response(
                    CompletionChoice {
                        index: 0,
                        text: String::new(),
                        logprobs: None,
                        finish_reason: None,
                    },
                    Some(usage),
                );
                last.choices.clear();
                out.push(serde_json::to_string(&last).unwrap_or_default());
            }
            out
        }
        _ => Vec::new(),
    });
    Ok(Sse::new(chunks).into_response())
}

/// Turns job events into SSE `data:` events: `render` maps Token/Done events to JSON chunks;
/// a failure, or the engine dropping the job, becomes an error object; the stream always ends
/// with `[DONE]`.
fn sse_events(
    rx: UnboundedReceiver<JobEvent>,
    guard: RequestGuard,
    first: Option<String>,
    render: impl FnMut(JobEvent) -> Vec<String> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    struct St<R> {
        rx: UnboundedReceiver<JobEvent>,
        guard: RequestGuard,
        pending: std::collections::VecDeque<String>,
        render: R,
        done: bool,
    }
    let mut pending = std::collections::VecDeque::new();
    pending.extend(first);
    let st = St {
        rx,
        guard,
        pending,
        render,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok(Event::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(JobEvent::Admitted) => st.guard.admitted(),
                Some(e @ JobEvent::Token { .. }) => {
                    st.guard.token();
                    st.pending.extend((st.render)(e));
                }
                Some(e @ JobEvent::Done { finish_reason, .. }) => {
                    st.guard.finish(finish_reason);
                    st.pending.extend((st.render)(e));
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(JobEvent::Failed { kind, message }) => {
                    st.guard.finish(if kind == "timeout" {
                        "timeout"
                    } else {
                        "error"
                    });
                    let body = failed(kind, message).body();
                    st.pending
                        .push_back(serde_json::to_string(&body).unwrap_or_default());
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                None => {
                    // The engine dropped the job (model unloaded, or the drain grace ran out):
                    // say so, and still end the stream properly.
                    st.guard.finish("error");
                    let body = ApiError::unavailable(
                        "the request was dropped by the engine (model unloaded or daemon stopping)",
                    )
                    .body();
                    st.pending
                        .push_back(serde_json::to_string(&body).unwrap_or_default());
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
            }
        }
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let model = state.model(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    let top = req.top_logprobs;
    if top.is_some() && !req.logprobs {
        return Err(ApiError::invalid("top_logprobs needs logprobs = true"));
    }
    let params = sampling(
        req.max_completion_tokens.or(req.max_tokens),
        req.temperature,
        req.top_p,
        req.top_k,
        req.seed,
        req.stop,
        req.logprobs.then_some(top.unwrap_or(0)),
        req.ignore_eos,
        req.n,
    )?;
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.as_str(), m.content.as_str()))
        .collect();
    let rendered = model
        .tokenizer
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid_code("chat_template", e.to_string()))?;
    let prompt = model
        .tokenizer
        .encode(&rendered, false)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let with_logprobs = req.logprobs;
    let (mut rx, mut guard, prompt_len) = submit(&state, &model.name, prompt, params).await?;
    let id = request_id("chatcmpl");
    let created = now_secs();
    let name = model.name.clone();
    let response = move |object: &str, choice: Option<ChatChoice>, usage: Option<Usage>| {
        ChatCompletionResponse {
            id: id.clone(),
            object: object.into(),
            created,
            model: name.clone(),
            choices: choice.into_iter().collect(),
            usage,
        }
    };
    let token_lp = {
        let model = model.clone();
        move |tid: u32, logprob: f32, top: &[(u32, f32)]| {
            let text = token_text(&model, tid, false);
            TokenLogprob {
                bytes: text.as_bytes().to_vec(),
                token: text,
                logprob,
                top_logprobs: top
                    .iter()
                    .map(|&(t, lp)| {
                        let s = token_text(&model, t, false);
                        TopLogprob {
                            bytes: s.as_bytes().to_vec(),
                            token: s,
                            logprob: lp,
                        }
                    })
                    .collect(),
            }
        }
    };
    if !req.stream {
        let c = collect(&mut rx, &mut guard).await?;
        let content: Vec<TokenLogprob> = c
            .ids
            .iter()
            .enumerate()
            .map(|(i, &t)| token_lp(t, c.logprobs[i], &c.top[i]))
            .collect();
        let choice = ChatChoice {
            index: 0,
            message: Some(ChatDelta {
                role: Some("assistant".into()),
                content: Some(c.text),
            }),
            delta: None,
            logprobs: with_logprobs.then_some(ChatLogprobs { content }),
            finish_reason: c.finish.map(str::to_string),
        };
        let usage = Usage {
            prompt_tokens: prompt_len,
            completion_tokens: c.ids.len(),
            total_tokens: prompt_len + c.ids.len(),
        };
        return Ok(Json(response("chat.completion", Some(choice), Some(usage))).into_response());
    }
    let chunk =
        |delta: ChatDelta, logprobs: Option<ChatLogprobs>, finish: Option<String>| ChatChoice {
            index: 0,
            message: None,
            delta: Some(delta),
            logprobs,
            finish_reason: finish,
        };
    let first = serde_json::to_string(&response(
        "chat.completion.chunk",
        Some(chunk(
            ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            None,
            None,
        )),
        None,
    ))
    .unwrap_or_default();
    let events = sse_events(rx, guard, Some(first), move |event| match event {
        JobEvent::Token {
            id: tid,
            logprob,
            top_logprobs,
            text,
        } => {
            let lp = with_logprobs.then(|| ChatLogprobs {
                content: vec![token_lp(tid, logprob, &top_logprobs)],
            });
            let c = chunk(
                ChatDelta {
                    role: None,
                    content: Some(text),
                },
                lp,
                None,
            );
            vec![
                serde_json::to_string(&response("chat.completion.chunk", Some(c), None))
                    .unwrap_or_default(),
            ]
        }
        JobEvent::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
        } => {
            let c = chunk(ChatDelta::default(), None, Some(finish_reason.into()));
            let mut out =
                vec![
                    serde_json::to_string(&response("chat.completion.chunk", Some(c), None))
                        .unwrap_or_default(),
                ];
            if include_usage {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                };
                out.push(
                    serde_json::to_string(&response("chat.completion.chunk", None, Some(usage)))
                        .unwrap_or_default(),
                );
            }
            out
        }
        _ => Vec::new(),
    });
    Ok(Sse::new(events).into_response())
}
