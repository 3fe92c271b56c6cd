//! The daemon's configuration.
//!
//! One set of serde types serves the file, its drop-ins, the environment and the flags. They are
//! layered, each over the one before:
//!
//! 1. built-in defaults ([`Config::default`]);
//! 2. the config file, `/etc/tileflow/tileflowd.toml` or `--config FILE` (a missing default file
//!    is fine, a missing explicit one is an error);
//! 3. drop-ins `<config file>.d/*.toml` in lexical order, each a partial overlay merged key by key;
//! 4. environment variables `TILEFLOW_<SECTION>__<KEY>` (for example
//!    `TILEFLOW_SCHEDULER__MAX_RUNNING=64`);
//! 5. command-line flags (`--socket`, `--state-dir`, `--device`).
//!
//! Every key is checked as its layer is read, so an unknown key or a value of the wrong type is
//! reported with the file and line (or the variable, or the flag) that set it; then
//! [`Config::validate`] checks ranges and cross-key rules and the error names the key and where
//! its value came from. [`Config::live_diff`] says which changes a SIGHUP can apply in place.

mod cache;
mod keys;
mod load;
mod units;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tileflow_engine::forward::KvCacheConfig;
use tileflow_engine::sched::SchedulerConfig as EngineSchedulerLimits;
use tileflow_gpu::{DeviceChoice, ParseDeviceError};

pub use cache::{CacheConfig, CachePolicy, CacheVerify, ExpertPin, StorageBackend, StorageConfig};
pub use keys::{Apply, ConfigDiff, ConfigKey, KEYS};
pub use load::{ConfigError, ConfigSources, Loaded, Origin, DEFAULT_CONFIG_PATH};
pub use units::{ByteSize, FileMode, HumanDuration, ListenAddr};

/// The whole configuration of `tileflowd`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The API socket and its limits.
    pub server: ServerConfig,
    /// The compute device.
    pub engine: EngineConfig,
    /// Continuous batching and the KV cache.
    pub scheduler: SchedulerConfig,
    /// Where models live and which load at start.
    pub models: ModelsConfig,
    /// The expert tiers of each loaded model.
    pub cache: CacheConfig,
    /// How expert tiles are read from storage.
    pub storage: StorageConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[server]`: the Unix socket, the optional metrics listener, request limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Path of the API socket (ignored under socket activation, where systemd owns it).
    pub socket: PathBuf,
    /// Permission bits of the socket file.
    pub socket_mode: FileMode,
    /// Group of the socket file; empty leaves the daemon's own group.
    pub socket_group: String,
    /// Group whose members may use admin routes (besides root); empty means root only.
    pub admin_group: String,
    /// Loopback `IP:port` for a TCP listener serving `/metrics` only; none when empty.
    pub metrics_listen: ListenAddr,
    /// A request not finished by then is cancelled.
    pub request_timeout: HumanDuration,
    /// On SIGTERM, how long running requests may continue before they are cancelled.
    pub drain_grace: HumanDuration,
    /// Largest request body accepted.
    pub max_body_bytes: ByteSize,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            socket: PathBuf::from("/run/tileflowd.sock"),
            socket_mode: FileMode(0o660),
            socket_group: "tileflow".into(),
            admin_group: "tileflow-admin".into(),
            metrics_listen: ListenAddr(None),
            request_timeout: HumanDuration(Duration::from_secs(600)),
            drain_grace: HumanDuration(Duration::from_secs(30)),
            max_body_bytes: ByteSize(1 << 20),
        }
    }
}

/// `engine.device`: which device runs the forward pass, written `"auto"`, `"cpu"`, `"cuda"` or
/// `"cuda:N"`. Any other text is refused as the value is read, naming the key, the value and
/// where it was set; whether a GPU is there is only known at start (see
/// [`tileflow_gpu::ComputeDevice::select`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Device(pub DeviceChoice);

impl TryFrom<String> for Device {
    type Error = ParseDeviceError;

    fn try_from(text: String) -> Result<Device, ParseDeviceError> {
        text.parse().map(Device)
    }
}

impl From<Device> for String {
    fn from(device: Device) -> String {
        device.0.to_string()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `[engine]`: the compute device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Backend choice, resolved once at start.
    pub device: Device,
    /// CPU worker threads; 0 uses every core.
    pub threads: usize,
}

/// `[scheduler]`: continuous batching limits and the paged KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Requests decoded together at most.
    pub max_running: usize,
    /// Requests queued at most; more are refused with 429.
    pub max_waiting: usize,
    /// Prompt tokens prefilled per step at most, so long prompts do not stall decodes.
    pub prefill_chunk: usize,
    /// Blocks in the KV cache pool (shared by all requests).
    pub kv_blocks: usize,
    /// Token slots per KV block.
    pub kv_block_size: usize,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            max_running: 32,
            max_waiting: 256,
            prefill_chunk: 512,
            kv_blocks: 4096,
            kv_block_size: 16,
        }
    }
}

impl SchedulerConfig {
    /// The engine scheduler's limits.
    pub fn limits(&self) -> EngineSchedulerLimits {
        EngineSchedulerLimits {
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            prefill_chunk: self.prefill_chunk,
        }
    }

    /// The engine's KV cache size.
    pub fn kv_cache(&self) -> KvCacheConfig {
        KvCacheConfig {
            num_blocks: self.kv_blocks,
            block_size: self.kv_block_size,
        }
    }
}

/// `[models]`: the model store and models loaded at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// The store: imported tile packs, tuning results, routing profiles.
    pub state_dir: PathBuf,
    /// Models loaded (and made resident) before the daemon reports ready.
    #[serde(deserialize_with = "units::name_list")]
    pub preload: Vec<String>,
}

impl Default for ModelsConfig {
    fn default() -> ModelsConfig {
        ModelsConfig {
            state_dir: PathBuf::from("/var/lib/tileflow"),
            preload: Vec::new(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (journald adds the timestamp).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: verbosity and format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing `EnvFilter` directive: `info`, `debug`, `info,tileflow_engine=trace`.
    pub level: String,
    /// Line format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A value outside what a key allows; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidValue {
    /// The dotted key, such as `scheduler.max_running`.
    pub key: &'static str,
    /// What is wrong, starting with the key.
    pub message: String,
}

fn invalid(key: &'static str, message: impl std::fmt::Display) -> InvalidValue {
    InvalidValue {
        key,
        message: format!("{key} {message}"),
    }
}

/// Unix socket paths longer than this do not fit `sockaddr_un.sun_path` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Config {
    /// Checks ranges and cross-key rules; the error names the first offending key.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        self.server.validate()?;
        self.cache.validate()?;
        self.storage.validate()?;
        let s = &self.scheduler;
        for (key, value) in [
            ("scheduler.max_running", s.max_running),
            ("scheduler.prefill_chunk", s.prefill_chunk),
            ("scheduler.kv_blocks", s.kv_blocks),
            ("scheduler.kv_block_size", s.kv_block_size),
        ] {
            if value < 1 {
                return Err(invalid(key, "must be ≥ 1"));
            }
        }
        if u32::try_from(s.kv_blocks).is_err() {
            return Err(invalid("scheduler.kv_blocks", "must be < 2^32"));
        }
        if s.max_running > s.kv_blocks {
            return Err(invalid(
                "scheduler.max_running",
                format_args!(
                    "({}) exceeds scheduler.kv_blocks ({}): every running request holds a KV block",
                    s.max_running, s.kv_blocks
                ),
            ));
        }
        let m = &self.models;
        if !m.state_dir.is_absolute() {
            return Err(invalid(
                "models.state_dir",
                format_args!("must be an absolute path, not {:?}", m.state_dir),
            ));
        }
        for (i, name) in m.preload.iter().enumerate() {
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(invalid(
                    "models.preload",
                    format_args!("has {name:?}, which is not a model name"),
                ));
            }
            if m.preload[..i].contains(name) {
                return Err(invalid(
                    "models.preload",
                    format_args!("names {name:?} twice"),
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return Err(invalid(
                "log.level",
                format_args!(
                    "{:?} is not a log filter such as \"info\": {e}",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    /// The keys whose values differ between `old` and `new`, split by when a running daemon
    /// takes them up: at once, for models loaded after the reload, or after a restart.
    pub fn live_diff(old: &Config, new: &Config) -> ConfigDiff {
        keys::live_diff(old, new)
    }

    /// The default configuration as a commented TOML file listing every key; `etc/tileflowd.toml`
    /// is this text.
    pub fn default_toml() -> String {
        keys::render(&Config::default(), None, |_| None)
    }

    /// This configuration as TOML, every key with its documentation, under `header` (comment
    /// lines), each key's line annotated with `origin(key)` where that gives a note.
    pub fn to_annotated_toml(
        &self,
        header: &str,
        origin: impl Fn(&str) -> Option<String>,
    ) -> String {
        keys::render(self, Some(header), origin)
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), InvalidValue> {
        let path = &self.socket;
        if !path.is_absolute() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return Err(invalid(
                "server.socket",
                format_args!("must be an absolute file path, not {path:?}"),
            ));
        }
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(invalid(
                "server.socket",
                format_args!(
                    "is {len} bytes long; Unix socket paths hold {MAX_SOCKET_PATH} at most"
                ),
            ));
        }
        if self.socket_mode.bits() > 0o777 {
            return Err(invalid(
                "server.socket_mode",
                format_args!(
                    "{} may only hold permission bits (≤ 0777)",
                    self.socket_mode
                ),
            ));
        }
        for (key, group) in [
            ("server.socket_group", &self.socket_group),
            ("server.admin_group", &self.admin_group),
        ] {
            if group.contains(|c: char| c == ':' || c == '/' || c.is_whitespace() || c.is_control())
            {
                return Err(invalid(key, format_args!("{group:?} is not a group name")));
            }
        }
        if let Some(addr) = self.metrics_listen.get() {
            if !addr.ip().is_loopback() {
                return Err(invalid(
                    "server.metrics_listen",
                    format_args!(
                        "must be a loopback address such as 127.0.0.1:9464 or [::1]:9464, not \
                         {addr}: /metrics has no authentication"
                    ),
                ));
            }
            if addr.port() == 0 {
                return Err(invalid(
                    "server.metrics_listen",
                    "needs a port (Prometheus scrapes a fixed one)",
                ));
            }
        }
        if self.request_timeout.get().is_zero() {
            return Err(invalid("server.request_timeout", "must be > 0"));
        }
        if self.max_body_bytes.bytes() < 1 {
            return Err(invalid("server.max_body_bytes", "must be ≥ 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_device;
