//! `tilectl bench stream`: greedy generation with routed experts streaming from the pack
//! through the expert tiers, once per prefetch depth, each run on a freshly opened (cold)
//! model. It measures what router look-ahead buys: stall time per token against depth 0,
//! prefetch outcomes, look-ahead recall, and bytes read per token.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use tileflow_engine::backend::Backend;
use tileflow_engine::generate::{batch_config, generate, GenerateRequest};
use tileflow_engine::model::{LoadOptions, LoadedModel};
use tileflow_engine::sampler::SamplingParams;
use tileflow_engine::sched::Scheduler;
use tileflow_engine::store::Store;
use tileflow_engine::tier::{CpuExperts, TierMemory};
use tileflow_engine::tokenizer::TextTokenizer;
use tileflow_gpu::{ComputeDevice, UseModel};

use crate::cli::BenchStreamArgs;
use crate::output::table;

/// Prompts used when none are given: varied enough that routing moves around.
const DEFAULT_PROMPTS: [&str; 4] = [
    "The tile streams from disk to the GPU and",
    "In a mixture of experts, each token is routed to",
    "Once upon a time, in a city built on an old river delta,",
    "fn main() { let cache = ExpertCache::new(",
];

/// One prefetch depth's run.
#[derive(Debug, Clone, Serialize)]
struct DepthRun {
    prefetch_depth: usize,
    /// Hybrid mode: which device-tier misses the CPU computed ("auto", "never", "always").
    cpu_experts: &'static str,
    /// Prompt tokens, all sequences.
    prompt_tokens: usize,
    /// Tokens generated, all sequences.
    tokens: usize,
    /// Wall seconds of the whole generation (prefill included).
    seconds: f64,
    tokens_per_s: f64,
    /// Decode steps only: the best of the repeats.
    decode_tokens_per_s: f64,
    /// Each repeat's decode tokens per second, in order.
    decode_tokens_per_s_repeats: Vec<f64>,
    /// Seconds the forward pass waited for experts, per generated token.
    stall_s_per_token: f64,
    /// This depth's stall over depth 0's (absent without a depth-0 run or when it stalled 0).
    stall_ratio_vs_depth0: Option<f64>,
    prefetch_issued: u64,
    prefetch_used: u64,
    prefetch_wasted: u64,
    prefetch_late: u64,
    /// Look-ahead recall: chosen experts that had been predicted (absent at depth 0).
    recall: Option<f64>,
    /// Experts predicted per MoE layer-step by look-ahead.
    predicted_per_layer_step: Option<f64>,
    bytes_read: u64,
    bytes_read_per_token: f64,
    /// Bytes copied host → device per generated token (the PCIe traffic of misses).
    h2d_bytes_per_token: f64,
    device_hits: u64,
    device_misses: u64,
    /// Experts run from the device tier, per generated token.
    device_experts_per_token: f64,
    /// Experts the CPU ran from the host tier, per generated token.
    cpu_experts_per_token: f64,
    /// Weight bytes the CPU read, per generated token.
    cpu_bytes_per_token: f64,
    /// The hybrid cost model's estimates at the end: CPU expert weight bytes per second and
    /// host → device bytes per second.
    cost_model_cpu_bytes_per_s: f64,
    cost_model_copy_bytes_per_s: f64,
    /// With --cpu-bandwidth: the CPU kernels against a plain read of the host tier.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_bandwidth: Option<crate::bench_cpu::CpuBandwidth>,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    model: String,
    backend: String,
    batch: usize,
    tokens_per_sequence: usize,
    expert_slots: Option<usize>,
    device_bytes: Option<u64>,
    host_bytes: u64,
    runs: Vec<DepthRun>,
}

/// `tilectl bench stream MODEL`.
pub fn run(state_dir: &Path, args: BenchStreamArgs) -> anyhow::Result<()> {
    if args.prefetch_depths.is_empty() {
        bail!("--prefetch-depths needs at least one depth");
    }
    let store = Store::new(state_dir);
    // Opened once: every depth's model shares the GPU's context and kernels.
    let device = crate::device::open(args.device)?;
    let mut runs = Vec::with_capacity(args.prefetch_depths.len());
    let mut backend = String::new();
    for &depth in &args.prefetch_depths {
        for &mode in &args.cpu_experts {
            let mode = mode.into();
            let (run, name) =
                run_depth(&store, &device, &args, depth, mode).with_context(|| {
                    format!("prefetch depth {depth}, cpu experts {}", mode.as_str())
                })?;
            backend = name;
            if !args.json {
                eprintln!(
                    "depth {depth}, cpu experts {}: {} tokens in {:.2} s",
                    mode.as_str(),
                    run.tokens,
                    run.seconds
                );
            }
            runs.push(run);
        }
    }
    let base = runs
        .iter()
        .find(|r| r.prefetch_depth == 0)
        .map(|r| r.stall_s_per_token);
    for r in &mut runs {
        r.stall_ratio_vs_depth0 = base.filter(|&b| b > 0.0).map(|b| r.stall_s_per_token / b);
    }
    let report = Report {
        model: args.model.clone(),
        backend,
        batch: args.batch,
        tokens_per_sequence: args.tokens,
        expert_slots: args.expert_slots,
        device_bytes: args.device_bytes,
        host_bytes: args
            .host_bytes
            .unwrap_or(tileflow_engine::tier::TierConfig::default().host_bytes),
        runs,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Opens the model cold on `device` with prefetch `depth` and generates the batch.
fn run_depth(
    store: &Store,
    device: &ComputeDevice,
    args: &BenchStreamArgs,
    depth: usize,
    mode: CpuExperts,
) -> anyhow::Result<(DepthRun, String)> {
    let mut options = LoadOptions::default();
    options.tier.cpu_experts = mode;
    options.tier.device_slots = args.expert_slots;
    options.tier.device_bytes = args.device_bytes;
    if let Some(host) = args.host_bytes {
        options.tier.host_bytes = host;
    }
    options.tier.prefetch_depth = depth;
    if args.lfru {
        options.tier.policy = tileflow_engine::tier::EvictionPolicy::Lfru;
    }
    if let Some(burst) = args.prefetch_burst {
        options.tier.prefetch_burst_bytes = burst;
    }
    if let Some(rate) = args.prefetch_rate {
        options.tier.prefetch_rate_bytes = rate;
    }
    options.threads = args.threads;
    device.open_model(
        store,
        &args.model,
        &options,
        DepthBench { args, depth, mode },
    )?
}

/// Generates the batch on an opened model and measures it (one prefetch depth's run).
struct DepthBench<'a> {
    args: &'a BenchStreamArgs,
    depth: usize,
    mode: CpuExperts,
}

impl UseModel for DepthBench<'_> {
    type Output = anyhow::Result<(DepthRun, String)>;

    fn use_model<B, M>(self, model: LoadedModel<B, M>) -> Self::Output
    where
        B: Backend + 'static,
        M: TierMemory + 'static,
    {
        measure(model, self.args, self.depth, self.mode)
    }
}

/// Generates the batch on `model` (opened with prefetch `depth`): the run and the backend.
fn measure<B: Backend, M: TierMemory>(
    mut model: LoadedModel<B, M>,
    args: &BenchStreamArgs,
    depth: usize,
    mode: CpuExperts,
) -> anyhow::Result<(DepthRun, String)> {
    model.runner.set_prefetch_depth(depth);
    model.runner.set_cpu_experts(mode);
    if args.warm {
        model.runner.experts_mut().warm()?;
    }
    let tokenizer = TextTokenizer::from_dir(&model.dir)?;
    let requests = requests(&tokenizer, args)?;
    let mut sched = Scheduler::new(model.runner, tokenizer, batch_config(&requests));
    let started = Instant::now();
    let (mut tokens, mut repeats) = (0, Vec::with_capacity(args.repeats));
    for _ in 0..args.repeats {
        let (results, timing) = generate(&mut sched, &requests, &mut |_, _| {})?;
        tokens += results.iter().map(|r| r.tokens.len()).sum::<usize>();
        repeats.push(timing.decode_tokens as f64 / timing.decode_seconds.max(1e-9));
    }
    let seconds = started.elapsed().as_secs_f64();
    let runner = sched.runner();
    let tier = runner.experts().stats();
    let predicted = runner.prefetch_stats();
    let per_token = |x: f64| x / tokens.max(1) as f64;
    let run = DepthRun {
        prefetch_depth: depth,
        cpu_experts: mode.as_str(),
        prompt_tokens: requests.iter().map(|r| r.prompt.len()).sum(),
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        decode_tokens_per_s: repeats.iter().copied().fold(0.0, f64::max),
        decode_tokens_per_s_repeats: repeats,
        stall_s_per_token: per_token(tier.stall.as_secs_f64()),
        stall_ratio_vs_depth0: None,
        prefetch_issued: tier.prefetch.issued,
        prefetch_used: tier.prefetch.used,
        prefetch_wasted: tier.prefetch.wasted,
        prefetch_late: tier.prefetch.late,
        recall: predicted.recall(),
        predicted_per_layer_step: predicted.look_ahead.mean_predictions(),
        bytes_read: tier.bytes_read,
        bytes_read_per_token: per_token(tier.bytes_read as f64),
        h2d_bytes_per_token: per_token(tier.h2d_bytes as f64),
        device_hits: tier.device.hits,
        device_misses: tier.device.misses,
        device_experts_per_token: per_token(tier.ran_device.experts as f64),
        cpu_experts_per_token: per_token(tier.ran_host.experts as f64),
        cpu_bytes_per_token: per_token(tier.ran_host.bytes as f64),
        cost_model_cpu_bytes_per_s: runner.hybrid().cost().rates().0,
        cost_model_copy_bytes_per_s: runner.hybrid().cost().rates().1,
        cpu_bandwidth: args.cpu_bandwidth.then(|| {
            let spec = runner.spec();
            let views = runner.experts().host_views();
            crate::bench_cpu::measure(&views, spec.hidden_size, spec.moe.top_k, 2)
        }),
    };
    Ok((run, runner.backend().name().to_string()))
}

/// The batch: the given prompts (or the defaults), repeated to `--batch` sequences.
fn requests(
    tokenizer: &TextTokenizer,
    args: &BenchStreamArgs,
) -> anyhow::Result<Vec<GenerateRequest>> {
    let texts: Vec<&str> = if args.prompt.is_empty() {
        DEFAULT_PROMPTS.to_vec()
    } else {
        args.prompt.iter().map(String::as_str).collect()
    };
    let mut params = SamplingParams::greedy(u32::try_from(args.tokens).unwrap_or(u32::MAX));
    params.ignore_eos = true;
    let mut out = Vec::with_capacity(args.batch);
    for text in texts.iter().cycle().take(args.batch) {
        let mut prompt = tokenizer
            .encode(text, true)
            .with_context(|| format!("cannot tokenize the prompt {text:?}"))?;
        if prompt.is_empty() {
            bail!("the prompt {text:?} has no tokens");
        }
        if let Some(n) = args.prompt_tokens {
            prompt = prompt.iter().copied().cycle().take(n).collect();
        }
        out.push(GenerateRequest {
            prompt,
            params: params.clone(),
        });
    }
    Ok(out)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

fn print_table(report: &Report) {
    println!(
        "{} on {}: batch {}, {} tokens per sequence",
        report.model, report.backend, report.batch, report.tokens_per_sequence
    );
    let rows: Vec<Vec<String>> = report
        .runs
        .iter()
        .map(|r| {
            vec![
                r.prefetch_depth.to_string(),
                r.cpu_experts.to_string(),
                format!("{:.1}", r.tokens_per_s),
                format!("{:.3}", r.stall_s_per_token * 1e3),
                opt(r.stall_ratio_vs_depth0, 2),
                r.prefetch_used.to_string(),
                r.prefetch_wasted.to_string(),
                r.prefetch_late.to_string(),
                opt(r.recall, 3),
                crate::output::human_bytes(r.bytes_read_per_token as u64),
                crate::output::human_bytes(r.h2d_bytes_per_token as u64),
                format!("{:.1}", r.cpu_experts_per_token),
            ]
        })
        .collect();
    table(
        &[
            "DEPTH",
            "CPU EXPERTS",
            "TOK/S",
            "STALL MS/TOK",
            "STALL/DEPTH0",
            "PF USED",
            "PF WASTED",
            "PF LATE",
            "RECALL",
            "READ/TOK",
            "H2D/TOK",
            "CPU RUNS/TOK",
        ],
        &rows,
    );
}
