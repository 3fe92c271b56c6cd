//! Hybrid expert execution: a layer's selected experts that miss the device tier but sit in
//! the host tier are either copied to the device and run there, or run on the CPU straight
//! from their host slots (the layer's input goes down once, the CPU's sum comes back once).
//! A cost model splits them so that the CPU's work and the copies finish together, both
//! overlapping the device's work on the experts it already holds.
//!
//! The order of one layer: the experts resident on the device are launched; the copies of the
//! ones chosen for the device are started; the CPU computes its share (the engine thread waits
//! for the CPU's threads); the copies are waited for and those experts launched; the CPU's sum
//! is added. Each row's experts are therefore not added in ascending expert order as on the
//! other paths: the device's experts first, then the CPU's sum.

use std::time::{Duration, Instant};

use super::moe::{add_shared, ExpertGroup, ExpertProvider, Placement};
use super::EngineError;
use crate::backend::cpu::ffn::{experts_into, SimdLevel};
use crate::backend::{Backend, ExpertWork, HostMatrix};
use crate::tier::CpuExperts;
use crate::weights::SharedExpertWeights;

/// CPU expert throughput assumed before the first measurement (bytes of weights per second).
const START_CPU_BYTES_PER_S: f64 = 20e9;
/// Host → device bandwidth assumed before the first measurement.
const START_COPY_BYTES_PER_S: f64 = 20e9;
/// What each token row of an expert beyond its first costs the CPU, as a fraction of reading
/// its weights (the kernels read a weight row once for up to four token rows).
const ROW_COST: f64 = 0.125;
/// Weight of a new measurement in the running estimates.
const EWMA: f64 = 0.25;
/// A wait for copies shorter than this means they were done when the CPU finished.
const WAITED: Duration = Duration::from_micros(50);

/// The running estimates the split comes from, corrected by every layer that ran both ways.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    /// Bytes of expert weights the CPU computes per second (one token row each).
    cpu_bytes_per_s: Option<f64>,
    /// Bytes per second copied host → device.
    copy_bytes_per_s: Option<f64>,
}

impl CostModel {
    /// Current estimates: (CPU bytes/s, copy bytes/s).
    pub fn rates(&self) -> (f64, f64) {
        (
            self.cpu_bytes_per_s.unwrap_or(START_CPU_BYTES_PER_S),
            self.copy_bytes_per_s.unwrap_or(START_COPY_BYTES_PER_S),
        )
    }

    /// The CPU's cost of an expert of `bytes` with `rows` token rows, in weight bytes.
    fn cpu_work(bytes: u64, rows: usize) -> f64 {
        bytes as f64 * (1.0 + ROW_COST * rows.saturating_sub(1) as f64)
    }

    /// Of `candidates` ((bytes, token rows) of experts the CPU could run), which it runs: the
    /// fewest-rows-first prefix that brings the CPU's time and the copies' time (theirs and
    /// `must_copy` bytes more) closest to even, i.e. that minimises the later of the two.
    pub fn split(&self, candidates: &[(u64, usize)], must_copy: u64) -> Vec<bool> {
        let (cpu_rate, copy_rate) = self.rates();
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by_key(|&i| candidates[i].1);
        let mut copy: f64 = candidates.iter().map(|c| c.0 as f64).sum::<f64>() + must_copy as f64;
        let mut cpu = 0.0;
        let (mut best, mut best_time) = (0, copy / copy_rate);
        for (n, &i) in order.iter().enumerate() {
            let (bytes, rows) = candidates[i];
            cpu += Self::cpu_work(bytes, rows);
            copy -= bytes as f64;
            let time = (cpu / cpu_rate).max(copy / copy_rate);
            if time < best_time {
                (best, best_time) = (n + 1, time);
            }
        }
        let mut chosen = vec![false; candidates.len()];
        for &i in &order[..best] {
            chosen[i] = true;
        }
        chosen
    }

    fn blend(old: Option<f64>, new: f64) -> f64 {
        old.map_or(new, |o| o + EWMA * (new - o))
    }

    /// The CPU computed `work` weight bytes (see [`CostModel::cpu_work`]) in `took`.
    fn observe_cpu(&mut self, work: f64, took: Duration) {
        if work > 0.0 && took > Duration::ZERO {
            let rate = work / took.as_secs_f64();
            self.cpu_bytes_per_s = Some(Self::blend(self.cpu_bytes_per_s, rate));
        }
    }

    /// `bytes` were copied in `took` (started together); `bound` when they may have been done
    /// earlier (nobody waited for them), so that `took` only bounds their time from above.
    fn observe_copy(&mut self, bytes: u64, took: Duration, bound: bool) {
        if bytes == 0 || took == Duration::ZERO {
            return;
        }
        let rate = bytes as f64 / took.as_secs_f64();
        let old = self.copy_bytes_per_s;
        if !bound || old.is_none_or(|o| o < rate) {
            self.copy_bytes_per_s = Some(Self::blend(old, rate));
        }
    }
}

/// A model's hybrid execution: the mode, the cost model and the CPU kernels' level.
#[derive(Debug, Clone)]
pub struct Hybrid {
    mode: CpuExperts,
    cost: CostModel,
    level: SimdLevel,
}

impl Default for Hybrid {
    fn default() -> Hybrid {
        Hybrid::new(CpuExperts::default())
    }
}

impl Hybrid {
    /// Hybrid execution in `mode`, with the CPU kernels of this CPU.
    pub fn new(mode: CpuExperts) -> Hybrid {
        Hybrid {
            mode,
            cost: CostModel::default(),
            level: SimdLevel::current(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> CpuExperts {
        self.mode
    }

    /// The cost model's current estimates.
    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    /// Which of `groups` (a layer's selected experts) run on the CPU, or `None` when none do
    /// (or the rest would not fit the device tier at once): then the layer runs as without
    /// hybrid execution.
    pub(super) fn plan<B: Backend, P: ExpertProvider>(
        &self,
        backend: &B,
        experts: &P,
        layer: usize,
        groups: &[ExpertGroup],
        bytes: impl Fn(usize) -> u64,
    ) -> Option<Vec<bool>> {
        let mode = match self.mode {
            CpuExperts::Auto if backend.computes_on_host() => return None,
            m => m,
        };
        if mode == CpuExperts::Never {
            return None;
        }
        let places: Vec<Placement> = groups
            .iter()
            .map(|(e, _)| experts.placement(layer, *e))
            .collect();
        let candidates: Vec<usize> = (0..groups.len())
            .filter(|&i| places[i] == Placement::Host)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let mut cpu = vec![false; groups.len()];
        if mode == CpuExperts::Always {
            candidates.iter().for_each(|&i| cpu[i] = true);
        } else {
            let costs: Vec<(u64, usize)> = candidates
                .iter()
                .map(|&i| (bytes(groups[i].0), groups[i].1 .0.len()))
                .collect();
            let must_copy = (0..groups.len())
                .filter(|&i| places[i] == Placement::Storage)
                .map(|i| bytes(groups[i].0))
                .sum();
            for (&i, run) in candidates.iter().zip(self.cost.split(&costs, must_copy)) {
                cpu[i] = run;
            }
        }
        let on_device = cpu.iter().filter(|&&c| !c).count();
        (cpu.contains(&true) && on_device <= experts.capacity()).then_some(cpu)
    }

    /// The routed experts of `layer` split by `cpu` (from [`Hybrid::plan`]), combined into a
    /// new `[rows, hidden]` activation, plus the shared expert.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run<B: Backend, P: ExpertProvider>(
        &mut self,
        b: &B,
        experts: &mut P,
        layer: usize,
        h: &B::Act,
        (groups, cpu): (&[ExpertGroup], &[bool]),
        hints: Vec<(usize, Vec<usize>)>,
        shared: Option<&SharedExpertWeights<B::Weight>>,
        bytes: impl Fn(usize) -> u64,
    ) -> Result<B::Act, EngineError> {
        let err = EngineError::at(layer, "experts");
        let x = b.download(h).map_err(err)?;
        let ids = |on_cpu: bool| -> Vec<usize> {
            groups
                .iter()
                .zip(cpu)
                .filter(|(_, &c)| c == on_cpu)
                .map(|(g, _)| g.0)
                .collect()
        };
        let (device, host) = (ids(false), ids(true));
        experts.start(layer, &device, &host)?;
        for (next, predicted) in hints {
            experts.prefetch(next, &predicted);
        }
        let started = Instant::now();
        let (ready, copied): (Vec<usize>, Vec<usize>) = device
            .iter()
            .partition(|&&e| experts.placement(layer, e) == Placement::Device);
        let mut out = b.zeros(x.rows, x.cols).map_err(err)?;
        device_experts(b, experts, layer, h, groups, &ready, &mut out)?;
        let work = host
            .iter()
            .map(|&e| expert_work(groups, layer, e, experts.host_expert(layer, e)?))
            .collect::<Result<Vec<_>, EngineError>>()?;
        let mut y = HostMatrix::zeros(x.rows, x.cols);
        experts_into(self.level, &x, &work, &mut y).map_err(err)?;
        let cpu_done = started.elapsed();
        drop(work);
        experts.finish(layer, &copied)?;
        let waited = started.elapsed() - cpu_done;
        device_experts(b, experts, layer, h, groups, &copied, &mut out)?;
        let y = b.upload_act(y).map_err(err)?;
        b.add(&mut out, &y).map_err(err)?;
        add_shared(b, layer, h, shared, &mut out)?;
        let cpu_work = groups
            .iter()
            .zip(cpu)
            .filter(|(_, &c)| c)
            .map(|((e, (rows, _)), _)| CostModel::cpu_work(bytes(*e), rows.len()))
            .sum();
        self.cost.observe_cpu(cpu_work, cpu_done);
        let copy_bytes = copied.iter().map(|&e| bytes(e)).sum();
        self.cost
            .observe_copy(copy_bytes, cpu_done + waited, waited < WAITED);
        Ok(out)
    }
}

/// The work of expert `e` of `groups` (of `layer`) on `weights`.
fn expert_work<'a>(
    groups: &[ExpertGroup],
    layer: usize,
    e: usize,
    weights: crate::backend::ExpertRef<'a>,
) -> Result<ExpertWork<'a>, EngineError> {
    let (_, (rows, scales)) =
        groups
            .iter()
            .find(|g| g.0 == e)
            .ok_or_else(|| EngineError::ExpertUnavailable {
                layer,
                expert: e,
                reason: "not selected".into(),
            })?;
    Ok(ExpertWork {
        expert: e,
        weights,
        rows: rows.clone(),
        scales: scales.clone(),
    })
}

/// The listed experts run by the backend from the device tier, added into `out`.
fn device_experts<B: Backend, P: ExpertProvider>(
    b: &B,
    experts: &P,
    layer: usize,
    h: &B::Act,
    groups: &[ExpertGroup],
    list: &[usize],
    out: &mut B::Act,
) -> Result<(), EngineError> {
    if list.is_empty() {
        return Ok(());
    }
    let work = list
        .iter()
        .map(|&e| expert_work(groups, layer, e, experts.expert(layer, e)?))
        .collect::<Result<Vec<_>, EngineError>>()?;
    b.experts(h, &work, out)
        .map_err(EngineError::at(layer, "experts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_evens_cpu_and_copy_time_cheapest_rows_first() {
        let mut m = CostModel {
            cpu_bytes_per_s: Some(10.0),
            copy_bytes_per_s: Some(30.0),
        };
        // Four experts of 10 bytes, one row each: CPU 1 s each, copies 1/3 s each. One on
        // the CPU: max(1, 1) = 1 s; none: 4/3 s; two: max(2, 2/3) = 2 s.
        let one = [(10, 1); 4];
        assert_eq!(m.split(&one, 0).iter().filter(|&&c| c).count(), 1);
        // With a slow copy everything goes to the CPU... but the row counts decide the order.
        m.copy_bytes_per_s = Some(1.0);
        let rows = [(10, 8), (10, 1), (10, 2)];
        assert_eq!(m.split(&rows, 0), vec![true, true, true]);
        m.copy_bytes_per_s = Some(5.0);
        // CPU times 1, 1.125, 1.875 s (by rows 1, 2, 8); copies 2 s each.
        assert_eq!(m.split(&rows, 0), vec![false, true, true]);
        // Bytes that must be copied anyway push more onto the CPU.
        assert_eq!(m.split(&rows, 100), vec![true, true, true]);
        // A fast copy takes everything.
        m.copy_bytes_per_s = Some(1000.0);
        assert_eq!(m.split(&rows, 0), vec![false; 3]);
    }

    #[test]
    fn measurements_replace_the_start_then_blend_and_bounds_only_raise() {
        let mut m = CostModel::default();
        m.observe_cpu(100.0, Duration::from_secs(1));
        assert_eq!(m.rates().0, 100.0);
        m.observe_cpu(200.0, Duration::from_secs(1));
        assert_eq!(m.rates().0, 125.0);
        m.observe_copy(50, Duration::from_secs(1), false);
        assert_eq!(m.rates().1, 50.0);
        // A bound below the estimate says nothing; one above raises it.
        m.observe_copy(10, Duration::from_secs(1), true);
        assert_eq!(m.rates().1, 50.0);
        m.observe_copy(90, Duration::from_secs(1), true);
        assert_eq!(m.rates().1, 60.0);
    }
}
