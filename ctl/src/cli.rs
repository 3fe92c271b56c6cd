//! Command-line definition of `tilectl`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tileflow_gpu::DeviceChoice;

/// Where commands act, for `--help`.
const WHERE: &str = "\
Where commands act:
  Through the daemon (the default): status, ps, metrics, run, and model list|show|import|load|unload|rm.
    tilectl talks to tileflowd on --socket, else $TILEFLOW_SOCKET, else /run/tileflowd.sock.
    If nothing answers there the command fails and says so; it never falls back to the store silently.
  On the store directly, without the daemon: the same model commands and run, when --offline or
    --state-dir DIR is given. The store is DIR, else $TILEFLOW_STATE_DIR, else /var/lib/tileflow as
    root and $XDG_DATA_HOME/tileflow (~/.local/share/tileflow) otherwise. load and unload need the daemon.
  Always local: model synth (writes into the store, or --out DIR), bench (runs on the store), demo
    (starts its own tileflowd on a temporary socket and store; --offline runs the old in-process demo),
    completions, man.";

/// TileFlow admin CLI: manage models, run generations, inspect the daemon.
#[derive(Debug, Parser)]
#[command(name = "tilectl", version, about, propagate_version = true, after_long_help = WHERE)]
pub struct Cli {
    /// Socket of tileflowd, for the commands that go through the daemon.
    #[arg(
        long,
        global = true,
        env = "TILEFLOW_SOCKET",
        value_name = "PATH",
        default_value = tileflow_client::DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// Act on the model store directly instead of through the daemon (see "Where commands act"
    /// in --help).
    #[arg(long, global = true)]
    pub offline: bool,
    /// Act on the model store in DIR directly (implies --offline).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the daemon's version, device, uptime, store and loaded models.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the loaded models with their queue, KV cache and expert cache state.
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Summarize the daemon's metrics: requests, tokens, mean latencies, expert tiers (hit
    /// ratios, bytes read, prefetch outcomes, stall quantiles, failures).
    Metrics {
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Print the Prometheus text as the daemon serves it.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
    },
    /// Manage models: through the daemon, or in the store with --offline / --state-dir.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Chat with a model (interactive, or lines piped on stdin), or complete --prompt; streamed
    /// through the daemon, or offline in-process (on --device) with --offline / --state-dir.
    Run(RunArgs),
    /// Measure this machine and the store's models (always local, never through the daemon).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Start a tileflowd on a temporary socket and store, synthesize and load the `tiny` model,
    /// stream a chat completion, print the expert cache, stop the daemon.
    Demo(DemoArgs),
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages into a directory.
    Man {
        /// Output directory.
        dir: PathBuf,
    },
}

/// `tilectl model …`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Import a Hugging Face checkpoint directory as a tile pack.
    Import(ImportArgs),
    /// Make a random-weight model of a real shape (always local: into the store or --out).
    Synth(SynthArgs),
    /// List stored models (through the daemon: with whether each is loaded).
    #[command(alias = "ls")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one model's spec and pack.
    Show {
        /// Model name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load models into the daemon (admin).
    Load {
        /// Model names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Unload models from the daemon (admin).
    Unload {
        /// Model names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove models (through the daemon: unloading them first).
    Rm {
        /// Model names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `tilectl bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Generate with routed experts streaming through a small expert cache, once per prefetch
    /// depth: tokens/s, stall per token, prefetch outcomes, look-ahead recall, bytes read.
    Stream(BenchStreamArgs),
    /// Storage -> host -> device bandwidth against tile size and queue depth, for each storage
    /// backend, beside plain sequential O_DIRECT pread (the input of the tuner).
    Io(BenchIoArgs),
}

/// `tilectl bench stream`.
#[derive(Debug, Args)]
pub struct BenchStreamArgs {
    /// Model name in the store.
    pub model: String,
    /// Prompt text (repeatable) [default: a built-in set of prompts].
    #[arg(long, short)]
    pub prompt: Vec<String>,
    /// Sequences generated together (prompts are repeated to fill the batch).
    #[arg(long, default_value_t = 1, value_parser = positive_count)]
    pub batch: usize,
    /// Greedy tokens generated per sequence.
    #[arg(long, default_value_t = 32, value_parser = positive_count)]
    pub tokens: usize,
    /// Generations of the batch per depth, on the same loaded model: the decode speed
    /// reported is the best one's (each is listed), the counters cover them all.
    #[arg(long, default_value_t = 1, value_parser = positive_count)]
    pub repeats: usize,
    /// Prefetch depths to compare, comma-separated (0: prefetch off).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub prefetch_depths: Vec<usize>,
    /// Hybrid modes to compare at each depth, comma-separated: which device-tier misses the
    /// CPU computes from the host tier (auto, never, always).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub cpu_experts: Vec<CpuExpertsArg>,
    /// Bytes of device-tier expert slots [default: every expert resident].
    #[arg(long, value_name = "SIZE", value_parser = byte_size)]
    pub device_bytes: Option<u64>,
    /// Device-tier expert slots, overriding --device-bytes.
    #[arg(long, value_name = "N", value_parser = positive_count)]
    pub expert_slots: Option<usize>,
    /// Bytes of host-tier expert slots (0: no host tier) [default: the tier's, 1GiB].
    #[arg(long, value_name = "SIZE", value_parser = byte_size)]
    pub host_bytes: Option<u64>,
    /// Evict with the frequency-aware policy (LFU with decay) instead of LRU.
    #[arg(long)]
    pub lfru: bool,
    /// Most prefetch bytes in flight at once [default: the tier's default].
    #[arg(long, value_name = "SIZE", value_parser = byte_size)]
    pub prefetch_burst: Option<u64>,
    /// Prefetch token-bucket refill, bytes per second [default: unpaced].
    #[arg(long, value_name = "SIZE", value_parser = byte_size)]
    pub prefetch_rate: Option<u64>,
    /// CPU threads [default: one per core].
    #[arg(long, value_name = "N", value_parser = positive_count)]
    pub threads: Option<usize>,
    /// Compute device: auto (the first GPU when this build has CUDA and one is usable, else
    /// the CPU), cpu, cuda or cuda:N [default: auto].
    #[arg(long, value_name = "DEVICE", value_parser = crate::device::parse_choice)]
    pub device: Option<DeviceChoice>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Prompt length in tokens: each prompt is tokenized, then repeated or cut to N tokens.
    #[arg(long, value_name = "N", value_parser = positive_count)]
    pub prompt_tokens: Option<usize>,
    /// Read every expert into the tiers before measuring (a warm cache: the device tier holds
    /// what fits, the host tier the rest that fits; the counters start afterwards).
    #[arg(long)]
    pub warm: bool,
    /// After each run, measure the CPU expert kernels against a plain read of the same
    /// host-tier slots (best of two passes each).
    #[arg(long)]
    pub cpu_bandwidth: bool,
}

/// `--cpu-experts`: which device-tier misses the CPU computes from the host tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuExpertsArg {
    /// As many per step as let the CPU and the copies finish together (GPU backends).
    Auto,
    /// None: every selected expert is copied to the device.
    Never,
    /// Every host-tier miss.
    Always,
}

impl From<CpuExpertsArg> for tileflow_engine::tier::CpuExperts {
    fn from(c: CpuExpertsArg) -> Self {
        match c {
            CpuExpertsArg::Auto => Self::Auto,
            CpuExpertsArg::Never => Self::Never,
            CpuExpertsArg::Always => Self::Always,
        }
    }
}

/// A storage backend `bench io` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchBackend {
    /// io_uring, O_DIRECT, registered buffers.
    #[value(name = "io_uring")]
    IoUring,
    /// The pread thread pool.
    Pread,
}

/// `tilectl bench io`.
#[derive(Debug, Args)]
pub struct BenchIoArgs {
    /// Read this stored model's experts.tiles (the store as for offline commands).
    #[arg(conflicts_with_all = ["file", "size"])]
    pub model: Option<String>,
    /// Read this file.
    #[arg(long, value_name = "PATH", conflicts_with = "size")]
    pub file: Option<PathBuf>,
    /// Without MODEL or --file: write a temporary file of this many random bytes (removed
    /// afterwards).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = byte_size)]
    pub size: u64,
    /// Directory for the temporary file [default: the state directory if it exists, else the
    /// system temporary directory].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Tile sizes (I/O unit), multiples of 4KiB.
    #[arg(
        long,
        value_name = "SIZES",
        value_delimiter = ',',
        default_value = "256KiB,1MiB,4MiB",
        value_parser = byte_size
    )]
    pub tile_sizes: Vec<u64>,
    /// Queue depths (reads in flight).
    #[arg(
        long,
        value_name = "DEPTHS",
        value_delimiter = ',',
        default_value = "1,4,16,32",
        value_parser = positive_depth
    )]
    pub queue_depths: Vec<u32>,
    /// Storage backends.
    #[arg(
        long,
        value_name = "NAMES",
        value_delimiter = ',',
        default_value = "io_uring,pread"
    )]
    pub backends: Vec<BenchBackend>,
    /// Bytes read per point [default: the whole file, at most 1GiB].
    #[arg(long, value_name = "SIZE", value_parser = byte_size)]
    pub bytes: Option<u64>,
    /// Print every point as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `tilectl model import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json).
    pub dir: PathBuf,
    /// Name in the store (default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
}

/// `tilectl model synth`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("dest").required(true).args(["out", "name"]))]
pub struct SynthArgs {
    /// Preset: tiny, olmoe-1b-7b, qwen3-30b-a3b, qwen2-moe-a2.7b, mixtral-8x7b.
    #[arg(long)]
    pub preset: String,
    /// Write a Hugging Face checkpoint here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Write a tile pack into the store under this name.
    #[arg(long)]
    pub name: Option<String>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Zipf exponent of expert popularity per layer (0 = uniform).
    #[arg(long, default_value_t = 0.0)]
    pub route_skew: f64,
    /// Keep only the first N decoder layers (a preset too large for the disk; every layer
    /// keeps the preset's shapes).
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
}

/// Sampling and cache options shared by `run` and `demo`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Tokens to generate at most [default: 32; 256 per reply in an interactive chat].
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop at this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Return the N most likely tokens per step (0..=20; JSON output).
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Routed-expert slots in memory, at least 1 (default: every expert resident).
    #[arg(long, value_name = "N", value_parser = positive_count)]
    pub expert_slots: Option<usize>,
    /// Which device-tier misses the CPU computes from the host tier (offline; default:
    /// auto, which on the CPU backend is never).
    #[arg(long, value_enum)]
    pub cpu_experts: Option<CpuExpertsArg>,
    /// Print the result as JSON (offline: tokens, logprobs, timings; through the daemon: the
    /// completion objects).
    #[arg(long)]
    pub json: bool,
}

/// `tilectl run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model name.
    pub model: String,
    /// Prompt text, for one shot (repeatable: the prompts run together). Without a prompt
    /// (through the daemon): an interactive chat, one user turn per line of stdin.
    #[arg(long, short)]
    pub prompt: Vec<String>,
    /// Prompt as comma-separated token ids (repeatable).
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Vec<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message opening the conversation (chat through the daemon).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Compute device of an --offline run: auto (the first GPU when this build has CUDA and
    /// one is usable, else the CPU), cpu, cuda or cuda:N [default: auto]. Through the daemon,
    /// its engine.device decides.
    #[arg(long, value_name = "DEVICE", value_parser = crate::device::parse_choice)]
    pub device: Option<DeviceChoice>,
    #[command(flatten)]
    pub generate: GenerateArgs,
}

/// `tilectl demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Prompt text.
    #[arg(
        long,
        short,
        default_value = "The tile streams from disk to the GPU and"
    )]
    pub prompt: String,
    /// The tileflowd binary [default: the one beside tilectl, built first when tilectl runs
    /// under `cargo run`].
    #[arg(long, value_name = "PATH")]
    pub tileflowd: Option<PathBuf>,
    #[command(flatten)]
    pub generate: GenerateArgs,
}

/// A count of at least one.
fn positive_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A queue depth: 1 to the storage queue's maximum.
fn positive_depth(s: &str) -> Result<u32, String> {
    use tileflow_spdk::MAX_QUEUE_DEPTH;
    match s.trim().parse::<u32>() {
        Ok(n @ 1..=MAX_QUEUE_DEPTH) => Ok(n),
        Ok(_) => Err(format!("must be from 1 to {MAX_QUEUE_DEPTH}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A byte count as the daemon's config takes it (`4096`, `"64MiB"`, `"1.5GB"`).
pub fn byte_size(text: &str) -> Result<u64, String> {
    tileflow_client::units::parse_byte_size(text)
}

/// Prints completions for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    // Generated into memory first: clap_complete panics on a failed write, and a reader that
    // stops early (`| head`) is not a failure of ours.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tilectl", &mut script);
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the completions to stdout")
        }
        _ => Ok(()),
    }
}

/// Writes `tilectl.1` and one page per subcommand into `dir`.
pub fn man(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn state_dir_and_offline_are_global() {
        let cli = Cli::try_parse_from(["tilectl", "model", "list", "--state-dir", "/s"]).unwrap();
        assert_eq!(cli.state_dir.as_deref(), Some(Path::new("/s")));
        let cli = Cli::try_parse_from(["tilectl", "run", "m", "--offline", "-p", "x"]).unwrap();
        assert!(cli.offline);
    }

    #[test]
    fn bench_io_lists_parse_with_units() {
        let cli = Cli::try_parse_from([
            "tilectl",
            "bench",
            "io",
            "--tile-sizes",
            "64KiB,1MiB,4096",
            "--queue-depths",
            "1,4",
            "--backends",
            "pread",
        ])
        .unwrap();
        let Command::Bench {
            command: BenchCommand::Io(args),
        } = cli.command
        else {
            panic!("not bench io")
        };
        assert_eq!(args.tile_sizes, [64 << 10, 1 << 20, 4096]);
        assert_eq!(args.queue_depths, [1, 4]);
        assert_eq!(args.backends, [BenchBackend::Pread]);
        assert_eq!(args.size, 1 << 30);
        assert!(args.model.is_none() && args.file.is_none() && args.bytes.is_none());
        // The daemon's size syntax: fractions round down to whole bytes.
        assert_eq!(byte_size("2GB"), Ok(2_000_000_000));
        assert_eq!(byte_size("1.5MiB"), Ok(3 << 19));
        for bad in ["1G", "x", "", "99999999999TiB"] {
            assert!(byte_size(bad).is_err(), "{bad}");
        }
        for bad in [["--queue-depths", "0"], ["--backends", "spdk"]] {
            let mut argv = vec!["tilectl", "bench", "io"];
            argv.extend(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
        assert!(Cli::try_parse_from(["tilectl", "bench", "io", "m", "--file", "/f"]).is_err());
    }

    #[test]
    fn expert_slots_must_be_positive() {
        let parse = |slots: &str| {
            Cli::try_parse_from(["tilectl", "run", "m", "-p", "x", "--expert-slots", slots])
        };
        let Command::Run(run) = parse("2").unwrap().command else {
            panic!("not run")
        };
        assert_eq!(run.generate.expert_slots, Some(2));
        for bad in ["0", "two", ""] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("--expert-slots"), "{bad}: {e}");
        }
    }

    #[test]
    fn bench_stream_takes_a_depth_list() {
        let cli = Cli::try_parse_from([
            "tilectl",
            "bench",
            "stream",
            "m",
            "--prefetch-depths",
            "0,2",
            "--expert-slots",
            "8",
        ])
        .unwrap();
        let Command::Bench {
            command: BenchCommand::Stream(args),
        } = cli.command
        else {
            panic!("not bench stream")
        };
        assert_eq!(args.prefetch_depths, vec![0, 2]);
        assert_eq!(args.expert_slots, Some(8));
        assert_eq!((args.batch, args.tokens), (1, 32));
    }
}
