//! `tileflowd`, the TileFlow daemon: flags, the `config` subcommands, and the exit codes.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tileflow_daemon::config::{Config, ConfigError, ConfigSources, Loaded, Origin};

/// Exit status of a configuration error (1 is any other failure).
const EXIT_CONFIG: u8 = 2;

/// The TileFlow daemon: serves Mixture-of-Experts models over an HTTP API on a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "tileflowd", version)]
struct Args {
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Overrides of config keys; each also has an environment variable.
#[derive(Debug, clap::Args)]
struct Flags {
    /// Config file; drop-ins are read from FILE.d/*.toml [default: /etc/tileflow/tileflowd.toml]
    #[arg(long, global = true, env = "TILEFLOW_CONFIG", value_name = "FILE")]
    config: Option<String>,
    /// API socket path (server.socket)
    #[arg(
        long,
        global = true,
        env = "TILEFLOW_SERVER__SOCKET",
        value_name = "PATH"
    )]
    socket: Option<String>,
    /// Model store directory (models.state_dir)
    #[arg(
        long,
        global = true,
        env = "TILEFLOW_MODELS__STATE_DIR",
        value_name = "DIR"
    )]
    state_dir: Option<String>,
    /// Compute device (engine.device)
    #[arg(
        long,
        global = true,
        env = "TILEFLOW_ENGINE__DEVICE",
        value_name = "auto|cpu|cuda|cuda:N"
    )]
    device: Option<String>,
    /// Load this model before serving; repeatable (models.preload)
    #[arg(long, value_name = "MODEL")]
    preload: Vec<String>,
    /// Routed-expert slots per model, 0 = all (cache.expert_slots)
    #[arg(long, value_name = "N")]
    expert_slots: Option<usize>,
    /// Device-tier bytes per model such as 8GiB, 0 = all experts (cache.device_bytes)
    #[arg(long, value_name = "SIZE")]
    device_bytes: Option<String>,
    /// Host-tier bytes per model such as 16GiB, 0 = no host tier (cache.host_bytes)
    #[arg(long, value_name = "SIZE")]
    host_bytes: Option<String>,
    /// MoE layers of router look-ahead prefetch, 0 = off (cache.prefetch_depth)
    #[arg(long, value_name = "N")]
    prefetch_depth: Option<usize>,
    /// Waiting requests at most before 429 (scheduler.max_waiting)
    #[arg(long, value_name = "N")]
    max_waiting: Option<usize>,
    /// Running requests at most (scheduler.max_running)
    #[arg(long, value_name = "N")]
    max_running: Option<usize>,
    /// Loopback address serving /metrics over TCP (server.metrics_listen)
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print or check the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print every option with its default, as commented TOML (etc/tileflowd.toml).
    Default,
    /// Load and validate the file, drop-ins, environment and flags; print the effective
    /// configuration, or the error and exit 2.
    Check,
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(args, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tileflowd: error: {err:#}");
            if err.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(args: Args, matches: &ArgMatches) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Config(ConfigCommand::Default)) => print_out(&Config::default_toml()),
        Some(Command::Config(ConfigCommand::Check)) => {
            let loaded = load(&args.flags, matches)?;
            print_out(&check_report(&loaded))
        }
        None => {
            let sources = sources(&args.flags, matches);
            let loaded = Config::load_detailed(&sources)?;
            let set_log_level = init_logging(&loaded.config)?;
            tileflow_daemon::serve::serve(loaded, sources, set_log_level)
        }
    }
}

/// Logs to stderr (journald takes it from there) with `log.level` as the filter, which SIGHUP
/// can change through the returned setter.
fn init_logging(config: &Config) -> anyhow::Result<tileflow_daemon::serve::SetLogLevel> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .with_context(|| format!("log.level {:?} is not a valid filter", config.log.level))?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(io::stderr)
                .with_ansi(ansi),
        )
        .try_init()
        .context("cannot set up logging")?;
    Ok(Box::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

/// Loads the configuration: defaults, file, drop-ins, environment, then the flags given on the
/// command line (a flag's environment twin is read by the environment layer already).
fn load(flags: &Flags, matches: &ArgMatches) -> Result<Loaded, ConfigError> {
    Config::load_detailed(&sources(flags, matches))
}

/// Where the configuration comes from (kept for SIGHUP, which reads them again).
fn sources(flags: &Flags, matches: &ArgMatches) -> ConfigSources {
    let mut opts = ConfigSources {
        config: flags.config.as_ref().map(Into::into),
        ..ConfigSources::default()
    }
    .with_process_env();
    let overrides = [
        ("socket", &flags.socket, "server.socket", "--socket"),
        (
            "state_dir",
            &flags.state_dir,
            "models.state_dir",
            "--state-dir",
        ),
        ("device", &flags.device, "engine.device", "--device"),
    ];
    for (id, value, key, flag) in overrides {
        if let Some(value) = value.as_ref().filter(|_| from_command_line(matches, id)) {
            opts = opts.with_flag(key, value.clone(), flag);
        }
    }
    if !flags.preload.is_empty() {
        let quoted: Vec<String> = flags.preload.iter().map(|m| toml_string(m)).collect();
        opts = opts.with_flag(
            "models.preload",
            format!("[{}]", quoted.join(", ")),
            "--preload",
        );
    }
    let numbers = [
        (flags.expert_slots, "cache.expert_slots", "--expert-slots"),
        (
            flags.prefetch_depth,
            "cache.prefetch_depth",
            "--prefetch-depth",
        ),
        (flags.max_waiting, "scheduler.max_waiting", "--max-waiting"),
        (flags.max_running, "scheduler.max_running", "--max-running"),
    ];
    for (value, key, flag) in numbers {
        if let Some(v) = value {
            opts = opts.with_flag(key, v.to_string(), flag);
        }
    }
    let sizes = [
        (&flags.device_bytes, "cache.device_bytes", "--device-bytes"),
        (&flags.host_bytes, "cache.host_bytes", "--host-bytes"),
    ];
    for (value, key, flag) in sizes {
        if let Some(v) = value {
            opts = opts.with_flag(key, v.clone(), flag);
        }
    }
    if let Some(addr) = &flags.metrics_listen {
        opts = opts.with_flag(
            "server.metrics_listen",
            toml_string(addr),
            "--metrics-listen",
        );
    }
    opts
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Whether the global argument `id` was given on the command line, at any subcommand level.
fn from_command_line(matches: &ArgMatches, id: &str) -> bool {
    let mut level = Some(matches);
    while let Some(m) = level {
        if m.value_source(id) == Some(ValueSource::CommandLine) {
            return true;
        }
        level = m.subcommand().map(|(_, sub)| sub);
    }
    false
}

/// `config check`'s output: the effective configuration, each value not at its default marked
/// with where it was set.
fn check_report(loaded: &Loaded) -> String {
    let files = if loaded.files.is_empty() {
        "none".to_owned()
    } else {
        let names: Vec<String> = loaded
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        names.join(", ")
    };
    let header = format!(
        "# Effective tileflowd configuration: valid.\n# Files read: {files}.\n# Values set \
         by a file, the environment or a flag say so at the end of their line.\n"
    );
    loaded
        .config
        .to_annotated_toml(&header, |key| match loaded.origin(key) {
            Origin::Default => None,
            origin => Some(format!("from {origin}")),
        })
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    match io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}
