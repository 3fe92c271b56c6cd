//! The engine thread: owns the compute device, the loaded models and their schedulers, steps
//! them, and talks to the tokio side only through messages (no lock shared with the API on the
//! hot path).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use tileflow_engine::model::LoadOptions;
use tileflow_engine::sched::{JobEvent, JobId, JobRequest, JobSink, SchedulerConfig, SubmitError};
use tileflow_engine::store::Store;
use tileflow_engine::tier::{TierConfig, TierStats};
use tileflow_engine::tokenizer::TextTokenizer;
use tileflow_gpu::{ComputeDevice, DeviceChoice, GpuError};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

mod report;
mod served;

pub use report::ModelReport;
use served::{Schedule, ServedModel};

/// What the API side needs of a loaded model without asking the engine thread.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Its name.
    pub name: String,
    /// Its tokenizer (encoding prompts, chat templates, rendering logprob tokens).
    pub tokenizer: TextTokenizer,
    /// Unix seconds when its pack was written.
    pub created: u64,
}

/// Why a submission was not queued.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No such loaded model.
    #[error("model {0:?} is not loaded")]
    NotLoaded(String),
    /// The scheduler refused.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The engine thread is gone (shutting down).
    #[error("the engine is shutting down")]
    Gone,
}

/// Why the engine thread did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The thread could not be spawned.
    #[error("cannot start the engine thread")]
    Spawn(#[source] std::io::Error),
    /// The device asked for cannot be used.
    #[error("cannot use the device {choice}")]
    Device {
        /// What was asked for.
        choice: DeviceChoice,
        /// Why.
        #[source]
        source: GpuError,
    },
    /// The thread ended before saying which device it chose.
    #[error("the engine thread stopped while choosing the device")]
    Gone,
}

/// One model's state as the engine reports it: the API type of `/api/status`, shared with
/// the client.
pub use tileflow_client::native::ModelStatus;

enum Command {
    Submit {
        model: String,
        request: JobRequest,
        events: mpsc::UnboundedSender<JobEvent>,
        reply: oneshot::Sender<Result<JobId, Refusal>>,
    },
    Load {
        name: String,
        reply: oneshot::Sender<Result<ModelInfo, String>>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<bool>,
    },
    Status {
        reply: oneshot::Sender<Vec<ModelReport>>,
    },
    SetLimits {
        max_waiting: usize,
    },
    SetTier {
        tier: Box<TierConfig>,
    },
    Shutdown,
}

/// Options the engine thread runs with.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// State directory of the model store.
    pub state_dir: PathBuf,
    /// Scheduler limits for each model.
    pub scheduler: SchedulerConfig,
    /// How models are opened.
    pub load: LoadOptions,
    /// The device asked for, resolved once when the thread starts.
    pub device: DeviceChoice,
    /// Where compiled GPU kernels are cached (none: compiled at every start).
    pub kernel_cache: Option<PathBuf>,
    /// Feed the systemd watchdog this often from the loop.
    pub watchdog: Option<Duration>,
}

/// The tokio side's handle on the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: std_mpsc::Sender<Command>,
}

struct ChannelSink(mpsc::UnboundedSender<JobEvent>);

impl JobSink for ChannelSink {
    fn emit(&mut self, event: JobEvent) -> bool {
        self.0.send(event).is_ok()
    }

    fn is_alive(&self) -> bool {
        !self.0.is_closed()
    }
}

/// A started engine thread.
#[derive(Debug)]
pub struct StartedEngine {
    /// The handle to talk to it.
    pub handle: EngineHandle,
    /// The thread, to join after [`EngineHandle::shutdown`].
    pub thread: std::thread::JoinHandle<()>,
    /// The device it runs models on, as `/api/status` names it: `cpu`, or `cuda:0 (…)`.
    pub device: String,
}

impl EngineHandle {
    /// Starts the engine thread and waits until it has opened its device: `options.device`
    /// resolved on that thread, which then owns the GPU context (if any) for its lifetime.
    pub async fn start(
        options: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> Result<StartedEngine, StartError> {
        let (tx, rx) = std_mpsc::channel();
        let (chosen_tx, chosen) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("tileflow-engine".into())
            .spawn(move || {
                let choice = options.device;
                let device = match ComputeDevice::select(choice, options.kernel_cache.as_deref()) {
                    Ok(device) => device,
                    Err(source) => {
                        let _ = chosen_tx.send(Err(StartError::Device { choice, source }));
                        return;
                    }
                };
                let shown = match device.fallback_reason() {
                    Some(why) => format!("{device} ({why})"),
                    None => device.to_string(),
                };
                tracing::info!(device = %shown, "compute device chosen");
                if chosen_tx.send(Ok(device.to_string())).is_err() {
                    return;
                }
                EngineThread {
                    options,
                    device,
                    metrics,
                    models: BTreeMap::new(),
                    rx,
                }
                .run()
            })
            .map_err(StartError::Spawn)?;
        let device = chosen.await.map_err(|_| StartError::Gone)??;
        Ok(StartedEngine {
            handle: EngineHandle { tx },
            thread,
            device,
        })
    }

    /// Queues a job; its events arrive on the returned receiver.
    pub async fn submit(
        &self,
        model: &str,
        request: JobRequest,
    ) -> Result<(JobId, mpsc::UnboundedReceiver<JobEvent>), Refusal> {
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Submit {
                model: model.to_string(),
                request,
                events,
                reply,
            })
            .map_err(|_| Refusal::Gone)?;
        let id = answer.await.map_err(|_| Refusal::Gone)??;
        Ok((id, rx))
    }

    /// Loads a model from the store (no-op if loaded).
    pub async fn load(&self, name: &str) -> Result<ModelInfo, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Load {
                name: name.to_string(),
                reply,
            })
            .map_err(|_| "the engine is shutting down".to_string())?;
        answer
            .await
            .map_err(|_| "the engine is shutting down".to_string())?
    }

    /// Unloads a model; running requests on it end. False if it was not loaded.
    pub async fn unload(&self, name: &str) -> bool {
        let (reply, answer) = oneshot::channel();
        if self
            .tx
            .send(Command::Unload {
                name: name.to_string(),
                reply,
            })
            .is_err()
        {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Every loaded model's state.
    pub async fn status(&self) -> Vec<ModelStatus> {
        self.reports().await.into_iter().map(|r| r.status).collect()
    }

    /// Every loaded model's state and expert tiers.
    pub async fn reports(&self) -> Vec<ModelReport> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Status { reply }).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Sets the tier configuration of models loaded from now on (SIGHUP); loaded models keep
    /// the one they were opened with.
    pub fn set_tier(&self, tier: TierConfig) {
        let _ = self.tx.send(Command::SetTier {
            tier: Box::new(tier),
        });
    }

    /// Changes the waiting-queue bound live.
    pub fn set_max_waiting(&self, max_waiting: usize) {
        let _ = self.tx.send(Command::SetLimits { max_waiting });
    }

    /// Asks the thread to stop after dropping every job.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// A loaded model as the engine thread keeps it.
struct Model {
    sched: Box<dyn ServedModel>,
    /// Its tier counters at the last metrics update.
    last: TierStats,
    /// The tier configuration it was opened with.
    tier: TierConfig,
}

struct EngineThread {
    options: EngineOptions,
    /// Where models are opened; its GPU context lives as long as the thread.
    device: ComputeDevice,
    metrics: Arc<Metrics>,
    models: BTreeMap<String, Model>,
    rx: std_mpsc::Receiver<Command>,
}

impl EngineThread {
    fn run(mut self) {
        let idle_wait = self
            .options
            .watchdog
            .map(|w| w / 2)
            .unwrap_or(Duration::from_secs(1));
        // Fed from this loop (not a timer thread), so a hung step is a missed ping.
        let mut watchdog = self
            .options
            .watchdog
            .map(crate::systemd::WatchdogFeeder::with_interval);
        loop {
            let busy = self.models.values().any(|m| !m.sched.is_idle());
            let first = if busy {
                self.rx.try_recv().ok()
            } else {
                match self.rx.recv_timeout(idle_wait) {
                    Ok(c) => Some(c),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut next = first;
            while let Some(cmd) = next {
                if !self.handle(cmd) {
                    return;
                }
                next = self.rx.try_recv().ok();
            }
            let (mut device_resident, mut host_resident) = (0, 0);
            for m in self.models.values_mut() {
                if !m.sched.is_idle() {
                    let report = m.sched.step();
                    self.metrics
                        .generation_tokens
                        .inc_by(report.generated as u64);
                    self.metrics
                        .prompt_tokens
                        .inc_by(report.prefill_tokens as u64);
                }
                let stats = m.sched.tier_stats();
                self.metrics.record_cache(&m.last, &stats);
                // One event per wait for tileflow_expert_stall_seconds.
                let stalls = m.sched.drain_stalls();
                self.metrics.observe_stalls(&stalls);
                device_resident += stats.device_resident_bytes;
                host_resident += stats.host_resident_bytes;
                m.last = stats;
            }
            // One gauge per tier: the sum over models (not the last model's value).
            self.metrics
                .set_resident_bytes(device_resident, host_resident);
            let (waiting, running) = self.models.values().fold((0, 0), |(w, r), m| {
                let (mw, mr) = m.sched.queue();
                (w + mw, r + mr)
            });
            self.metrics.requests_waiting.set(waiting as i64);
            self.metrics.requests_running.set(running as i64);
            if let Some(feeder) = watchdog.as_mut() {
                feeder.feed();
            }
        }
    }

    /// Handles one command; false to stop the thread.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit {
                model,
                request,
                events,
                reply,
            } => {
                let result = match self.models.get_mut(&model) {
                    None => Err(Refusal::NotLoaded(model)),
                    Some(m) => m
                        .sched
                        .submit(request, Box::new(ChannelSink(events)))
                        .map_err(Refusal::from),
                };
                let _ = reply.send(result);
            }
            Command::Load { name, reply } => {
                let _ = reply.send(self.load(&name));
            }
            Command::Unload { name, reply } => {
                let _ = reply.send(self.models.remove(&name).is_some());
            }
            Command::Status { reply } => {
                let reports = self
                    .models
                    .iter()
                    .map(|(name, m)| m.sched.report(name, &m.tier))
                    .collect();
                let _ = reply.send(reports);
            }
            Command::SetLimits { max_waiting } => {
                self.options.scheduler.max_waiting = max_waiting;
                for m in self.models.values_mut() {
                    let mut c = m.sched.config();
                    c.max_waiting = max_waiting;
                    m.sched.set_config(c);
                }
            }
            Command::SetTier { tier } => self.options.load.tier = *tier,
            Command::Shutdown => return false,
        }
        true
    }

    fn load(&mut self, name: &str) -> Result<ModelInfo, String> {
        let store = Store::new(&self.options.state_dir);
        let chain = |e: &dyn std::error::Error| tileflow_engine::error_chain(e);
        if let Some(m) = self.models.get(name) {
            let created = created_of(&store, name);
            return Ok(ModelInfo {
                name: name.to_string(),
                tokenizer: m.sched.tokenizer().clone(),
                created,
            });
        }
        crate::systemd::notify_status(&format!("loading model {name}"));
        // A failure on the device (out of memory, a failed copy) fails this load only.
        let sched = self
            .device
            .open_model(
                &store,
                name,
                &self.options.load,
                Schedule(self.options.scheduler),
            )
            .map_err(|e| chain(&e))?
            .map_err(|e| chain(&e))?;
        let info = ModelInfo {
            name: name.to_string(),
            tokenizer: sched.tokenizer().clone(),
            created: created_of(&store, name),
        };
        self.models.insert(
            name.to_string(),
            Model {
                sched,
                last: TierStats::default(),
                tier: self.options.load.tier.clone(),
            },
        );
        crate::systemd::notify_status(&format!("serving {} model(s)", self.models.len()));
        Ok(info)
    }
}

/// Unix seconds of a pack's manifest (its import time), 0 if unknown.
fn created_of(store: &Store, name: &str) -> u64 {
    store
        .model_dir(name)
        .ok()
        .and_then(|d| std::fs::metadata(d.join("manifest.json")).ok())
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
