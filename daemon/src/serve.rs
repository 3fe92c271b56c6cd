//! Serving: the engine thread, the Unix socket (the one systemd passed, or one bound at
//! `server.socket`), the optional loopback metrics listener, readiness, SIGHUP reloads and the
//! SIGTERM drain.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tileflow_engine::model::LoadOptions;
use tileflow_engine::store::Store;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::api::{self, AppState, Peer};
use crate::config::{Config, ConfigError, ConfigSources, Loaded, Origin};
use crate::engine::{EngineHandle, EngineOptions, StartError};
use crate::metrics::Metrics;
use crate::systemd;

/// Sets the log filter live (tracing's reload handle), for `log.level` on SIGHUP.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How models are opened under `config`.
fn load_options(config: &Config) -> LoadOptions {
    LoadOptions {
        tier: config.tier(),
        kv: config.scheduler.kv_cache(),
        threads: (config.engine.threads > 0).then_some(config.engine.threads),
    }
}

/// Where compiled GPU kernels are kept: systemd's `CacheDirectory=` (`$CACHE_DIRECTORY`, the
/// first when it lists several), else `<models.state_dir>/cache`.
fn kernel_cache(config: &Config) -> PathBuf {
    std::env::var_os("CACHE_DIRECTORY")
        .and_then(|dirs| std::env::split_paths(&dirs).next())
        .filter(|dir| dir.is_absolute())
        .unwrap_or_else(|| config.models.state_dir.join("cache"))
}

/// Runs the daemon with the configuration `loaded` until SIGTERM/SIGINT. `sources` are re-read
/// on SIGHUP. An `engine.device` that cannot be used is a [`ConfigError`].
pub fn serve(
    loaded: Loaded,
    sources: ConfigSources,
    set_log_level: SetLogLevel,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tileflow-api")
        .build()
        .context("cannot start the async runtime")?;
    let device_origin = loaded.origin("engine.device").clone();
    runtime.block_on(run(loaded.config, device_origin, sources, set_log_level))
}

async fn run(
    config: Config,
    device_origin: Origin,
    sources: ConfigSources,
    set_log_level: SetLogLevel,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let engine_options = EngineOptions {
        state_dir: config.models.state_dir.clone(),
        scheduler: config.scheduler.limits(),
        load: load_options(&config),
        watchdog: systemd::watchdog_interval(),
        device: config.engine.device.0,
        kernel_cache: Some(kernel_cache(&config)),
    };
    // Opening a GPU the first time compiles its kernels.
    systemd::notify_status("opening the compute device");
    systemd::notify_extend_timeout(Duration::from_secs(300));
    let started = EngineHandle::start(engine_options, metrics.clone())
        .await
        .map_err(|e| match e {
            StartError::Device { choice, source } => anyhow::Error::new(ConfigError::Device {
                device: choice.to_string(),
                origin: device_origin,
                source: Box::new(source),
            }),
            other => anyhow::Error::new(other),
        })?;
    let (engine, engine_thread) = (started.handle, started.thread);
    let state = Arc::new(AppState {
        engine: engine.clone(),
        models: RwLock::default(),
        metrics,
        store: Store::new(&config.models.state_dir),
        admin_group: config.server.admin_group.clone(),
        request_timeout: RwLock::new(config.server.request_timeout.get()),
        drain_grace: RwLock::new(config.server.drain_grace.get()),
        max_body_bytes: RwLock::new(config.server.max_body_bytes.bytes()),
        started: Instant::now(),
        device: started.device,
    });
    for name in &config.models.preload {
        systemd::notify_status(&format!("loading model {name}"));
        systemd::notify_extend_timeout(Duration::from_secs(300));
        let info = engine
            .load(name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot preload model {name}: {e}"))?;
        state.insert_model(info);
        tracing::info!(model = %name, "model loaded");
    }
    let socket = systemd::open_api_socket(&config.server).context("cannot open the API socket")?;
    socket
        .listener
        .set_nonblocking(true)
        .context("cannot use the API socket")?;
    let listener = UnixListener::from_std(socket.listener).context("cannot use the API socket")?;
    let _socket_file = socket.file;
    if let Some(addr) = config.server.metrics_listen.get() {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind the metrics listener {addr}"))?;
        let app = api::metrics_router(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let reload_state = state.clone();
    tokio::spawn(async move {
        let mut current = config;
        while hup.recv().await.is_some() {
            reload(&mut current, &sources, &reload_state, &set_log_level);
        }
    });
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping: no new connections, draining running requests");
        systemd::notify_stopping();
        let _ = stop_tx.send(true);
    };
    let app = api::router(state.clone());
    systemd::notify_ready();
    systemd::notify_status(&format!("serving {} model(s)", state.loaded().len()));
    tracing::info!("tileflowd ready");
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown);
    let grace_state = state.clone();
    tokio::select! {
        r = server => r.context("the HTTP server failed")?,
        _ = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
            let grace = grace_state.drain_grace.read().map(|g| *g).unwrap_or(Duration::from_secs(30));
            tokio::time::sleep(grace).await;
        } => tracing::warn!("drain grace over: cancelling the requests still running"),
    }
    engine.shutdown();
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: re-reads the configuration; applies the keys that are safe live, keeps the old
/// configuration (and says so) when the new one is invalid.
fn reload(
    current: &mut Config,
    sources: &ConfigSources,
    state: &AppState,
    set_log_level: &SetLogLevel,
) {
    systemd::notify_reloading();
    match Config::load(sources) {
        Err(e) => {
            tracing::error!("reload: the new configuration is invalid, keeping the old one: {e}")
        }
        Ok(new) => {
            let diff = Config::live_diff(current, &new);
            for key in &diff.live {
                let applied = match *key {
                    "log.level" => set_log_level(&new.log.level),
                    "server.request_timeout" => {
                        set(&state.request_timeout, new.server.request_timeout.get())
                    }
                    "server.drain_grace" => set(&state.drain_grace, new.server.drain_grace.get()),
                    "server.max_body_bytes" => {
                        set(&state.max_body_bytes, new.server.max_body_bytes.bytes())
                    }
                    "scheduler.max_waiting" => {
                        state.engine.set_max_waiting(new.scheduler.max_waiting);
                        Ok(())
                    }
                    other => Err(format!("{other} has no live setter")),
                };
                match applied {
                    Ok(()) => tracing::info!(key, "reload: applied"),
                    Err(e) => tracing::warn!(key, "reload: not applied: {e}"),
                }
            }
            if !diff.next_load.is_empty() {
                // The engine thread opens models with these from now on; loaded ones keep theirs.
                state.engine.set_tier(new.tier());
                tracing::info!(
                    "reload: these changes apply to models loaded after the reload: {}",
                    diff.next_load.join(", ")
                );
            }
            if !diff.restart.is_empty() {
                tracing::warn!(
                    "reload: these changes take effect after a restart: {}",
                    diff.restart.join(", ")
                );
            }
            if diff.is_empty() {
                tracing::info!("reload: configuration unchanged");
            }
            *current = new;
        }
    }
    systemd::notify_ready();
}

fn set<T>(lock: &RwLock<T>, value: T) -> Result<(), String> {
    lock.write()
        .map(|mut v| *v = value)
        .map_err(|_| "lock poisoned".to_string())
}
