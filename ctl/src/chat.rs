//! `tilectl run` through the daemon: one-shot prompts (streamed when there is one), or an
//! interactive chat that keeps the conversation, one user turn per line of stdin.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use tileflow_client::blocking::Client;
use tileflow_client::openai::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, Prompt, Stop, StreamOptions, Usage,
};
use tileflow_client::ClientError;

use crate::cli::{GenerateArgs, RunArgs};
use crate::output::human_seconds;
use crate::remote::connect;

/// `--max-tokens` when not given: one-shot prompts and chat replies.
const ONE_SHOT_TOKENS: usize = 32;
const CHAT_REPLY_TOKENS: usize = 256;

fn max_tokens(g: &GenerateArgs, default: usize) -> u32 {
    u32::try_from(g.max_tokens.unwrap_or(default)).unwrap_or(u32::MAX)
}

fn stop(g: &GenerateArgs) -> Option<Stop> {
    (!g.stop.is_empty()).then(|| Stop::Many(g.stop.clone()))
}

/// A completion request carrying the sampling flags.
fn completion(model: &str, prompt: Prompt, g: &GenerateArgs) -> CompletionRequest {
    CompletionRequest {
        model: model.into(),
        prompt: Some(prompt),
        max_tokens: Some(max_tokens(g, ONE_SHOT_TOKENS)),
        temperature: Some(g.temperature),
        top_p: Some(g.top_p),
        top_k: Some(i64::try_from(g.top_k).unwrap_or(i64::MAX)),
        seed: g.seed,
        stop: stop(g),
        logprobs: g.logprobs.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        ignore_eos: g.ignore_eos,
        ..CompletionRequest::default()
    }
}

/// A chat request carrying the sampling flags.
fn chat(
    model: &str,
    messages: Vec<ChatMessage>,
    g: &GenerateArgs,
    tokens: usize,
) -> ChatCompletionRequest {
    ChatCompletionRequest {
        model: model.into(),
        messages,
        max_tokens: Some(max_tokens(g, tokens)),
        temperature: Some(g.temperature),
        top_p: Some(g.top_p),
        top_k: Some(i64::try_from(g.top_k).unwrap_or(i64::MAX)),
        seed: g.seed,
        stop: stop(g),
        logprobs: g.logprobs.is_some(),
        top_logprobs: g.logprobs.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        ignore_eos: g.ignore_eos,
        ..ChatCompletionRequest::default()
    }
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        name: None,
    }
}

fn parse_ids(list: &str) -> anyhow::Result<Vec<u32>> {
    list.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .with_context(|| format!("--prompt-ids: {t:?} is not a token id"))
        })
        .collect()
}

/// `tilectl run MODEL` through the daemon.
pub fn run(socket: &Path, args: RunArgs) -> anyhow::Result<()> {
    let g = &args.generate;
    if g.expert_slots.is_some() {
        bail!(
            "--expert-slots sizes the cache of an --offline run; the daemon's is \
             cache.expert_slots in its configuration"
        );
    }
    if let Some(device) = args.device {
        bail!(
            "--device {device} chooses the device of an --offline run; the daemon's is \
             engine.device in its configuration (tilectl status shows it)"
        );
    }
    if args.chat && !args.prompt_ids.is_empty() {
        bail!("--chat wraps text prompts; --prompt-ids are sent as they are");
    }
    let client = connect(socket)?;
    let mut prompts: Vec<Prompt> = args.prompt.iter().cloned().map(Prompt::Text).collect();
    for ids in &args.prompt_ids {
        prompts.push(Prompt::Tokens(parse_ids(ids)?));
    }
    if prompts.is_empty() {
        return interactive(&client, &args);
    }
    if prompts.len() == 1 && !g.json {
        let started = Instant::now();
        let usage = if args.chat {
            let mut messages: Vec<ChatMessage> =
                args.system.iter().map(|s| message("system", s)).collect();
            messages.push(message("user", &args.prompt[0]));
            stream_chat(&client, &chat(&args.model, messages, g, ONE_SHOT_TOKENS))?.1
        } else {
            stream_completion(&client, &completion(&args.model, prompts.remove(0), g))?
        };
        if let Some(u) = usage {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{} prompt tokens, {} generated in {} ({:.1} tokens/s) through {}",
                u.prompt_tokens,
                u.completion_tokens,
                human_seconds(secs),
                u.completion_tokens as f64 / secs.max(1e-9),
                socket.display()
            );
        }
        return Ok(());
    }
    several(socket, &args, prompts)
}

/// Several prompts (or `--json`): sent together, so that the daemon batches them; the
/// answers are printed in order.
fn several(socket: &Path, args: &RunArgs, prompts: Vec<Prompt>) -> anyhow::Result<()> {
    let g = &args.generate;
    let answers: Vec<anyhow::Result<(String, serde_json::Value)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .into_iter()
            .map(|prompt| {
                scope.spawn(move || -> anyhow::Result<(String, serde_json::Value)> {
                    let client = connect(socket)?;
                    if args.chat {
                        let Prompt::Text(text) = prompt else {
                            bail!("--chat takes text prompts");
                        };
                        let mut messages: Vec<ChatMessage> =
                            args.system.iter().map(|s| message("system", s)).collect();
                        messages.push(message("user", &text));
                        let r = client.chat(&chat(&args.model, messages, g, ONE_SHOT_TOKENS))?;
                        let text = r
                            .choices
                            .first()
                            .and_then(|c| c.message.as_ref()?.content.clone())
                            .unwrap_or_default();
                        Ok((text, serde_json::to_value(&r)?))
                    } else {
                        let r = client.completions(&completion(&args.model, prompt, g))?;
                        let text = r
                            .choices
                            .first()
                            .map(|c| c.text.clone())
                            .unwrap_or_default();
                        Ok((text, serde_json::to_value(&r)?))
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a request thread panicked")))
            })
            .collect()
    });
    let answers = answers.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    if g.json {
        let values: Vec<&serde_json::Value> = answers.iter().map(|(_, v)| v).collect();
        let out = match values.as_slice() {
            [one] => serde_json::to_string(one)?,
            all => serde_json::to_string(all)?,
        };
        println!("{out}");
    } else {
        for (i, (text, _)) in answers.iter().enumerate() {
            println!("[{i}] {text}");
        }
    }
    Ok(())
}

fn print_piece(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// Streams a completion's text to stdout; returns its usage.
fn stream_completion(
    client: &Client,
    request: &CompletionRequest,
) -> anyhow::Result<Option<Usage>> {
    let request = CompletionRequest {
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        ..request.clone()
    };
    let mut usage = None;
    for chunk in client.completions_stream(&request)? {
        let chunk = chunk?;
        for choice in &chunk.choices {
            print_piece(&choice.text)?;
        }
        usage = chunk.usage.or(usage);
    }
    print_piece("\n")?;
    Ok(usage)
}

/// Streams a chat reply's content to stdout; returns the reply and usage.
fn stream_chat(
    client: &Client,
    request: &ChatCompletionRequest,
) -> Result<(String, Option<Usage>), anyhow::Error> {
    let request = ChatCompletionRequest {
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        ..request.clone()
    };
    let mut reply = String::new();
    let mut usage = None;
    let result = (|| -> anyhow::Result<()> {
        for chunk in client.chat_stream(&request)? {
            let chunk = chunk?;
            for choice in &chunk.choices {
                if let Some(text) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
                    print_piece(text)?;
                    reply.push_str(text);
                }
            }
            usage = chunk.usage.or(usage);
        }
        Ok(())
    })();
    if !reply.is_empty() {
        print_piece("\n")?;
    }
    result.map(|()| (reply, usage))
}

/// The interactive chat: one user turn per line of stdin, each reply streamed and kept in the
/// conversation. On a terminal, a failed turn is reported and the chat goes on; with piped
/// input it ends the command with the error.
fn interactive(client: &Client, args: &RunArgs) -> anyhow::Result<()> {
    let loaded = client.models()?;
    if !loaded.data.iter().any(|m| m.id == args.model) {
        bail!(
            "model {:?} is not loaded in tileflowd on {} (load it with `tilectl model load {}`)",
            args.model,
            client.socket().display(),
            args.model
        );
    }
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let system: Vec<ChatMessage> = args.system.iter().map(|s| message("system", s)).collect();
    let mut messages = system.clone();
    if tty {
        eprintln!(
            "chatting with {} through {}: /clear forgets the conversation, /bye or Ctrl-D ends it",
            args.model,
            client.socket().display()
        );
    }
    let mut line = String::new();
    loop {
        if tty {
            eprint!(">>> ");
            let _ = std::io::stderr().flush();
        }
        line.clear();
        if stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read stdin")?
            == 0
        {
            if tty {
                eprintln!();
            }
            return Ok(());
        }
        let text = line.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/bye" | "/exit" | "/quit" => return Ok(()),
            "/clear" => {
                messages = system.clone();
                if tty {
                    eprintln!("(conversation cleared)");
                }
                continue;
            }
            _ => {}
        }
        messages.push(message("user", text));
        let request = chat(
            &args.model,
            messages.clone(),
            &args.generate,
            CHAT_REPLY_TOKENS,
        );
        match stream_chat(client, &request) {
            Ok((reply, _)) => messages.push(message("assistant", &reply)),
            Err(e)
                if tty
                    && e.downcast_ref::<ClientError>()
                        .is_some_and(|c| c.api_error().is_some()) =>
            {
                messages.pop();
                eprintln!("tilectl: error: {e}");
            }
            Err(e) => return Err(e),
        }
    }
}
