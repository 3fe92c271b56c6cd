//! Continuous batching: jobs join the running batch at the next step, long prompts are
//! prefilled in chunks so running decodes keep going, and each job's tokens are sampled,
//! detokenized and stop-checked as they come.
//!
//! The scheduler is synchronous and owns the model runner; the daemon's engine thread drives
//! it (`submit`, `cancel`, `step`) and forwards events through each job's [`JobSink`].

use std::collections::VecDeque;
use std::time::Instant;

use rayon::prelude::*;

use crate::backend::Backend;
use crate::forward::{EngineError, ExpertProvider, LogitRows, ModelRunner, SeqChunk};
use crate::sampler::{
    FinishReason, LogitSummary, SampledToken, Sampler, SamplerError, SamplingParams, StopChecker,
};
use crate::tokenizer::{DecodeStream, TextTokenizer, TokenizerError};

/// Why a job was refused at submission.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full (HTTP 429).
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Prompt plus max_tokens exceed the context.
    #[error("prompt of {prompt} tokens plus max_tokens {max_tokens} exceeds the model's context of {context} tokens")]
    ContextLength {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_tokens: u32,
        /// The model's context.
        context: usize,
    },
    /// A prompt token outside the vocabulary.
    #[error("prompt token id {token} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// Its index in the prompt.
        position: usize,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The request can never fit in the KV cache.
    #[error("the request needs {needed} KV blocks but the cache has {total}")]
    TooLarge {
        /// Blocks it would need.
        needed: usize,
        /// Blocks in the cache.
        total: usize,
    },
    /// Invalid sampling parameters.
    #[error(transparent)]
    Params(#[from] SamplerError),
}

/// What happens to a job, in order: `Admitted`, tokens, then exactly one `Done` or `Failed`
/// (a job refused or failed before admission sees only `Failed`).
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The job joined the running batch (its queueing is over).
    Admitted,
    /// One generated token.
    Token {
        /// Token id.
        id: u32,
        /// Its log-probability.
        logprob: f32,
        /// The most likely alternatives, as many as asked.
        top_logprobs: Vec<(u32, f32)>,
        /// Text that became final with it (may be empty).
        text: String,
    },
    /// The job finished.
    Done {
        /// "stop" or "length".
        finish_reason: &'static str,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The job failed; nothing more follows.
    Failed {
        /// A stable kind ("engine_error", "timeout", "tokenizer_error", "sampler_error").
        kind: &'static str,
        /// The message, naming what failed.
        message: String,
    },
}

/// Where a job's events go. `emit` returns false when the client has gone: the job is
/// cancelled and its KV blocks freed.
pub trait JobSink: Send {
    /// Delivers one event.
    fn emit(&mut self, event: JobEvent) -> bool;

    /// Whether anyone still listens (checked every step, so a job whose client went away is
    /// dropped even before it produces a token).
    fn is_alive(&self) -> bool {
        true
    }
}

/// A job as submitted.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Cancel the job if it is not done by then.
    pub deadline: Option<Instant>,
}

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Jobs in the running batch at most.
    pub max_running: usize,
    /// Jobs waiting at most (more are refused with [`SubmitError::QueueFull`]).
    pub max_waiting: usize,
    /// Prompt tokens prefilled per step at most (decodes come first).
    pub prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            max_running: 32,
            max_waiting: 256,
            prefill_chunk: 512,
        }
    }
}

/// A job's handle.
pub type JobId = u64;

struct Job {
    id: JobId,
    tokens: Vec<u32>,
    prompt_len: usize,
    cached: usize,
    blocks: usize,
    sampler: Sampler,
    stop: StopChecker,
    stream: DecodeStream,
    sink: Box<dyn JobSink>,
    deadline: Option<Instant>,
    generated: usize,
}

/// What one [`Scheduler::step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences in the step.
    pub sequences: usize,
    /// Prompt tokens prefilled.
    pub prefill_tokens: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Jobs that finished, failed or were cancelled.
    pub ended: usize,
}

/// Continuous batching over one model runner.
pub struct Scheduler<B: Backend, P: ExpertProvider> {
    runner: ModelRunner<B, P>,
    tokenizer: TextTokenizer,
    eos: Vec<u32>,
    config: SchedulerConfig,
    waiting: VecDeque<Job>,
    running: Vec<Job>,
    reserved_blocks: usize,
    next_id: JobId,
}

impl<B: Backend, P: ExpertProvider> std::fmt::Debug for Scheduler<B, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("reserved_blocks", &self.reserved_blocks)
            .finish()
    }
}

impl<B: Backend, P: ExpertProvider> Scheduler<B, P> {
    /// A scheduler over `runner`; `tokenizer` detokenizes and gives the EOS ids.
    pub fn new(
        runner: ModelRunner<B, P>,
        tokenizer: TextTokenizer,
        config: SchedulerConfig,
    ) -> Self {
        let mut eos = tokenizer.eos_token_ids().to_vec();
        eos.extend(&runner.spec().eos_token_ids);
        eos.sort_unstable();
        eos.dedup();
        Scheduler {
            runner,
            tokenizer,
            eos,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved_blocks: 0,
            next_id: 1,
        }
    }

    /// The runner (for stats).
    pub fn runner(&self) -> &ModelRunner<B, P> {
        &self.runner
    }

    /// The model runner, mutable (to drain the expert cache's stall events between steps).
    pub fn runner_mut(&mut self) -> &mut ModelRunner<B, P> {
        &mut self.runner
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The limits in force.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Changes the limits (jobs already admitted stay).
    pub fn set_config(&mut self, config: SchedulerConfig) {
        self.config = config;
    }

    /// Gives the runner back (all jobs are dropped).
    pub fn into_runner(self) -> ModelRunner<B, P> {
        self.runner
    }

    /// Jobs waiting and running.
    pub fn load(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    /// Nothing to do.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.runner.kv_cache().layout().block_size.max(1))
    }

    /// Queues a job; it joins the running batch at a coming step.
    pub fn submit(
        &mut self,
        request: JobRequest,
        sink: Box<dyn JobSink>,
    ) -> Result<JobId, SubmitError> {
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let spec = self.runner.spec();
        let context = spec.max_position_embeddings;
        let max_tokens = request.params.max_tokens;
        if request.prompt.len() + max_tokens as usize > context {
            return Err(SubmitError::ContextLength {
                prompt: request.prompt.len(),
                max_tokens,
                context,
            });
        }
        if let Some((position, &token)) = request
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= spec.vocab_size)
        {
            return Err(SubmitError::TokenOutOfRange {
                token,
                position,
                vocab: spec.vocab_size,
            });
        }
        let blocks = self.blocks_for(request.prompt.len() + max_tokens as usize);
        let total = self.runner.kv_cache().layout().num_blocks;
        if blocks > total {
            return Err(SubmitError::TooLarge {
                needed: blocks,
                total,
            });
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(SubmitError::QueueFull(self.config.max_waiting));
        }
        let sampler = Sampler::new(request.params.clone())?;
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Job {
            id,
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            cached: 0,
            blocks,
            sampler,
            stop: StopChecker::new(&request.params, &self.eos),
            stream: self.tokenizer.decode_stream(false),
            sink,
            deadline: request.deadline,
            generated: 0,
        });
        Ok(id)
    }

    /// Cancels a job (waiting or running); its blocks are freed. Unknown ids are ignored.
    pub fn cancel(&mut self, id: JobId) {
        self.waiting.retain(|j| j.id != id);
        if let Some(i) = self.running.iter().position(|j| j.id == id) {
            let job = self.running.swap_remove(i);
            self.release(&job);
        }
    }

    fn release(&mut self, job: &Job) {
        let _ = self.runner.free_sequence(job.id);
        self.reserved_blocks -= job.blocks;
    }

    /// Moves waiting jobs into the batch while the batch and the KV cache have room
    /// (each job reserves its prompt plus max_tokens, so a running job never runs out).
    fn admit(&mut self) -> usize {
        let total = self.runner.kv_cache().layout().num_blocks;
        let mut ended = 0;
        while self.running.len() < self.config.max_running {
            let Some(job) = self.waiting.front() else {
                break;
            };
            if self.reserved_blocks + job.blocks > total {
                break;
            }
            let Some(mut job) = self.waiting.pop_front() else {
                break;
            };
            if job.sampler.params().max_tokens == 0 {
                job.sink.emit(JobEvent::Done {
                    finish_reason: "length",
                    prompt_tokens: job.prompt_len,
                    completion_tokens: 0,
                });
                ended += 1;
                continue;
            }
            if let Err(e) = self.runner.add_sequence(job.id) {
                job.sink.emit(JobEvent::Failed {
                    kind: "engine_error",
                    message: e.to_string(),
                });
                ended += 1;
                continue;
            }
            self.reserved_blocks += job.blocks;
            if !job.sink.emit(JobEvent::Admitted) {
                self.release(&job);
                ended += 1;
                continue;
            }
            self.running.push(job);
        }
        ended
    }

    /// Ends jobs past their deadline and drops those whose client has gone.
    fn expire(&mut self, now: Instant) -> usize {
        let late = |j: &Job| j.deadline.is_some_and(|d| now >= d);
        let before = self.waiting.len();
        self.waiting.retain(|j| j.sink.is_alive());
        let mut ended = before - self.waiting.len();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.is_alive() {
                i += 1;
            } else {
                let job = self.running.swap_remove(i);
                self.release(&job);
                ended += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if late(&self.waiting[i]) {
                if let Some(mut job) = self.waiting.remove(i) {
                    job.sink.emit(JobEvent::Failed {
                        kind: "timeout",
                        message: "the request timed out while waiting".into(),
                    });
                    ended += 1;
                }
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if late(&self.running[i]) {
                let mut job = self.running.swap_remove(i);
                job.sink.emit(JobEvent::Failed {
                    kind: "timeout",
                    message: "the request timed out".into(),
                });
                self.release(&job);
                ended += 1;
            } else {
                i += 1;
            }
        }
        ended
    }

    /// Runs one forward step over the batch: every decoding job gets one token, prefills share
    /// the prompt budget in arrival order.
    ///
    /// When a routed expert fails, only the jobs whose tokens were routed to it fail; the
    /// step runs again for the others (each retry has at least one job fewer, so it ends).
    pub fn step(&mut self) -> StepReport {
        let mut report = StepReport {
            ended: self.expire(Instant::now()),
            ..StepReport::default()
        };
        report.ended += self.admit();
        while !self.running.is_empty() {
            let (plan, prefill_tokens) = self.plan();
            report.prefill_tokens = prefill_tokens;
            report.sequences = plan.len();
            let chunks: Vec<SeqChunk> = plan
                .iter()
                .map(|&(i, start, end, logits)| {
                    let job = &self.running[i];
                    let mut c = SeqChunk::new(job.id, &job.tokens[start..end], start);
                    if !logits {
                        c.logits = LogitRows::None;
                    }
                    c
                })
                .collect();
            let result = self.runner.step(&chunks);
            drop(chunks);
            match result {
                Ok(logits) => {
                    self.emit_step(&plan, &logits, &mut report);
                    break;
                }
                Err(e) => {
                    let (ended, retry) = self.fail_planned(&plan, &e);
                    report.ended += ended;
                    if !retry {
                        break;
                    }
                }
            }
        }
        report
    }

    /// The step's chunks as (job index, start, end, wants logits), by job index, and the
    /// prompt tokens they prefill.
    fn plan(&self) -> (Vec<Planned>, usize) {
        let mut plan: Vec<Planned> = Vec::new();
        for (i, job) in self.running.iter().enumerate() {
            if job.cached >= job.prompt_len {
                plan.push((i, job.cached, job.tokens.len(), true));
            }
        }
        let mut budget = self.config.prefill_chunk.max(1);
        let mut prefill = 0;
        for (i, job) in self.running.iter().enumerate() {
            if job.cached < job.prompt_len && budget > 0 {
                let end = (job.cached + budget).min(job.prompt_len);
                budget -= end - job.cached;
                plan.push((i, job.cached, end, end == job.prompt_len));
                prefill += end - job.cached;
            }
        }
        plan.sort_by_key(|p| p.0);
        (plan, prefill)
    }

    /// Advances the jobs of a step that ran: samples and emits their tokens, ends those done.
    /// Each job's sampler owns its random stream, so the rows of a batch are sampled side by
    /// side on rayon's pool (same tokens as one after another); tokens are emitted in plan
    /// order.
    fn emit_step(&mut self, plan: &[Planned], logits: &[Vec<f32>], report: &mut StepReport) {
        type Row<'a> = (&'a [f32], Option<&'a LogitSummary>);
        let mut rows: Vec<Option<Row<'_>>> = vec![None; self.running.len()];
        let summaries = self.runner.logit_summaries();
        for (c, (&(i, _, end, wants), row)) in plan.iter().zip(logits).enumerate() {
            self.running[i].cached = end;
            if wants {
                rows[i] = Some((row, summaries.get(c).and_then(Option::as_ref)));
            }
        }
        let mut samplers: Vec<&mut Sampler> =
            self.running.iter_mut().map(|j| &mut j.sampler).collect();
        let sample =
            |(s, row): (&mut &mut Sampler, &Option<Row<'_>>)| row.map(|(r, m)| s.sample_with(r, m));
        let sampled: Vec<Option<Result<SampledToken, SamplerError>>> =
            if rows.iter().flatten().count() > 1 {
                samplers.par_iter_mut().zip(&rows).map(sample).collect()
            } else {
                samplers.iter_mut().zip(&rows).map(sample).collect()
            };
        let mut finished = Vec::new();
        for (i, t) in sampled.into_iter().enumerate() {
            let Some(t) = t else { continue };
            let job = &mut self.running[i];
            match t
                .map_err(|e| ("sampler_error", e.to_string()))
                .and_then(|t| emit_next(job, t))
            {
                Ok(done) => {
                    report.generated += 1;
                    if done {
                        finished.push(i);
                    }
                }
                Err((kind, message)) => {
                    job.sink.emit(JobEvent::Failed { kind, message });
                    finished.push(i);
                }
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let job = self.running.swap_remove(i);
            self.release(&job);
            report.ended += 1;
        }
    }

    /// Fails the jobs of a failed step that the failure concerns: those routed to a failed
    /// expert when the error names them and others remain, else every job of the step.
    /// Returns how many ended and whether the step should run again for the rest.
    fn fail_planned(&mut self, plan: &[Planned], e: &EngineError) -> (usize, bool) {
        let message = crate::error_chain(e);
        let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
        let named: Vec<usize> = match e.failed_sequences() {
            Some(seqs) => idx
                .iter()
                .copied()
                .filter(|&i| seqs.contains(&self.running[i].id))
                .collect(),
            None => Vec::new(),
        };
        let retry = !named.is_empty() && named.len() < idx.len();
        if retry {
            idx = named;
        }
        idx.sort_unstable_by(|a, b| b.cmp(a));
        idx.dedup();
        for &i in &idx {
            let mut job = self.running.swap_remove(i);
            job.sink.emit(JobEvent::Failed {
                kind: "engine_error",
                message: message.clone(),
            });
            self.release(&job);
        }
        (idx.len(), retry)
    }
}

/// A chunk of a step: (job index, start, end, wants logits).
type Planned = (usize, usize, usize, bool);

/// Emits `t`, the next token of `job`, and says whether the job is done (finished, or its
/// client went away).
fn emit_next(job: &mut Job, t: SampledToken) -> Result<bool, (&'static str, String)> {
    job.tokens.push(t.id);
    job.generated += 1;
    let tok_err = |e: TokenizerError| ("tokenizer_error", e.to_string());
    let delta = job.stream.push(t.id).map_err(tok_err)?.unwrap_or_default();
    let step = job.stop.push(t.id, &delta);
    let mut text = step.text;
    if step.finish == Some(FinishReason::Length) {
        if let Some(rest) = job.stream.flush().map_err(tok_err)? {
            text.push_str(&rest);
        }
    }
    let alive = job.sink.emit(JobEvent::Token {
        id: t.id,
        logprob: t.logprob,
        top_logprobs: t.top_logprobs,
        text,
    });
    if !alive {
        return Ok(true);
    }
    if let Some(reason) = step.finish {
        job.sink.emit(JobEvent::Done {
            finish_reason: reason.as_str(),
            prompt_tokens: job.prompt_len,
            completion_tokens: job.generated,
        });
        return Ok(true);
    }
    Ok(false)
}
