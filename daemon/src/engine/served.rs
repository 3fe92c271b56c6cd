//! A loaded model as the engine loop drives it, whichever device it was opened on.
//!
//! The CPU and the CUDA models are schedulers of different types (`Scheduler<CpuBackend, …>`,
//! `Scheduler<CudaBackend, …>`); the loop holds either as a [`ServedModel`] trait object, so
//! it has one code path and no `cfg(feature = "cuda")` arms. The virtual call is once per step
//! or command, next to a forward pass.

use std::time::Duration;

use tileflow_engine::backend::Backend;
use tileflow_engine::model::LoadedModel;
use tileflow_engine::sched::{
    JobId, JobRequest, JobSink, Scheduler, SchedulerConfig, StepReport, SubmitError,
};
use tileflow_engine::tier::{ExpertCache, TierConfig, TierMemory, TierStats};
use tileflow_engine::tokenizer::{TextTokenizer, TokenizerError};
use tileflow_gpu::UseModel;

use super::report::{model_report, ModelReport};

/// What the engine loop asks of a loaded model's scheduler.
pub(super) trait ServedModel {
    /// No job waiting or running.
    fn is_idle(&self) -> bool;
    /// One batch step.
    fn step(&mut self) -> StepReport;
    /// Queues a job.
    fn submit(&mut self, request: JobRequest, sink: Box<dyn JobSink>)
        -> Result<JobId, SubmitError>;
    /// Jobs (waiting, running).
    fn queue(&self) -> (usize, usize);
    /// The limits in force.
    fn config(&self) -> SchedulerConfig;
    /// Changes the limits.
    fn set_config(&mut self, config: SchedulerConfig);
    /// The model's tokenizer.
    fn tokenizer(&self) -> &TextTokenizer;
    /// The expert tiers' counters now.
    fn tier_stats(&self) -> TierStats;
    /// Stall events since the last call.
    fn drain_stalls(&mut self) -> Vec<Duration>;
    /// Its `/api/status` row and `/api/cache` entry, as the model `name` opened with `tier`.
    fn report(&self, name: &str, tier: &TierConfig) -> ModelReport;
}

impl<B: Backend, M: TierMemory> ServedModel for Scheduler<B, ExpertCache<M>> {
    fn is_idle(&self) -> bool {
        Scheduler::is_idle(self)
    }

    fn step(&mut self) -> StepReport {
        Scheduler::step(self)
    }

    fn submit(
        &mut self,
        request: JobRequest,
        sink: Box<dyn JobSink>,
    ) -> Result<JobId, SubmitError> {
        Scheduler::submit(self, request, sink)
    }

    fn queue(&self) -> (usize, usize) {
        self.load()
    }

    fn config(&self) -> SchedulerConfig {
        Scheduler::config(self)
    }

    fn set_config(&mut self, config: SchedulerConfig) {
        Scheduler::set_config(self, config);
    }

    fn tokenizer(&self) -> &TextTokenizer {
        Scheduler::tokenizer(self)
    }

    fn tier_stats(&self) -> TierStats {
        self.runner().experts().stats()
    }

    fn drain_stalls(&mut self) -> Vec<Duration> {
        self.runner_mut().experts_mut().drain_stalls()
    }

    fn report(&self, name: &str, tier: &TierConfig) -> ModelReport {
        model_report(name, self, tier)
    }
}

/// Puts a freshly opened model under a scheduler with these limits, its tokenizer read from
/// its pack.
pub(super) struct Schedule(pub SchedulerConfig);

impl UseModel for Schedule {
    type Output = Result<Box<dyn ServedModel>, TokenizerError>;

    fn use_model<B, M>(self, model: LoadedModel<B, M>) -> Self::Output
    where
        B: Backend + 'static,
        M: TierMemory + 'static,
    {
        let tokenizer = TextTokenizer::from_dir(&model.dir)?;
        Ok(Box::new(Scheduler::new(model.runner, tokenizer, self.0)))
    }
}
