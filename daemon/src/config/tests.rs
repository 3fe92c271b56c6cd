use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tileflow_engine::tier::Verify;

use super::keys::to_table;
use super::*;

/// A config file (and drop-in directory) in a temporary directory.
pub(super) struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub(super) fn new(main: Option<&str>) -> Files {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = main {
            fs::write(dir.path().join("tileflowd.toml"), text).unwrap();
        }
        Files { dir }
    }

    pub(super) fn path(&self) -> PathBuf {
        self.dir.path().join("tileflowd.toml")
    }

    fn drop_in(&self, name: &str, text: &str) -> PathBuf {
        let d = self.dir.path().join("tileflowd.toml.d");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(name), text).unwrap();
        d.join(name)
    }

    pub(super) fn opts(&self) -> ConfigSources {
        ConfigSources {
            config: Some(self.path()),
            ..ConfigSources::default()
        }
    }
}

pub(super) fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    vars.iter().map(|(k, v)| (k.into(), v.into())).collect()
}

pub(super) fn load_err(opts: &ConfigSources) -> String {
    Config::load(opts).unwrap_err().to_string()
}

#[test]
fn the_registry_lists_exactly_the_serde_fields() {
    let table = to_table(&Config::default());
    let fields: BTreeSet<String> = table
        .iter()
        .flat_map(|(s, v)| {
            let keys: Vec<String> = v
                .as_table()
                .unwrap()
                .keys()
                .map(|k| format!("{s}.{k}"))
                .collect();
            keys
        })
        .collect();
    let registry: BTreeSet<String> = KEYS.iter().map(|k| k.key.to_owned()).collect();
    assert_eq!(fields, registry);
    assert_eq!(KEYS.len(), registry.len(), "a key is listed twice");
}

#[test]
fn default_toml_parses_back_to_the_defaults() {
    let text = Config::default_toml();
    let parsed: Config = toml::from_str(&text).unwrap();
    assert_eq!(parsed, Config::default());
    Config::default().validate().unwrap();
    for key in KEYS {
        assert!(
            text.contains(&format!("\n{} = ", key.name())),
            "{} missing",
            key.key
        );
    }
    assert!(text.contains("request_timeout = \"10m\""), "{text}");
    assert!(text.contains("max_body_bytes = \"1MiB\""), "{text}");
    assert!(text.contains("socket_mode = \"0660\""), "{text}");
}

#[test]
fn etc_tileflowd_toml_is_the_default_output() {
    let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/tileflowd.toml");
    let text = fs::read_to_string(&etc).unwrap();
    assert!(
        text == Config::default_toml(),
        "etc/tileflowd.toml is stale: regenerate it with `tileflowd config default > etc/tileflowd.toml`"
    );
}

#[test]
fn a_missing_default_file_is_fine_but_a_missing_explicit_one_is_not() {
    let files = Files::new(None);
    let opts = ConfigSources {
        default_config: files.path(),
        ..ConfigSources::default()
    };
    let loaded = Config::load_detailed(&opts).unwrap();
    assert_eq!(loaded.config, Config::default());
    assert!(loaded.files.is_empty());
    let err = load_err(&files.opts());
    assert!(
        err.contains("does not exist") && err.contains("tileflowd.toml"),
        "{err}"
    );
}

#[test]
fn drop_ins_apply_in_lexical_order_key_by_key() {
    let files = Files::new(Some("[scheduler]\nmax_running = 4\nmax_waiting = 7\n"));
    files.drop_in("20-b.toml", "[scheduler]\nmax_running = 16\n");
    files.drop_in(
        "10-a.toml",
        "scheduler.max_running = 8\n[log]\nlevel = \"debug\"\n",
    );
    files.drop_in(
        "09-z.toml",
        "[scheduler]\nmax_running = 99\nprefill_chunk = 64\n",
    );
    files.drop_in("30-ignored.conf", "not toml at all [");
    files.drop_in(".hidden.toml", "not toml at all [");
    let loaded = Config::load_detailed(&files.opts()).unwrap();
    let s = &loaded.config.scheduler;
    assert_eq!((s.max_running, s.max_waiting, s.prefill_chunk), (16, 7, 64));
    assert_eq!(loaded.config.log.level, "debug");
    let names: Vec<_> = loaded
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["tileflowd.toml", "09-z.toml", "10-a.toml", "20-b.toml"]
    );
    let origin = loaded.origin("scheduler.max_running").to_string();
    assert!(origin.ends_with("20-b.toml:2"), "{origin}");
    assert_eq!(loaded.origin("engine.device"), &Origin::Default);
}

#[test]
fn env_overrides_files_and_flags_override_env() {
    let files = Files::new(Some(
        "[server]\nsocket = \"/file.sock\"\n[engine]\ndevice = \"cuda\"\n",
    ));
    let mut opts = files.opts();
    opts.env = env(&[
        ("TILEFLOW_SERVER__SOCKET", "/env.sock"),
        ("TILEFLOW_ENGINE__DEVICE", "cpu"),
        ("TILEFLOW_SCHEDULER__MAX_RUNNING", "20"),
        ("TILEFLOW_MODELS__PRELOAD", "olmoe, qwen3"),
        ("TILEFLOW_SERVER__REQUEST_TIMEOUT", "90"),
        ("TILEFLOW_SERVER__MAX_BODY_BYTES", "64KiB"),
        ("TILEFLOW_STATE_DIR", "/ignored: no double underscore"),
        ("PATH", "/usr/bin"),
    ]);
    let loaded = Config::load_detailed(&opts).unwrap();
    let c = &loaded.config;
    assert_eq!(c.server.socket, Path::new("/env.sock"));
    assert_eq!(c.engine.device, Device(DeviceChoice::Cpu));
    assert_eq!(c.scheduler.max_running, 20);
    assert_eq!(c.models.preload, ["olmoe", "qwen3"]);
    assert_eq!(c.server.request_timeout.get(), Duration::from_secs(90));
    assert_eq!(c.server.max_body_bytes.bytes(), 64 << 10);
    assert_eq!(
        loaded.origin("server.socket"),
        &Origin::Env("TILEFLOW_SERVER__SOCKET".into())
    );

    let opts = opts.with_flag("server.socket", "/flag.sock", "--socket");
    let loaded = Config::load_detailed(&opts).unwrap();
    assert_eq!(loaded.config.server.socket, Path::new("/flag.sock"));
    assert_eq!(loaded.origin("server.socket"), &Origin::Flag("--socket"));
}

#[test]
fn env_values_are_toml_where_the_key_wants_it() {
    let mut opts = ConfigSources {
        default_config: PathBuf::from("/nonexistent/tileflowd.toml"),
        env: env(&[
            ("TILEFLOW_SERVER__SOCKET_GROUP", "1000"),
            ("TILEFLOW_SERVER__ADMIN_GROUP", "\"\""),
            ("TILEFLOW_LOG__LEVEL", "info,tileflow_engine=debug"),
            ("TILEFLOW_MODELS__PRELOAD", "[\"a\", \"b\"]"),
            ("TILEFLOW_SERVER__SOCKET_MODE", "0600"),
        ]),
        ..ConfigSources::default()
    };
    let c = Config::load(&opts).unwrap();
    assert_eq!(c.server.socket_group, "1000");
    assert_eq!(c.server.admin_group, "");
    assert_eq!(c.log.level, "info,tileflow_engine=debug");
    assert_eq!(c.models.preload, ["a", "b"]);
    assert_eq!(c.server.socket_mode, FileMode(0o600));

    opts.env = env(&[("TILEFLOW_SCHEDULER__MAX_RUNNING", "lots")]);
    let err = load_err(&opts);
    assert!(
        err.starts_with(
            "environment variable TILEFLOW_SCHEDULER__MAX_RUNNING: scheduler.max_running:"
        ),
        "{err}"
    );
}

#[test]
fn unknown_env_variables_are_named() {
    let mut opts = ConfigSources {
        default_config: PathBuf::from("/nonexistent/tileflowd.toml"),
        ..ConfigSources::default()
    };
    opts.env = env(&[("TILEFLOW_SCHEDULER__MAX_RUNING", "8")]);
    let err = load_err(&opts);
    assert!(err.contains("TILEFLOW_SCHEDULER__MAX_RUNING"), "{err}");
    assert!(
        err.contains("did you mean TILEFLOW_SCHEDULER__MAX_RUNNING?"),
        "{err}"
    );
    opts.env = env(&[("TILEFLOW_SCHEDULR__MAX_RUNNING", "8")]);
    let err = load_err(&opts);
    assert!(err.contains("no section [schedulr]"), "{err}");
}

#[test]
fn file_errors_name_the_file_line_and_key() {
    let files = Files::new(Some("[server]\nsocket = \"/x.sock\"\n"));
    let bad = files.drop_in("50-bad.toml", "# comment\n[scheduler]\nmax_runing = 8\n");
    let err = load_err(&files.opts());
    assert_eq!(
        err,
        format!(
            "{}:3: unknown key scheduler.max_runing (did you mean scheduler.max_running?)",
            bad.display()
        )
    );
    fs::write(&bad, "[schedular]\nmax_running = 8\n").unwrap();
    let err = load_err(&files.opts());
    assert!(
        err.contains("50-bad.toml:1: unknown section [schedular]"),
        "{err}"
    );
    fs::write(&bad, "\n[scheduler]\nmax_running = \"many\"\n").unwrap();
    let err = load_err(&files.opts());
    assert!(
        err.contains("50-bad.toml:3: scheduler.max_running: invalid type"),
        "{err}"
    );
    fs::write(&bad, "[engine]\ndevice = \"tpu\"\n").unwrap();
    let err = load_err(&files.opts());
    assert!(
        err.contains("50-bad.toml:2: engine.device: \"tpu\" is not a device"),
        "{err}"
    );
    fs::write(&bad, "[server]\nsocket = \n").unwrap();
    let err = load_err(&files.opts());
    assert!(err.contains("50-bad.toml:2:"), "{err}");
    fs::write(&bad, "server = 3\n").unwrap();
    let err = load_err(&files.opts());
    assert!(
        err.contains("50-bad.toml:1: server must be a table"),
        "{err}"
    );
}

#[test]
fn validation_errors_name_the_key_and_its_origin() {
    let files = Files::new(Some(""));
    let cases = [
        (
            "[scheduler]\nmax_running = 0\n",
            "scheduler.max_running must be ≥ 1",
        ),
        (
            "[scheduler]\nkv_blocks = 8\n",
            "scheduler.max_running (32) exceeds scheduler.kv_blocks (8)",
        ),
        (
            "[server]\nmetrics_listen = \"0.0.0.0:9464\"\n",
            "server.metrics_listen must be a loopback address",
        ),
        (
            "[server]\nmetrics_listen = \"127.0.0.1:0\"\n",
            "server.metrics_listen needs a port",
        ),
        (
            "[server]\nsocket = \"run/t.sock\"\n",
            "server.socket must be an absolute file path",
        ),
        (
            "[server]\nsocket_mode = \"4660\"\n",
            "server.socket_mode 4660 may only hold permission bits",
        ),
        (
            "[server]\nrequest_timeout = \"0s\"\n",
            "server.request_timeout must be > 0",
        ),
        (
            "[server]\nsocket_group = \"a b\"\n",
            "server.socket_group \"a b\" is not a group name",
        ),
        (
            "[models]\nstate_dir = \"rel\"\n",
            "models.state_dir must be an absolute path",
        ),
        (
            "[models]\npreload = [\"a\", \"a\"]\n",
            "models.preload names \"a\" twice",
        ),
        (
            "[models]\npreload = [\"../x\"]\n",
            "models.preload has \"../x\"",
        ),
        (
            "[log]\nlevel = \"info,=[\"\n",
            "log.level \"info,=[\" is not a log filter",
        ),
    ];
    for (text, want) in cases {
        fs::write(files.path(), text).unwrap();
        let err = Config::load(&files.opts()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(want), "{text:?}: {msg}");
        assert!(
            msg.contains("(set in ") || msg.contains("(the built-in default)"),
            "{msg}"
        );
        assert!(err.key().is_some());
    }
    let long = format!("[server]\nsocket = \"/{}.sock\"\n", "s".repeat(120));
    fs::write(files.path(), long).unwrap();
    assert!(load_err(&files.opts()).contains("Unix socket paths hold 107 at most"));
}

#[test]
fn live_diff_splits_live_next_load_and_restart_keys() {
    let old = Config::default();
    assert!(Config::live_diff(&old, &old).is_empty());
    let mut new = old.clone();
    new.log.level = "debug".into();
    new.server.request_timeout = HumanDuration(Duration::from_secs(5));
    new.server.drain_grace = HumanDuration(Duration::from_secs(1));
    new.server.max_body_bytes = ByteSize(4096);
    new.scheduler.max_waiting = 1;
    new.scheduler.max_running = 2;
    new.server.socket = "/elsewhere.sock".into();
    new.models.preload = vec!["x".into()];
    new.cache.device_bytes = ByteSize(64 << 20);
    new.storage.backend = StorageBackend::Pread;
    new.engine.device = Device(DeviceChoice::Cuda(Some(1)));
    let diff = Config::live_diff(&old, &new);
    assert_eq!(
        diff.live,
        [
            "server.request_timeout",
            "server.drain_grace",
            "server.max_body_bytes",
            "scheduler.max_waiting",
            "log.level"
        ]
    );
    assert_eq!(diff.next_load, ["cache.device_bytes", "storage.backend"]);
    assert_eq!(
        diff.restart,
        [
            "server.socket",
            "engine.device",
            "scheduler.max_running",
            "models.preload"
        ]
    );
    let live_keys: Vec<_> = KEYS
        .iter()
        .filter(|k| k.apply == Apply::Live)
        .map(|k| k.key)
        .collect();
    assert_eq!(live_keys.len(), 5);
    // Every [cache] and [storage] key applies at the next model load, and says so.
    for k in KEYS
        .iter()
        .filter(|k| matches!(k.section(), "cache" | "storage"))
    {
        assert_eq!(k.apply, Apply::NextLoad, "{}", k.key);
    }
    let text = Config::default_toml();
    assert!(text.contains("(next load)\ndevice_bytes = "), "{text}");
    assert!(text.contains("per\n# loaded model"), "{text}");
}

#[test]
fn engine_views_carry_the_values() {
    let mut c = Config::default();
    c.scheduler.kv_blocks = 100;
    c.scheduler.max_waiting = 3;
    assert_eq!(c.scheduler.kv_cache().num_blocks, 100);
    assert_eq!(c.scheduler.kv_cache().block_size, 16);
    assert_eq!(c.scheduler.limits().max_waiting, 3);
    assert_eq!(Verify::from(CacheVerify::Always), Verify::Always);
}

#[test]
fn cache_and_storage_keys_from_file_drop_in_and_env() {
    let files = Files::new(Some(
        "[cache]\ndevice_bytes = \"8GiB\"\nhost_bytes = 1048576\npolicy = \"lfru\"\n\
         pin = [\"0:3\", \"1:7\"]\n[storage]\nbackend = \"io_uring\"\nqueue_depth = 64\n",
    ));
    files.drop_in(
        "10-tiles.toml",
        "[cache]\ntile_size = \"256KiB\"\nprefetch_rate = \"2GB\"\n[storage]\ndirect = false\n",
    );
    let mut opts = files.opts();
    opts.env = env(&[
        ("TILEFLOW_CACHE__HOST_BYTES", "16GiB"),
        ("TILEFLOW_CACHE__PREFETCH_DEPTH", "2"),
        ("TILEFLOW_STORAGE__SQPOLL", "true"),
    ]);
    let loaded = Config::load_detailed(&opts).unwrap();
    let c = &loaded.config;
    assert_eq!(c.cache.device_bytes.bytes(), 8 << 30);
    assert_eq!(c.cache.host_bytes.bytes(), 16 << 30);
    assert_eq!(c.cache.policy, CachePolicy::Lfru);
    assert_eq!(c.cache.tile_size.bytes(), 256 << 10);
    assert_eq!(c.storage.backend, StorageBackend::IoUring);
    assert_eq!(
        (c.storage.queue_depth, c.storage.sqpoll, c.storage.direct),
        (64, true, false)
    );
    assert_eq!(
        loaded.origin("cache.host_bytes"),
        &Origin::Env("TILEFLOW_CACHE__HOST_BYTES".into())
    );
    assert!(loaded
        .origin("cache.tile_size")
        .to_string()
        .ends_with("10-tiles.toml:2"));

    let tier = c.tier();
    assert_eq!(tier.device_bytes, Some(8 << 30));
    assert_eq!(tier.device_slots, None);
    assert_eq!(tier.host_bytes, 16 << 30);
    assert_eq!(tier.policy, tileflow_engine::tier::EvictionPolicy::Lfru);
    assert_eq!(tier.tile_size, 256 << 10);
    assert_eq!(tier.pinned, [(0, 3), (1, 7)]);
    assert_eq!(tier.prefetch_depth, 2);
    assert_eq!(tier.prefetch_rate_bytes, 2_000_000_000);
    assert_eq!(tier.prefetch_burst_bytes, 256 << 20);
    assert_eq!(tier.io.backend, tileflow_spdk::BackendChoice::IoUring);
    assert_eq!(
        (tier.io.queue_depth, tier.io.sqpoll, tier.io.direct),
        (64, true, false)
    );
}

#[test]
fn device_bytes_from_env_and_flags_and_defaults_map_to_all_experts() {
    let mut opts = ConfigSources {
        default_config: PathBuf::from("/nonexistent/tileflowd.toml"),
        env: env(&[
            ("TILEFLOW_CACHE__DEVICE_BYTES", "64MiB"),
            ("TILEFLOW_CACHE__PIN", "2:5, 0:1"),
        ]),
        ..ConfigSources::default()
    };
    let c = Config::load(&opts).unwrap();
    assert_eq!(c.tier().device_bytes, Some(64 << 20));
    assert_eq!(c.tier().pinned, [(2, 5), (0, 1)]);
    opts.env = env(&[("TILEFLOW_CACHE__DEVICE_BYTES", "1048576")]);
    assert_eq!(
        Config::load(&opts).unwrap().cache.device_bytes.bytes(),
        1 << 20
    );
    let opts = opts
        .with_flag("cache.device_bytes", "0", "--device-bytes")
        .with_flag("cache.expert_slots", "3", "--expert-slots");
    let loaded = Config::load_detailed(&opts).unwrap();
    assert_eq!(
        loaded.origin("cache.device_bytes"),
        &Origin::Flag("--device-bytes")
    );
    let tier = loaded.config.tier();
    assert_eq!((tier.device_bytes, tier.device_slots), (None, Some(3)));

    let defaults = Config::default().tier();
    let engine = tileflow_engine::tier::TierConfig::default();
    assert_eq!(defaults, engine, "the config's defaults are the engine's");
}

#[test]
fn bad_cache_and_storage_values_name_the_key() {
    let mut opts = ConfigSources {
        default_config: PathBuf::from("/nonexistent/tileflowd.toml"),
        ..ConfigSources::default()
    };
    let cases = [
        (
            "TILEFLOW_CACHE__DEVICE_BYTES",
            "lots",
            "cache.device_bytes:",
        ),
        (
            "TILEFLOW_CACHE__HOST_BYTES",
            "8G",
            "cache.host_bytes: unknown size unit `G`",
        ),
        (
            "TILEFLOW_CACHE__POLICY",
            "fifo",
            "cache.policy: unknown variant `fifo`",
        ),
        ("TILEFLOW_CACHE__PIN", "3", "cache.pin:"),
        (
            "TILEFLOW_CACHE__PIN",
            "a:b",
            "cache.pin: \"a:b\" is not an expert",
        ),
        (
            "TILEFLOW_STORAGE__BACKEND",
            "spdk",
            "storage.backend: unknown variant `spdk`",
        ),
        ("TILEFLOW_STORAGE__DIRECT", "maybe", "storage.direct:"),
    ];
    for (var, value, want) in cases {
        opts.env = env(&[(var, value)]);
        let err = load_err(&opts);
        assert!(
            err.starts_with(&format!("environment variable {var}: {want}")),
            "{var}={value}: {err}"
        );
    }
    let files = Files::new(Some(""));
    let cases = [
        (
            "[cache]\ntile_size = 1000\n",
            "cache.tile_size (1KB) must be a positive multiple of 4096",
        ),
        (
            "[cache]\ntile_size = 0\n",
            "cache.tile_size (0B) must be a positive multiple of 4096",
        ),
        (
            "[cache]\ntile_size = \"2GiB\"\n",
            "cache.tile_size (2GiB) must be at most 1GiB",
        ),
        (
            "[cache]\nprefetch_burst = \"4KiB\"\n",
            "cache.prefetch_burst (4KiB) is smaller than cache.tile_size (1MiB)",
        ),
        (
            "[cache]\npin = [\"1:2\", \"1:2\"]\n",
            "cache.pin names \"1:2\" twice",
        ),
        (
            "[storage]\nqueue_depth = 0\n",
            "storage.queue_depth (0) must be between 1 and 4096",
        ),
    ];
    for (text, want) in cases {
        fs::write(files.path(), text).unwrap();
        let err = Config::load(&files.opts()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(want), "{text:?}: {msg}");
        assert!(msg.contains("(set in "), "{msg}");
    }
    // Prefetch off: a small burst is fine.
    fs::write(
        files.path(),
        "[cache]\nprefetch_depth = 0\nprefetch_burst = 0\n",
    )
    .unwrap();
    Config::load(&files.opts()).unwrap();
    let err = load_err(
        &files
            .opts()
            .with_flag("cache.host_bytes", "-1", "--host-bytes"),
    );
    assert!(
        err.starts_with("flag --host-bytes: cache.host_bytes:"),
        "{err}"
    );
}
