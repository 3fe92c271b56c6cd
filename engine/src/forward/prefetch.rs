//! Router look-ahead: right after MoE layer L's router, the routers of the next `depth` MoE
//! layers are applied to the hidden state layer L's router saw, and the experts they would
//! pick (plus those each layer used in the previous step) are hinted to the
//! [`ExpertProvider`], so their reads start while layer L computes.
//!
//! The prefetcher also keeps score: per MoE layer and step, how many of the experts the router
//! then chose had been predicted ([`PrefetchStats`]). The counts depend only on the routing,
//! never on timing, so tests can assert on them.

use std::collections::BTreeSet;

use super::moe::ExpertProvider;
use crate::backend::{Backend, Routing};
use crate::spec::MoeSpec;

/// Prediction counts over some MoE layer-steps (one layer in one forward step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PredictionCounts {
    /// Layer-steps counted.
    pub layer_steps: u64,
    /// Experts predicted for them (each layer-step's predicted set, without repeats).
    pub predictions: u64,
    /// Experts their routers then chose (each expert once per layer-step, however many tokens
    /// chose it).
    pub actual: u64,
    /// Chosen experts that had been predicted for that layer and step.
    pub predicted_hits: u64,
}

impl PredictionCounts {
    /// Share of the chosen experts that had been predicted; `None` before anything was counted.
    pub fn recall(&self) -> Option<f64> {
        (self.actual > 0).then(|| self.predicted_hits as f64 / self.actual as f64)
    }

    /// Share of the predicted experts that were then chosen; `None` before any prediction.
    pub fn precision(&self) -> Option<f64> {
        (self.predictions > 0).then(|| self.predicted_hits as f64 / self.predictions as f64)
    }

    /// Experts predicted per layer-step, on average; `None` before anything was counted.
    pub fn mean_predictions(&self) -> Option<f64> {
        (self.layer_steps > 0).then(|| self.predictions as f64 / self.layer_steps as f64)
    }

    fn count(&mut self, predicted: &BTreeSet<usize>, chosen: &[usize]) {
        self.layer_steps += 1;
        self.predictions += predicted.len() as u64;
        self.actual += chosen.len() as u64;
        self.predicted_hits += chosen.iter().filter(|e| predicted.contains(e)).count() as u64;
    }
}

/// How well the prefetcher predicted the routers, since the runner was built or the stats
/// were reset.
///
/// A layer-step counts under `look_ahead` when it received at least one router look-ahead
/// prediction in that step (its predicted set is the union of all hints it got in the step,
/// previous-step experts included). The first `depth` MoE layers are also hinted at the start
/// of each step with the experts they used in the previous step; the first MoE layer gets
/// nothing else (no router runs before it), and its layer-steps count under `history_only`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Layer-steps predicted by router look-ahead.
    pub look_ahead: PredictionCounts,
    /// Layer-steps hinted only with the previous step's experts.
    pub history_only: PredictionCounts,
}

impl PrefetchStats {
    /// Recall of router look-ahead ([`PredictionCounts::recall`] of `look_ahead`).
    pub fn recall(&self) -> Option<f64> {
        self.look_ahead.recall()
    }
}

/// What one MoE layer was told in the current step.
#[derive(Debug, Clone, Default)]
struct Hinted {
    /// Union of the look-ahead predictions it received.
    look_ahead: Option<BTreeSet<usize>>,
    /// The previous-step experts it was hinted with at the start of the step.
    history: Option<BTreeSet<usize>>,
}

/// The runner's prefetch state: depth, each layer's previous-step experts, this step's hints.
#[derive(Debug, Clone, Default)]
pub(super) struct Prefetcher {
    depth: usize,
    /// Per decoder layer: the experts its router chose the last time it ran (ascending).
    previous: Vec<Vec<usize>>,
    /// Per decoder layer: the hints of the current step.
    hinted: Vec<Hinted>,
    stats: PrefetchStats,
}

impl Prefetcher {
    /// Off (depth 0) for a model of `num_layers` decoder layers.
    pub(super) fn new(num_layers: usize) -> Prefetcher {
        Prefetcher {
            depth: 0,
            previous: vec![Vec::new(); num_layers],
            hinted: vec![Hinted::default(); num_layers],
            stats: PrefetchStats::default(),
        }
    }

    pub(super) fn depth(&self) -> usize {
        self.depth
    }

    pub(super) fn set_depth(&mut self, depth: usize) {
        self.depth = depth;
    }

    pub(super) fn stats(&self) -> PrefetchStats {
        self.stats
    }

    pub(super) fn reset_stats(&mut self) {
        self.stats = PrefetchStats::default();
    }

    /// Starts a step: forgets the last step's hints and hints the first `depth` of
    /// `moe_layers` with the experts they used in the previous step.
    pub(super) fn start_step<P: ExpertProvider>(&mut self, moe_layers: &[usize], experts: &mut P) {
        self.hinted.iter_mut().for_each(|h| *h = Hinted::default());
        if self.depth == 0 {
            return;
        }
        for &layer in moe_layers.iter().take(self.depth) {
            let Some(previous) = self.previous.get(layer).filter(|p| !p.is_empty()) else {
                continue;
            };
            experts.prefetch(layer, previous);
            if let Some(h) = self.hinted.get_mut(layer) {
                h.history = Some(previous.iter().copied().collect());
            }
        }
    }

    /// Records what `layer`'s router chose this step (`chosen`: ascending, no repeats):
    /// scores the hints it got and keeps `chosen` as its previous-step experts.
    pub(super) fn routed(&mut self, layer: usize, chosen: &[usize]) {
        if self.depth == 0 {
            return;
        }
        if let Some(h) = self.hinted.get_mut(layer) {
            let h = std::mem::take(h);
            if let Some(mut predicted) = h.look_ahead {
                // Everything the layer was hinted with this step, history hints included.
                predicted.extend(h.history.iter().flatten());
                self.stats.look_ahead.count(&predicted, chosen);
            } else if let Some(predicted) = &h.history {
                self.stats.history_only.count(predicted, chosen);
            }
        }
        if let Some(p) = self.previous.get_mut(layer) {
            p.clear();
            p.extend_from_slice(chosen);
        }
    }

    /// Router look-ahead from the hidden state `h` one MoE layer's router saw: `next` holds
    /// the next MoE layers with their routers, nearest first (the first `depth` are used).
    /// Each gets a hint: the experts its router picks for `h`, by summed routing weight over
    /// the tokens, then those it used in the previous step. A backend failure here drops the
    /// hint: prefetching never fails a step.
    pub(super) fn look_ahead<'w, B: Backend>(
        &mut self,
        backend: &B,
        moe: &MoeSpec,
        h: &B::Act,
        next: impl Iterator<Item = (usize, &'w B::Weight)>,
    ) -> Vec<(usize, Vec<usize>)>
    where
        B::Weight: 'w,
    {
        let mut hints = Vec::new();
        if self.depth == 0 {
            return hints;
        }
        for (layer, router) in next.take(self.depth) {
            let routing = backend
                .linear(h, router, None)
                .and_then(|logits| backend.route(&logits, moe.top_k, moe.norm_topk_prob));
            let (mut ranked, budget) = match routing {
                Ok(r) => (rank_by_weight(&r, moe.num_experts), r.experts.len()),
                Err(e) => {
                    tracing::debug!(layer, error = %e, "router look-ahead failed; no hint");
                    continue;
                }
            };
            // As many experts as the step has picks (tokens × top-k): for a decode step that
            // is the look-ahead alone; where tokens agree on experts, the previous step's
            // experts fill the rest. More would only evict experts that are still wanted.
            let previous = self.previous.get(layer).map_or(&[][..], Vec::as_slice);
            for &e in previous {
                if ranked.len() >= budget {
                    break;
                }
                if !ranked.contains(&e) {
                    ranked.push(e);
                }
            }
            if ranked.is_empty() {
                continue;
            }
            if let Some(h) = self.hinted.get_mut(layer) {
                h.look_ahead
                    .get_or_insert_with(BTreeSet::new)
                    .extend(ranked.iter().copied());
            }
            hints.push((layer, ranked));
        }
        hints
    }
}

/// The experts `routing` selects for any token, by descending summed combine weight (ties:
/// lower index first); indices outside `0..num_experts` are dropped.
pub(super) fn rank_by_weight(routing: &Routing, num_experts: usize) -> Vec<usize> {
    let mut score = vec![0f64; num_experts];
    let mut picked = vec![false; num_experts];
    for (&e, &w) in routing.experts.iter().zip(&routing.weights) {
        if let Some(s) = score.get_mut(e as usize) {
            *s += f64::from(w);
            picked[e as usize] = true;
        }
    }
    let mut ranked: Vec<usize> = (0..num_experts).filter(|&e| picked[e]).collect();
    ranked.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hints that the test reads back.
    #[derive(Debug, Default)]
    struct Hints(Vec<(usize, Vec<usize>)>);

    impl ExpertProvider for Hints {
        fn prepare(&mut self, _: usize, _: &[usize]) -> Result<(), super::super::EngineError> {
            Ok(())
        }
        fn expert(
            &self,
            layer: usize,
            expert: usize,
        ) -> Result<crate::backend::ExpertRef<'_>, super::super::EngineError> {
            Err(super::super::EngineError::ExpertUnavailable {
                layer,
                expert,
                reason: "test double".into(),
            })
        }
        fn prefetch(&mut self, layer: usize, experts: &[usize]) {
            self.0.push((layer, experts.to_vec()));
        }
    }

    #[test]
    fn ranking_sums_weights_over_tokens_and_drops_bad_indices() {
        let routing = Routing {
            top_k: 2,
            experts: vec![3, 1, 1, 0, 9, 3],
            weights: vec![0.6, 0.4, 0.7, 0.3, 0.9, 0.1],
        };
        // 1: 1.1, 3: 0.7, 0: 0.3; 9 is outside the 4 experts.
        assert_eq!(rank_by_weight(&routing, 4), vec![1, 3, 0]);
    }

    #[test]
    fn history_hints_and_scoring_follow_the_layers() {
        let mut p = Prefetcher::new(3);
        let mut hints = Hints::default();
        // Off: nothing is hinted or counted.
        p.start_step(&[0, 2], &mut hints);
        p.routed(0, &[1, 2]);
        assert!(hints.0.is_empty());
        assert_eq!(p.stats(), PrefetchStats::default());

        p.set_depth(1);
        p.start_step(&[0, 2], &mut hints);
        p.routed(0, &[1, 2]);
        p.routed(2, &[0, 5]);
        // First step with history: layer 0 gets its previous experts.
        p.start_step(&[0, 2], &mut hints);
        assert_eq!(hints.0, vec![(0, vec![1, 2])]);
        p.routed(0, &[2, 3]);
        p.hinted[2].look_ahead = Some([0, 4].into_iter().collect());
        p.routed(2, &[0, 5, 6]);
        let s = p.stats();
        assert_eq!(
            s.history_only,
            PredictionCounts {
                layer_steps: 1,
                predictions: 2,
                actual: 2,
                predicted_hits: 1
            }
        );
        assert_eq!(
            s.look_ahead,
            PredictionCounts {
                layer_steps: 1,
                predictions: 2,
                actual: 3,
                predicted_hits: 1
            }
        );
        assert_eq!(s.recall(), Some(1.0 / 3.0));
        p.reset_stats();
        assert_eq!(p.stats().recall(), None);
    }
}
