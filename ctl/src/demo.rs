//! `tilectl demo`: the whole service path in one command. Starts a private `tileflowd` on a
//! temporary socket and store (CPU backend), synthesizes the `tiny` model into the store,
//! loads it through the API, streams a chat completion through the socket, prints the expert
//! cache and stops the daemon with SIGTERM, expecting exit 0.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tileflow_client::blocking::Client;
use tileflow_client::openai::{ChatCompletionRequest, ChatMessage, StreamOptions};
use tileflow_engine::pack::write::{write_pack, Progress};
use tileflow_engine::store::Store;
use tileflow_engine::synth::Synth;

use crate::cli::DemoArgs;
use crate::output::{human_bytes, human_seconds, print_json};

const MODEL: &str = "tiny";
/// How long the daemon may take to answer /health, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

fn say(message: impl AsRef<str>) {
    eprintln!("demo: {}", message.as_ref());
}

/// The workspace this tilectl was built from, if it is still there.
fn workspace() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    root.join("Cargo.toml")
        .is_file()
        .then(|| root.to_path_buf())
}

/// `tileflowd`: `--tileflowd`, else the one beside this tilectl. Under `cargo run` (which sets
/// `CARGO`) or when it is missing, it is built first with the same profile into the same
/// target directory (a no-op when up to date).
fn locate_tileflowd(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--tileflowd {}: no such file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find tilectl's own path")?;
    let dir = exe
        .parent()
        .context("tilectl's path has no directory")?
        .to_path_buf();
    let beside = dir.join("tileflowd");
    let under_cargo = std::env::var_os("CARGO").is_some();
    if let (true, Some(root)) = (under_cargo || !beside.is_file(), workspace()) {
        build_tileflowd(&root, &dir)?;
    }
    if !beside.is_file() {
        bail!(
            "tileflowd is not beside tilectl in {}: build it (cargo build --release --bin \
             tileflowd) or pass --tileflowd PATH",
            dir.display()
        );
    }
    Ok(beside)
}

/// `cargo build --bin tileflowd` for the profile whose output directory is `dir`.
fn build_tileflowd(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let profile = dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
    let target = dir.parent().context("no target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bin", "tileflowd", "-p", "tileflow-daemon"])
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target)
        .stdout(Stdio::null());
    let shown = match profile {
        "debug" => "cargo build --bin tileflowd".to_string(),
        "release" => {
            cmd.arg("--release");
            "cargo build --release --bin tileflowd".to_string()
        }
        other => {
            cmd.args(["--profile", other]);
            format!("cargo build --profile {other} --bin tileflowd")
        }
    };
    say(format!("building tileflowd ({shown})"));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// The daemon's configuration: no socket group to set, the invoking user's primary group as
/// the admin group (so that it may load models), a short drain.
fn config_text() -> String {
    let admin = if nix::unistd::geteuid().is_root() {
        String::new()
    } else {
        nix::unistd::Group::from_gid(nix::unistd::getegid())
            .ok()
            .flatten()
            .map(|g| g.name)
            .unwrap_or_default()
    };
    format!(
        "# tilectl demo: a private tileflowd on a temporary socket.\n\
         [server]\nsocket_group = \"\"\nadmin_group = {}\ndrain_grace = \"10s\"\n\
         [engine]\ndevice = \"cpu\"\n[log]\nlevel = \"warn\"\n",
        serde_json::Value::String(admin)
    )
}

/// The running daemon; killed if the demo fails before stopping it.
#[derive(Debug)]
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(tileflowd: &Path, dir: &Path, expert_slots: Option<usize>) -> anyhow::Result<Daemon> {
        let config = dir.join("tileflowd.toml");
        std::fs::write(&config, config_text())
            .with_context(|| format!("cannot write {}", config.display()))?;
        let log = dir.join("tileflowd.log");
        let stderr =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(tileflowd);
        cmd.arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(dir.join("tileflowd.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--device", "cpu"]);
        if let Some(n) = expert_slots {
            cmd.args(["--expert-slots", &n.to_string()]);
        }
        // Nothing of the caller's environment configures this daemon.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("TILEFLOW_")
                || k.starts_with("LISTEN_")
                || k.starts_with("WATCHDOG_")
                || k == "NOTIFY_SOCKET"
            {
                cmd.env_remove(&key);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", tileflowd.display()))?;
        Ok(Daemon { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the daemon's log, to explain a failure.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n  ");
        if tail.is_empty() {
            "(tileflowd wrote nothing to its log)".into()
        } else {
            format!("tileflowd's log:\n  {tail}")
        }
    }

    /// Waits until /health answers.
    fn wait_ready(&mut self, client: &Client) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "tileflowd exited before it was ready ({status}); {}",
                    self.log_tail()
                );
            }
            match client.health() {
                Ok(_) => return Ok(started.elapsed()),
                Err(e) if e.is_connect() && started.elapsed() < START_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("tileflowd is not ready; {}", self.log_tail())))
                }
            }
        }
    }

    /// SIGTERM, then waits for exit 0.
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.pid()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM).context("cannot send SIGTERM to tileflowd")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                if status.success() {
                    say(format!(
                        "SIGTERM: tileflowd drained and exited 0 after {}",
                        human_seconds(started.elapsed().as_secs_f64())
                    ));
                    return Ok(());
                }
                bail!(
                    "tileflowd exited with {status} after SIGTERM; {}",
                    self.log_tail()
                );
            }
            if started.elapsed() > STOP_TIMEOUT {
                bail!(
                    "tileflowd did not exit within {} s of SIGTERM; {}",
                    STOP_TIMEOUT.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Synthesizes `tiny` into the store under `state`.
fn synthesize(state: &Path) -> anyhow::Result<()> {
    let store = Store::new(state);
    let synth = Synth::new(MODEL, 0, 1.0)?;
    let txn = store.begin(MODEL)?;
    let manifest = write_pack(&synth, MODEL, txn.dir(), &|_: Progress| {})?;
    txn.commit()?;
    let bytes = store.get(MODEL).map(|m| m.disk_bytes).unwrap_or(0);
    say(format!(
        "synthesized `{MODEL}` into the store (random weights, no download): {} experts, {}",
        manifest.experts.len(),
        human_bytes(bytes)
    ));
    Ok(())
}

/// `tilectl demo`.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let g = &args.generate;
    if g.logprobs.is_some() {
        bail!("--logprobs is for `tilectl --offline demo`");
    }
    let tileflowd = locate_tileflowd(args.tileflowd.clone())?;
    let mut base = std::env::temp_dir();
    // A socket path must fit in sun_path (108 bytes).
    if base.as_os_str().len() > 60 {
        base = PathBuf::from("/tmp");
    }
    let dir = tempfile::Builder::new()
        .prefix("tileflow-demo-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a temporary directory in {}", base.display()))?;
    let socket = dir.path().join("tileflowd.sock");
    let state = dir.path().join("state");
    say(format!(
        "tileflowd {} on {}, store {}, CPU backend",
        tileflowd.display(),
        socket.display(),
        state.display()
    ));
    synthesize(&state)?;
    let mut daemon = Daemon::start(&tileflowd, dir.path(), g.expert_slots)?;
    let client = Client::new(&socket)?;
    let ready = daemon.wait_ready(&client)?;
    say(format!(
        "tileflowd ready after {} (pid {})",
        human_seconds(ready.as_secs_f64()),
        daemon.pid()
    ));
    client
        .load_model(MODEL)
        .with_context(|| format!("cannot load {MODEL}; {}", daemon.log_tail()))?;
    say(format!("POST /api/models/{MODEL}/load: loaded"));
    say(format!(
        "POST /v1/chat/completions (streamed), user: {}",
        args.prompt
    ));
    chat(&client, &args)?;
    let cache = client.cache()?;
    say("GET /api/cache:");
    if g.json {
        print_json(&cache)?;
    } else {
        crate::remote::cache_table(&cache);
    }
    daemon.stop()?;
    Ok(())
}

/// Streams the chat reply to stdout and reports its token counts.
fn chat(client: &Client, args: &DemoArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let g = &args.generate;
    let request = ChatCompletionRequest {
        model: MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
            name: None,
        }],
        max_tokens: Some(u32::try_from(g.max_tokens.unwrap_or(32)).unwrap_or(u32::MAX)),
        temperature: Some(g.temperature),
        top_p: Some(g.top_p),
        top_k: Some(i64::try_from(g.top_k).unwrap_or(i64::MAX)),
        seed: g.seed,
        stop: (!g.stop.is_empty()).then(|| tileflow_client::openai::Stop::Many(g.stop.clone())),
        ignore_eos: g.ignore_eos,
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        ..ChatCompletionRequest::default()
    };
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut usage = None;
    for chunk in client.chat_stream(&request)? {
        let chunk = chunk?;
        for choice in &chunk.choices {
            if let Some(text) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
        }
        usage = chunk.usage.or(usage);
    }
    writeln!(out)?;
    if let Some(u) = usage {
        let secs = started.elapsed().as_secs_f64();
        say(format!(
            "{} prompt tokens, {} generated in {} ({:.1} tokens/s)",
            u.prompt_tokens,
            u.completion_tokens,
            human_seconds(secs),
            u.completion_tokens as f64 / secs.max(1e-9)
        ));
    }
    Ok(())
}
