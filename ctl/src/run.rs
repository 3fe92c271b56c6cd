//! `tilectl --offline run` and `tilectl --offline demo`: generation in-process on the chosen
//! device (`--device`, the daemon's rules), straight from the store.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::json;
use tileflow_engine::backend::Backend;
use tileflow_engine::generate::{batch_config, generate, GenerateRequest};
use tileflow_engine::model::{LoadOptions, LoadedModel};
use tileflow_engine::pack::write::Progress;
use tileflow_engine::sampler::SamplingParams;
use tileflow_engine::sched::Scheduler;
use tileflow_engine::store::{Store, StoreError};
use tileflow_engine::synth::Synth;
use tileflow_engine::tier::TierMemory;
use tileflow_engine::tokenizer::{ChatMessage, TextTokenizer};
use tileflow_gpu::{DeviceChoice, UseModel};

use crate::cli::{DemoArgs, GenerateArgs, RunArgs};

fn params(g: &GenerateArgs) -> SamplingParams {
    SamplingParams {
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        seed: g.seed,
        max_tokens: u32::try_from(g.max_tokens.unwrap_or(32)).unwrap_or(u32::MAX),
        stop: g.stop.clone(),
        stop_token_ids: Vec::new(),
        logprobs: g.logprobs,
        ignore_eos: g.ignore_eos,
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

/// Generates for `prompts` (already token ids) and prints text, or JSON.
fn generate_and_print<B: Backend, M: TierMemory>(
    model: LoadedModel<B, M>,
    tokenizer: &TextTokenizer,
    prompts: Vec<Vec<u32>>,
    g: &GenerateArgs,
) -> anyhow::Result<()> {
    let p = params(g);
    p.validate()?;
    let requests: Vec<GenerateRequest> = prompts
        .into_iter()
        .map(|prompt| GenerateRequest {
            prompt,
            params: p.clone(),
        })
        .collect();
    let single = requests.len() == 1 && !g.json;
    let mut stdout = std::io::stdout();
    let mut on_text = |_: usize, text: &str| {
        if single {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
    };
    let name = model.name.clone();
    let mut sched = Scheduler::new(model.runner, tokenizer.clone(), batch_config(&requests));
    let (results, timing) = generate(&mut sched, &requests, &mut on_text)?;
    let runner = sched.runner();
    if g.json {
        let choices: Vec<_> = results
            .iter()
            .map(|r| {
                json!({
                    "prompt_ids": r.prompt_ids,
                    "tokens": r.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
                    "logprobs": r.tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": r.tokens.iter().map(|t| &t.top_logprobs).collect::<Vec<_>>(),
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                })
            })
            .collect();
        let stats = runner.experts().stats();
        let out = json!({
            "model": name,
            "choices": choices,
            "timing": timing,
            "expert_cache": {"slots": runner.experts().capacity(), "hits": stats.device.hits,
                             "misses": stats.device.misses, "evictions": stats.device_evictions, "bytes_read": stats.bytes_read,
                             "ran_on_device": stats.ran_device.experts, "ran_on_cpu": stats.ran_host.experts},
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        if single {
            println!();
        } else {
            for (i, r) in results.iter().enumerate() {
                println!("[{i}] {}", r.text);
            }
        }
        let tps = timing.decode_tokens as f64 / timing.decode_seconds.max(1e-9);
        eprintln!(
            "prefill {:.3} s, {} decode steps at {:.1} tokens/s ({})",
            timing.prefill_seconds,
            timing.decode_steps,
            tps,
            runner.backend().name()
        );
    }
    Ok(())
}

/// Reads the opened model's tokenizer, makes the prompts with it, generates and prints.
struct Generation<'a, F> {
    prompts: F,
    generate: &'a GenerateArgs,
}

impl<F> UseModel for Generation<'_, F>
where
    F: FnOnce(&TextTokenizer) -> anyhow::Result<Vec<Vec<u32>>>,
{
    type Output = anyhow::Result<()>;

    fn use_model<B, M>(self, model: LoadedModel<B, M>) -> anyhow::Result<()>
    where
        B: Backend + 'static,
        M: TierMemory + 'static,
    {
        let tokenizer = TextTokenizer::from_dir(&model.dir)?;
        let prompts = (self.prompts)(&tokenizer)?;
        generate_and_print(model, &tokenizer, prompts, self.generate)
    }
}

/// Opens `name` on `device` and generates for the prompts `prompts` makes with its tokenizer.
fn open_and_generate(
    state_dir: &Path,
    name: &str,
    device: Option<DeviceChoice>,
    g: &GenerateArgs,
    prompts: impl FnOnce(&TextTokenizer) -> anyhow::Result<Vec<Vec<u32>>>,
) -> anyhow::Result<()> {
    let store = Store::new(state_dir);
    let mut options = LoadOptions::default();
    options.tier.device_slots = g.expert_slots;
    if let Some(mode) = g.cpu_experts {
        options.tier.cpu_experts = mode.into();
    }
    let device = crate::device::open(device)?;
    let generation = Generation {
        prompts,
        generate: g,
    };
    device.open_model(&store, name, &options, generation)?
}

/// `tilectl run MODEL --prompt TEXT…`.
pub fn run(state_dir: &Path, args: RunArgs) -> anyhow::Result<()> {
    if args.prompt.is_empty() && args.prompt_ids.is_empty() {
        bail!(
            "--prompt or --prompt-ids is required offline (the interactive chat goes through \
             the daemon: drop --offline / --state-dir)"
        );
    }
    if args.system.is_some() {
        bail!("--system is for chats through the daemon");
    }
    let prompts = |tokenizer: &TextTokenizer| {
        let mut prompts = Vec::new();
        for text in &args.prompt {
            let text = if args.chat {
                tokenizer.apply_chat_template(&[ChatMessage::new("user", text.as_str())], true)?
            } else {
                text.clone()
            };
            // A chat template already carries its special tokens.
            prompts.push(tokenizer.encode(&text, !args.chat)?);
        }
        for ids in &args.prompt_ids {
            prompts.push(parse_ids(ids)?);
        }
        Ok(prompts)
    };
    open_and_generate(state_dir, &args.model, args.device, &args.generate, prompts)
}

/// `tilectl demo`: synthesizes `tiny` into the store if it is not there, then generates.
pub fn demo(state_dir: &Path, args: DemoArgs) -> anyhow::Result<()> {
    const NAME: &str = "tiny";
    let store = Store::new(state_dir);
    match store.get(NAME) {
        Ok(_) => {}
        Err(StoreError::NotFound { .. }) => {
            eprintln!(
                "synthesizing the `tiny` model into {} (random weights, no download)",
                store.models_dir().display()
            );
            let synth = Synth::new("tiny", 0, 1.0)?;
            let txn = store.begin(NAME)?;
            tileflow_engine::pack::write::write_pack(&synth, NAME, txn.dir(), &|_: Progress| {})?;
            txn.commit()?;
        }
        Err(e) => return Err(e.into()),
    }
    let prompts = |tokenizer: &TextTokenizer| {
        eprintln!("{}: {}", NAME, args.prompt);
        Ok(vec![tokenizer.encode(&args.prompt, true)?])
    };
    open_and_generate(state_dir, NAME, None, &args.generate, prompts)
}
