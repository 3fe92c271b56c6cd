//! The registry of config keys: each key's documentation and whether a running daemon can apply
//! a change to it. The registry renders `tileflowd config default` (and so `etc/tileflowd.toml`)
//! and decides what a SIGHUP applies; a test keeps it in step with the serde types.

use super::Config;

/// When a running daemon takes up a changed value (on SIGHUP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// At once.
    Live,
    /// For models loaded after the reload; models already loaded keep the old value until they
    /// are unloaded and loaded again.
    NextLoad,
    /// Only after a restart.
    Restart,
}

/// One key of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigKey {
    /// Dotted name, `section.key`.
    pub key: &'static str,
    /// What the key does, in comment form (lines separated by `\n`).
    pub doc: &'static str,
    /// When a changed value takes effect.
    pub apply: Apply,
}

/// The keys whose values differ between two configurations, by when they take effect, each
/// list in the order of [`KEYS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Applied at once on SIGHUP.
    pub live: Vec<&'static str>,
    /// Applied to models loaded after the reload.
    pub next_load: Vec<&'static str>,
    /// Applied after a restart.
    pub restart: Vec<&'static str>,
}

impl ConfigDiff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.next_load.is_empty() && self.restart.is_empty()
    }
}

impl ConfigKey {
    /// The section: `scheduler` for `scheduler.max_running`.
    pub fn section(&self) -> &'static str {
        self.key.split_once('.').map_or(self.key, |(s, _)| s)
    }

    /// The key within its section: `max_running` for `scheduler.max_running`.
    pub fn name(&self) -> &'static str {
        self.key.split_once('.').map_or(self.key, |(_, k)| k)
    }

    /// The environment variable that sets it: `TILEFLOW_SCHEDULER__MAX_RUNNING`.
    pub fn env_var(&self) -> String {
        format!(
            "TILEFLOW_{}__{}",
            self.section().to_ascii_uppercase(),
            self.name().to_ascii_uppercase()
        )
    }
}

const fn key(key: &'static str, live: bool, doc: &'static str) -> ConfigKey {
    let apply = if live { Apply::Live } else { Apply::Restart };
    ConfigKey { key, doc, apply }
}

/// A key that applies to models loaded after a reload.
const fn per_load(key: &'static str, doc: &'static str) -> ConfigKey {
    ConfigKey {
        key,
        doc,
        apply: Apply::NextLoad,
    }
}

/// Every key, grouped by section in file order.
pub const KEYS: &[ConfigKey] = &[
    key("server.socket", false, "Path of the API socket (HTTP/1.1). Under socket activation systemd creates it\n(tileflowd.socket) and this path is only compared with the one passed in."),
    key("server.socket_mode", false, "Permission bits of the socket file, an octal string. Whoever can open the socket\nmay run inference and read status."),
    key("server.socket_group", false, "Group of the socket file; \"\" leaves the daemon's own group. A missing group is an\nerror as root and a warning otherwise."),
    key("server.admin_group", false, "Members of this group (and root) may use admin routes: import, load, unload, rm,\ntune. \"\" means root only."),
    key("server.metrics_listen", false, "Loopback IP:port of a TCP listener that serves /metrics only, for Prometheus,\nsuch as \"127.0.0.1:9464\"; \"\" for none. /metrics is always on the socket too."),
    key("server.request_timeout", true, "A request not finished in this time is cancelled."),
    key("server.drain_grace", true, "On SIGTERM, running requests may finish for this long, then they are cancelled."),
    key("server.max_body_bytes", true, "Largest request body accepted (bytes, or with a unit: \"64KiB\", \"1MB\")."),
    key("engine.device", false, "Compute device: \"auto\" (the first GPU when the build has CUDA and one is usable,\nelse the CPU), \"cpu\", \"cuda\" (the first GPU) or \"cuda:N\" (GPU N). A GPU asked for\nthat cannot be used stops the start. Compiled GPU kernels are cached in\n$CACHE_DIRECTORY (systemd's CacheDirectory=), else in <models.state_dir>/cache."),
    key("engine.threads", false, "CPU worker threads; 0 uses every core."),
    key("scheduler.max_running", false, "Requests decoded together in one batch at most."),
    key("scheduler.max_waiting", true, "Requests queued behind the running batch at most; more are refused with 429."),
    key("scheduler.prefill_chunk", false, "Prompt tokens prefilled per step at most, so that a long prompt does not stall\nthe running decodes."),
    key("scheduler.kv_blocks", false, "Blocks in the paged KV cache, shared by all requests."),
    key("scheduler.kv_block_size", false, "Token slots per KV block."),
    key("models.state_dir", false, "The model store: imported tile packs, tuning results and routing profiles."),
    key("models.preload", false, "Models loaded before the daemon reports ready, such as [\"olmoe\"]."),
    per_load("cache.device_bytes", "Bytes of device-tier expert slots (VRAM on CUDA, RAM on the CPU backend), per\nloaded model: each model gets this budget. Bytes or a size such as \"8GiB\"; 0 holds\nevery expert of the model. At least one slot is always allocated."),
    per_load("cache.expert_slots", "Device-tier expert slots per loaded model; when nonzero it overrides\ncache.device_bytes. 0 sizes the tier by cache.device_bytes."),
    per_load("cache.host_bytes", "Bytes of page-locked host-tier slots per loaded model, between storage and the\ndevice tier. 0: no host tier, reads go through a small staging ring
(prefetch then gains little)."),
    per_load("cache.policy", "Eviction policy of both tiers: \"lru\" (least recently used) or \"lfru\" (least\nfrequently used with decay, recency breaking ties: hot experts survive a burst of\ncold ones)."),
    per_load("cache.verify", "Checksum verification of expert reads: \"first\" (first read of each expert),\n\"always\" or \"never\" (raw-path benchmarks only)."),
    per_load("cache.tile_size", "I/O and DMA unit: an expert is read as ceil(bytes / tile_size) tiles, each copied\nto the device as it lands. A positive multiple of 4096 (\"4KiB\"), at most 1GiB."),
    per_load("cache.prefetch_depth", "MoE layers ahead whose experts the prefetcher predicts after each router (router\nlook-ahead); 0 turns prefetch off."),
    per_load("cache.prefetch_rate", "Prefetch pacing, per loaded model: bytes per second the token bucket refills\n(\"2GB\" reads as 2 GB/s); 0: no rate limit, only cache.prefetch_burst. Demand\nreads never wait for the bucket."),
    per_load("cache.prefetch_burst", "Prefetch bytes in flight at most per loaded model (the token bucket's depth); at\nleast cache.tile_size while prefetch is on."),
    per_load("cache.pin", "Experts kept in the device tier from load on and never evicted, as\n\"LAYER:EXPERT\" strings: [\"0:3\", \"1:7\"] (or \"0:3,1:7\" in the environment).\nPinned slots count against the device budget of every model loaded."),
    per_load("cache.cpu_experts", "Hybrid execution: selected experts that miss the device tier but sit in the host\ntier run on the CPU from their host slots. \"auto\": as many per step as let the\nCPU and the copies to the GPU finish together (a cost model measured as it runs;\nnever on the CPU backend), \"never\", or \"always\" (every host-tier miss)."),
    per_load("storage.backend", "Storage backend reading experts.tiles: \"auto\" (io_uring when the kernel allows\nit, else pread), \"io_uring\" (a model fails to load without it) or \"pread\"."),
    per_load("storage.queue_depth", "Reads in flight at most per loaded model (io_uring ring size, pread threads),\n1 to 4096."),
    per_load("storage.sqpoll", "io_uring: a kernel thread polls the submission queue (IORING_SETUP_SQPOLL);\nlower latency for a busy CPU core."),
    per_load("storage.direct", "Open packs with O_DIRECT, bypassing the page cache; filesystems that refuse it\n(tmpfs) fall back to buffered reads, which /api/cache reports."),
    key("log.level", true, "Log filter in tracing EnvFilter syntax: \"info\", \"debug\",\n\"info,tileflow_engine=debug\"."),
    key("log.format", false, "Log line format: \"text\" or \"json\"."),
];

/// Section headings, in file order.
const SECTIONS: &[(&str, &str)] = &[
    (
        "server",
        "The API socket, the metrics listener and request limits.",
    ),
    ("engine", "The compute device."),
    ("scheduler", "Continuous batching and the paged KV cache."),
    ("models", "The model store and the models loaded at start."),
    (
        "cache",
        "The expert tiers of each loaded model. Every budget is per model, and a change\n# applies to models loaded after the reload (or restart).",
    ),
    ("storage", "How expert tiles are read from storage (per loaded model)."),
    (
        "log",
        "Logging (to stderr, which systemd sends to the journal).",
    ),
];

const DEFAULT_HEADER: &str = "\
# tileflowd configuration: every option, with its default.
#
# Read in layers, each over the one before: built-in defaults; this file
# (/etc/tileflow/tileflowd.toml, or --config FILE); drop-ins FILE.d/*.toml in lexical order,
# each setting any subset of keys; environment variables TILEFLOW_<SECTION>__<KEY> such as
# TILEFLOW_SCHEDULER__MAX_RUNNING=64; then the flags --socket, --state-dir and --device.
# `tileflowd config check` validates the result and prints it with where each value came from.
#
# Sizes are bytes or take a unit (\"64KiB\", \"1MB\"); durations are seconds or take a unit
# (\"30s\", \"10m\", \"1h30m\"). Keys marked (live) are applied on SIGHUP (systemctl reload
# tileflowd); keys marked (next load) apply on SIGHUP to models loaded after the reload;
# the others need a restart.
";

/// Looks up a key by section and name.
pub(crate) fn find(section: &str, name: &str) -> Option<&'static ConfigKey> {
    KEYS.iter()
        .find(|k| k.section() == section && k.name() == name)
}

/// Whether `section` is a section of the file.
pub(crate) fn is_section(section: &str) -> bool {
    SECTIONS.iter().any(|(s, _)| *s == section)
}

/// `config` as a table of sections; infallible for our types (every field maps to TOML).
pub(crate) fn to_table(config: &Config) -> toml::Table {
    toml::Table::try_from(config).unwrap_or_default()
}

/// The value of `key` in a table of sections.
pub(crate) fn lookup<'t>(table: &'t toml::Table, key: &ConfigKey) -> Option<&'t toml::Value> {
    table.get(key.section())?.as_table()?.get(key.name())
}

/// Renders `config` as commented TOML under `header` (the default file's when `None`).
/// `origin(key)` may give a note for a key's line (where
/// its value came from); with no notes this is the default file.
pub(crate) fn render(
    config: &Config,
    header: Option<&str>,
    origin: impl Fn(&str) -> Option<String>,
) -> String {
    let table = to_table(config);
    let mut out = String::from(header.unwrap_or(DEFAULT_HEADER));
    for (section, heading) in SECTIONS {
        out.push_str(&format!("\n# {heading}\n[{section}]\n"));
        for key in KEYS.iter().filter(|k| k.section() == *section) {
            out.push('\n');
            for line in key.doc.lines() {
                out.push_str("# ");
                out.push_str(line);
                out.push('\n');
            }
            match key.apply {
                // Mark the last doc line: "… cancelled. (live)".
                Apply::Live => out.insert_str(out.len() - 1, " (live)"),
                Apply::NextLoad => out.insert_str(out.len() - 1, " (next load)"),
                Apply::Restart => {}
            }
            let value = lookup(&table, key)
                .map(ToString::to_string)
                .unwrap_or_default();
            out.push_str(&format!("{} = {value}", key.name()));
            if let Some(note) = origin(key.key) {
                out.push_str(&format!("  # {note}"));
            }
            out.push('\n');
        }
    }
    out
}

/// See [`Config::live_diff`].
pub(crate) fn live_diff(old: &Config, new: &Config) -> ConfigDiff {
    let (old, new) = (to_table(old), to_table(new));
    let mut diff = ConfigDiff::default();
    for k in KEYS.iter().filter(|k| lookup(&old, k) != lookup(&new, k)) {
        match k.apply {
            Apply::Live => diff.live.push(k.key),
            Apply::NextLoad => diff.next_load.push(k.key),
            Apply::Restart => diff.restart.push(k.key),
        }
    }
    diff
}
