//! `tileflowd`, the TileFlow daemon.

mod api;
mod engine;
mod metrics;
mod serve;
mod systemd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tileflow_engine::forward::KvCacheConfig;
use tileflow_engine::model::LoadOptions;
use tileflow_engine::sched::SchedulerConfig;

/// TileFlow daemon: serves MoE models over a Unix-socket HTTP API.
#[derive(Debug, Parser)]
#[command(name = "tileflowd", version)]
struct Args {
    /// Socket path.
    #[arg(
        long,
        env = "TILEFLOW_SERVER__SOCKET",
        default_value = "/run/tileflowd.sock"
    )]
    socket: PathBuf,
    /// State directory (model store).
    #[arg(
        long,
        env = "TILEFLOW_MODELS__STATE_DIR",
        default_value = "/var/lib/tileflow"
    )]
    state_dir: PathBuf,
    /// Compute device.
    #[arg(long, env = "TILEFLOW_ENGINE__DEVICE", default_value = "auto")]
    device: String,
    /// Models to load before serving (repeatable).
    #[arg(long)]
    preload: Vec<String>,
    /// Loopback address for /metrics over TCP.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Routed-expert slots per model (0 = all).
    #[arg(long, default_value_t = 0)]
    expert_slots: usize,
    /// Waiting requests at most (more get 429).
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TILEFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.device == "cuda" {
        eprintln!("tileflowd: error: the CUDA backend is not built yet; use --device cpu or auto");
        return ExitCode::from(2);
    }
    let options = serve::ServeOptions {
        socket: args.socket,
        socket_mode: 0o660,
        state_dir: args.state_dir,
        admin_group: "tileflow-admin".into(),
        metrics_listen: args.metrics_listen,
        request_timeout: Duration::from_secs(600),
        drain_grace: Duration::from_secs(30),
        max_body_bytes: 1 << 20,
        scheduler: SchedulerConfig {
            max_running: 32,
            max_waiting: args.max_waiting,
            prefill_chunk: 512,
        },
        load: LoadOptions {
            expert_slots: (args.expert_slots > 0).then_some(args.expert_slots),
            kv: KvCacheConfig {
                num_blocks: 4096,
                block_size: 16,
            },
            ..LoadOptions::default()
        },
        preload: args.preload,
        device: "cpu".into(),
    };
    let max_waiting = args.max_waiting;
    let reload = Box::new(move |state: &api::AppState| {
        tracing::info!("SIGHUP: re-applying limits");
        state.engine.set_max_waiting(max_waiting);
    });
    match serve::serve(options, None, reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tileflowd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
