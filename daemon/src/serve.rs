//! Serving: the engine thread, the Unix socket (or the one systemd passed), the optional
//! loopback metrics listener, signals (SIGTERM drains, SIGHUP reloads) and readiness.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tileflow_engine::model::LoadOptions;
use tileflow_engine::sched::SchedulerConfig;
use tileflow_engine::store::Store;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::api::{self, AppState, Peer};
use crate::engine::{EngineHandle, EngineOptions};
use crate::metrics::Metrics;
use crate::systemd;

/// Everything `serve` needs, resolved from the config.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Socket path (ignored under socket activation).
    pub socket: PathBuf,
    /// Socket file mode.
    pub socket_mode: u32,
    /// State directory.
    pub state_dir: PathBuf,
    /// Admin group name.
    pub admin_group: String,
    /// Loopback address for `/metrics` over TCP.
    pub metrics_listen: Option<SocketAddr>,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// How long SIGTERM waits for running requests.
    pub drain_grace: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Scheduler limits.
    pub scheduler: SchedulerConfig,
    /// How models are opened.
    pub load: LoadOptions,
    /// Models loaded before READY=1.
    pub preload: Vec<String>,
    /// Device name for status.
    pub device: String,
}

/// A pre-opened listener from systemd socket activation, if any.
pub type InheritedListener = Option<std::os::unix::net::UnixListener>;

/// Binds the socket path: removes a stale socket file, creates the parent directory, sets the mode.
fn bind(path: &PathBuf, mode: u32) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use by another daemon", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(listener)
}

/// Runs the daemon until SIGTERM/SIGINT; `on_reload` is called on SIGHUP with the state.
pub fn serve(
    options: ServeOptions,
    inherited: InheritedListener,
    on_reload: Box<dyn Fn(&AppState) + Send + Sync>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tileflow-api")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(options, inherited, on_reload))
}

async fn run(
    options: ServeOptions,
    inherited: InheritedListener,
    on_reload: Box<dyn Fn(&AppState) + Send + Sync>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let engine_options = EngineOptions {
        state_dir: options.state_dir.clone(),
        scheduler: options.scheduler,
        load: options.load.clone(),
        watchdog: None,
    };
    let (engine, engine_thread) = EngineHandle::start(engine_options, metrics.clone())
        .context("cannot start the engine thread")?;
    let state = Arc::new(AppState {
        engine: engine.clone(),
        models: RwLock::default(),
        metrics,
        store: Store::new(&options.state_dir),
        admin_group: options.admin_group.clone(),
        request_timeout: RwLock::new(options.request_timeout),
        started: Instant::now(),
        device: options.device.clone(),
    });
    for name in &options.preload {
        systemd::notify_status(&format!("loading {name}"));
        let info = engine
            .load(name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot preload model {name}: {e}"))?;
        state.insert_model(info);
        tracing::info!(model = %name, "model loaded");
    }
    let listener = match inherited {
        Some(l) => {
            l.set_nonblocking(true)
                .context("cannot use the socket systemd passed")?;
            UnixListener::from_std(l).context("cannot use the socket systemd passed")?
        }
        None => bind(&options.socket, options.socket_mode)?,
    };
    if let Some(addr) = options.metrics_listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind metrics listener {addr}"))?;
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
        while hup.recv().await.is_some() {
            on_reload(&reload_state);
        }
    });
    let app = api::router(state.clone(), options.max_body_bytes);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping: draining running requests");
        systemd::notify_stopping();
        let _ = stop_tx.send(true);
    };
    systemd::notify_ready();
    systemd::notify_status(&format!("serving on {}", options.socket.display()));
    tracing::info!(socket = %options.socket.display(), "tileflowd ready");
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown);
    let mut stopped = stop_rx.clone();
    let grace = options.drain_grace;
    tokio::select! {
        r = server => r.context("the HTTP server failed")?,
        _ = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("drain grace over: cancelling the requests still running"),
    }
    engine.shutdown();
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    if inherited_path_owned(&options) {
        let _ = std::fs::remove_file(&options.socket);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Whether we created the socket file (and so remove it on exit).
fn inherited_path_owned(options: &ServeOptions) -> bool {
    std::env::var_os("LISTEN_FDS").is_none() && options.socket.exists()
}
