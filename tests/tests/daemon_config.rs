//! `tileflowd config default|check` end to end: the real binary, with a clean environment, on
//! config files, drop-ins, environment variables and flags made in a temporary directory; and
//! `engine.device` at start (the binaries under test are built without the `cuda` feature).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tileflow_tests::{bin, repo_root, Daemon, Run};

/// Exit status of a configuration error.
const EXIT_CONFIG: i32 = 2;

/// A config file `tileflowd.toml` and its drop-in directory in a temporary directory.
struct ConfigDir {
    dir: tempfile::TempDir,
}

impl ConfigDir {
    fn new(main: &str) -> ConfigDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tileflowd.toml"), main).unwrap();
        ConfigDir { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("tileflowd.toml")
    }

    fn drop_in(&self, name: &str, text: &str) -> PathBuf {
        let d = self.dir.path().join("tileflowd.toml.d");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(name), text).unwrap();
        d.join(name)
    }

    /// Runs `tileflowd config check --config FILE ARGS…` with only `env` in the environment.
    fn check(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, Run) {
        let file = self.file();
        let mut all = vec!["config", "check", "--config", file.to_str().unwrap()];
        all.extend_from_slice(args);
        tileflowd(&all, env)
    }
}

/// Runs `tileflowd ARGS…` with a clean environment plus `env`.
fn tileflowd(args: &[&str], env: &[(&str, &str)]) -> (i32, Run) {
    let out = Command::new(bin("tileflowd"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot start tileflowd: {e}"));
    (out.status.code().unwrap_or(-1), out.into())
}

/// Parses `config check` output and returns `section.key`'s value.
fn value(run: &Run, section: &str, key: &str) -> toml::Value {
    let table: toml::Table = toml::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("config check printed invalid TOML: {e}\n{}", run.stdout));
    table[section][key].clone()
}

fn assert_config_error(code: i32, run: &Run, needles: &[&str]) {
    assert_eq!(code, EXIT_CONFIG, "exit status; stderr: {}", run.stderr);
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "{needle:?} not in: {}",
            run.stderr
        );
    }
}

#[test]
fn config_default_is_etc_tileflowd_toml_and_parses_back_to_the_defaults() {
    let (code, default) = tileflowd(&["config", "default"], &[]);
    assert_eq!(code, 0, "{}", default.stderr);
    let etc = fs::read_to_string(repo_root().join("etc/tileflowd.toml")).unwrap();
    assert!(
        default.stdout == etc,
        "etc/tileflowd.toml differs from `tileflowd config default`; regenerate it"
    );
    // The printed defaults, read back as a config file, give the built-in defaults: their
    // effective configuration is the same as that of an empty file, with nothing overridden.
    let printed = ConfigDir::new(&default.stdout);
    let empty = ConfigDir::new("");
    let (code, from_printed) = printed.check(&[], &[]);
    assert_eq!(code, 0, "{}", from_printed.stderr);
    let (code, from_empty) = empty.check(&[], &[]);
    assert_eq!(code, 0, "{}", from_empty.stderr);
    let strip = |s: &str| -> String {
        s.lines()
            .filter(|l| !l.starts_with("# Files read:"))
            .map(|l| l.split("  # from ").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&from_printed.stdout), strip(&from_empty.stdout));
    let all: toml::Table = toml::from_str(&default.stdout).unwrap();
    let keys: usize = all.values().map(|s| s.as_table().unwrap().len()).sum();
    assert_eq!(keys, 34, "every key is printed");
    assert_eq!(
        all["server"]["socket"].as_str(),
        Some("/run/tileflowd.sock")
    );
    assert_eq!(all["scheduler"]["max_running"].as_integer(), Some(32));
}

#[test]
fn drop_ins_apply_in_lexical_order() {
    let cfg = ConfigDir::new("[scheduler]\nmax_running = 4\nmax_waiting = 5\n");
    cfg.drop_in("20-late.toml", "[scheduler]\nmax_running = 16\n");
    cfg.drop_in(
        "10-early.toml",
        "[scheduler]\nmax_running = 8\nprefill_chunk = 64\n",
    );
    cfg.drop_in("notes.txt", "ignored, not .toml");
    let (code, run) = cfg.check(&[], &[]);
    assert_eq!(code, 0, "{}", run.stderr);
    assert_eq!(
        value(&run, "scheduler", "max_running").as_integer(),
        Some(16)
    );
    assert_eq!(
        value(&run, "scheduler", "max_waiting").as_integer(),
        Some(5)
    );
    assert_eq!(
        value(&run, "scheduler", "prefill_chunk").as_integer(),
        Some(64)
    );
    assert!(
        run.stdout.contains("max_running = 16  # from ") && run.stdout.contains("20-late.toml:2"),
        "{}",
        run.stdout
    );
}

#[test]
fn env_overrides_files_and_flags_override_env() {
    let cfg = ConfigDir::new("[server]\nsocket = \"/file.sock\"\n[scheduler]\nmax_running = 4\n");
    cfg.drop_in("10.toml", "[engine]\ndevice = \"cuda\"\n");
    let env = [
        ("TILEFLOW_SERVER__SOCKET", "/env.sock"),
        ("TILEFLOW_SCHEDULER__MAX_RUNNING", "12"),
        ("TILEFLOW_ENGINE__DEVICE", "cpu"),
        ("TILEFLOW_MODELS__PRELOAD", "olmoe,qwen3"),
        ("TILEFLOW_MODELS__STATE_DIR", "/env/state"),
    ];
    let (code, run) = cfg.check(&[], &env);
    assert_eq!(code, 0, "{}", run.stderr);
    assert_eq!(value(&run, "server", "socket").as_str(), Some("/env.sock"));
    assert_eq!(
        value(&run, "scheduler", "max_running").as_integer(),
        Some(12)
    );
    assert_eq!(value(&run, "engine", "device").as_str(), Some("cpu"));
    assert_eq!(
        value(&run, "models", "state_dir").as_str(),
        Some("/env/state")
    );
    let preload = value(&run, "models", "preload");
    assert_eq!(preload.as_array().unwrap().len(), 2);
    assert!(run
        .stdout
        .contains("# from environment variable TILEFLOW_SERVER__SOCKET"));

    let flags = [
        "--socket",
        "/flag.sock",
        "--state-dir",
        "/flag/state",
        "--device",
        "auto",
    ];
    let (code, run) = cfg.check(&flags, &env);
    assert_eq!(code, 0, "{}", run.stderr);
    assert_eq!(value(&run, "server", "socket").as_str(), Some("/flag.sock"));
    assert_eq!(
        value(&run, "models", "state_dir").as_str(),
        Some("/flag/state")
    );
    assert_eq!(value(&run, "engine", "device").as_str(), Some("auto"));
    assert_eq!(
        value(&run, "scheduler", "max_running").as_integer(),
        Some(12)
    );
    assert!(
        run.stdout.contains("# from flag --socket"),
        "{}",
        run.stdout
    );
}

#[test]
fn an_unknown_key_in_a_drop_in_names_the_file_line_and_key() {
    let cfg = ConfigDir::new("");
    let bad = cfg.drop_in(
        "50-typo.toml",
        "[scheduler]\nmax_running = 8\nmax_runing = 9\n",
    );
    let (code, run) = cfg.check(&[], &[]);
    let at = format!("{}:3", bad.display());
    assert_config_error(
        code,
        &run,
        &[
            &at,
            "unknown key scheduler.max_runing",
            "did you mean scheduler.max_running?",
        ],
    );
    assert!(
        run.stdout.is_empty(),
        "nothing printed on error: {}",
        run.stdout
    );
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        (
            "[scheduler]\nmax_running = 0\n",
            "scheduler.max_running must be ≥ 1",
        ),
        (
            "[server]\nmetrics_listen = \"0.0.0.0:9464\"\n",
            "server.metrics_listen must be a loopback address",
        ),
        (
            "[engine]\ndevice = \"tpu\"\n",
            "engine.device: \"tpu\" is not a device",
        ),
        (
            "[engine]\ndevice = \"cuda:x\"\n",
            "engine.device: \"cuda:x\" is not a device: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
        ),
        (
            "[server]\nrequest_timeout = \"10 fortnights\"\n",
            "server.request_timeout:",
        ),
        (
            "[server]\nmax_body_bytes = \"1M\"\n",
            "server.max_body_bytes: unknown size unit `M`",
        ),
    ];
    for (text, want) in cases {
        let cfg = ConfigDir::new(text);
        let (code, run) = cfg.check(&[], &[]);
        assert_config_error(code, &run, &[want, "tileflowd.toml"]);
    }
    let cfg = ConfigDir::new("");
    let (code, run) = cfg.check(&["--device", "tpu"], &[]);
    assert_config_error(
        code,
        &run,
        &["flag --device: engine.device: \"tpu\" is not a device"],
    );
    let (code, run) = cfg.check(&["--device", "cuda:1"], &[]);
    assert_eq!(code, 0, "{}", run.stderr);
    assert_eq!(value(&run, "engine", "device").as_str(), Some("cuda:1"));
}

#[test]
fn an_unknown_config_variable_is_named() {
    let cfg = ConfigDir::new("");
    let (code, run) = cfg.check(&[], &[("TILEFLOW_SCHEDULER__MAX_RUNING", "8")]);
    assert_config_error(
        code,
        &run,
        &[
            "TILEFLOW_SCHEDULER__MAX_RUNING",
            "did you mean TILEFLOW_SCHEDULER__MAX_RUNNING?",
        ],
    );
    // Variables without `__` belong to other tools (tilectl's TILEFLOW_STATE_DIR, TILEFLOW_LOG).
    let (code, run) = cfg.check(
        &[],
        &[("TILEFLOW_STATE_DIR", "/x"), ("TILEFLOW_LOG", "debug")],
    );
    assert_eq!(code, 0, "{}", run.stderr);
}

#[test]
fn a_missing_explicit_config_and_broken_toml_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let (code, run) = tileflowd(
        &["config", "check", "--config", missing.to_str().unwrap()],
        &[],
    );
    assert_config_error(code, &run, &["does not exist", "nope.toml"]);
    // TILEFLOW_CONFIG is the same as --config.
    let (code, run) = tileflowd(
        &["config", "check"],
        &[("TILEFLOW_CONFIG", missing.to_str().unwrap())],
    );
    assert_config_error(code, &run, &["nope.toml"]);

    let cfg = ConfigDir::new("[server]\nsocket = \"/a.sock\"\n[scheduler\n");
    let (code, run) = cfg.check(&[], &[]);
    let at = format!("{}:3", cfg.file().display());
    assert_config_error(code, &run, &[&at]);
}

#[test]
fn config_errors_exit_2_before_serving() {
    let cfg = ConfigDir::new("[scheduler]\nmax_running = 0\n");
    let file = cfg.file();
    let (code, run) = tileflowd(&["--config", file.to_str().unwrap()], &[]);
    assert_config_error(code, &run, &["scheduler.max_running must be ≥ 1"]);
    assert!(Path::new(&file).exists());
}

/// Runs `tileflowd` (serving) on a temporary socket and state directory with `args`.
fn serve_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, Run) {
    let config = dir.join("tileflowd.toml");
    fs::write(&config, "").unwrap();
    let socket = dir.join("s.sock");
    let state = dir.join("state");
    let mut all = vec![
        "--config",
        config.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    tileflowd(&all, env)
}

#[test]
fn a_gpu_asked_of_a_build_without_cuda_is_a_config_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (code, run) = serve_in(dir.path(), &["--device", "cuda"], &[]);
    assert_config_error(
        code,
        &run,
        &[
            "engine.device = \"cuda\" (set by --device) cannot be used",
            "this build has no CUDA backend",
        ],
    );
    let (code, run) = serve_in(dir.path(), &[], &[("TILEFLOW_ENGINE__DEVICE", "cuda:1")]);
    assert_config_error(
        code,
        &run,
        &[
            "engine.device = \"cuda:1\" (set by TILEFLOW_ENGINE__DEVICE) cannot be used",
            "this build has no CUDA backend",
        ],
    );
    // It stopped before serving: no socket was bound.
    assert!(!dir.path().join("s.sock").exists());
    let (code, run) = serve_in(dir.path(), &["--device", "tpu"], &[]);
    assert_config_error(code, &run, &["engine.device: \"tpu\" is not a device"]);
}

#[test]
fn cpu_and_auto_serve_on_the_cpu_and_status_says_so() {
    for (args, logged) in [
        (&["--device", "cpu"][..], "device=cpu\n"),
        (&[][..], "device=cpu (this build has no CUDA backend)"),
    ] {
        let mut d = Daemon::builder().args(args).start();
        let status = d.client().get("/api/status");
        assert_eq!(status.status, 200, "{}", status.text());
        assert_eq!(status.json()["device"], "cpu", "{args:?}");
        let log = d.stderr();
        assert!(log.contains(logged), "{args:?}: {logged:?} not in:\n{log}");
        assert!(d.terminate().success(), "{}", d.stderr());
    }
}
