//! Which expert leaves a full tier: per-expert recency and (decayed) frequency, shared by the
//! device and host tiers.

use std::collections::HashSet;

use super::config::EvictionPolicy;

/// What a tier knows about one of its slots when choosing a victim.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SlotMeta {
    /// The expert (index into the manifest's list) resident in the slot; `None` while empty or
    /// being filled.
    pub expert: Option<usize>,
    /// A fill into (or a copy out of) the slot is in flight.
    pub busy: bool,
    /// Pinned resident from load on.
    pub pinned: bool,
    /// Brought in by a prefetch and not asked for since.
    pub prefetched: bool,
}

/// Recency and frequency of every expert.
#[derive(Debug)]
pub(super) struct Usage {
    policy: EvictionPolicy,
    last: Vec<u64>,
    freq: Vec<u32>,
    clock: u64,
    lookups: u64,
    decay_every: u64,
}

impl Usage {
    /// For `experts` experts; LFRU halves every count each `decay_every` lookups.
    pub fn new(policy: EvictionPolicy, experts: usize, decay_every: u64) -> Usage {
        Usage {
            policy,
            last: vec![0; experts],
            freq: vec![0; experts],
            clock: 0,
            lookups: 0,
            decay_every: decay_every.max(1),
        }
    }

    /// A lookup of `expert` by the forward pass.
    pub fn touch(&mut self, expert: usize) {
        self.refresh(expert);
        if let Some(f) = self.freq.get_mut(expert) {
            *f = f.saturating_add(1);
        }
        self.lookups += 1;
        if self.policy == EvictionPolicy::Lfru && self.lookups.is_multiple_of(self.decay_every) {
            for f in &mut self.freq {
                *f /= 2;
            }
        }
    }

    /// Makes `expert` the most recent without counting a use (a prefetch arriving).
    pub fn refresh(&mut self, expert: usize) {
        self.clock += 1;
        if let Some(l) = self.last.get_mut(expert) {
            *l = self.clock;
        }
    }

    /// Smaller leaves first.
    fn rank(&self, expert: usize) -> (u32, u64) {
        let last = self.last.get(expert).copied().unwrap_or(0);
        match self.policy {
            EvictionPolicy::Lru => (0, last),
            EvictionPolicy::Lfru => (self.freq.get(expert).copied().unwrap_or(0), last),
        }
    }

    /// The slot to fill next: an empty idle slot, else the idle resident slot whose expert
    /// ranks lowest, never a pinned one nor one holding a `protected` expert.
    pub fn victim(
        &self,
        slots: impl Iterator<Item = SlotMeta>,
        protected: &HashSet<usize>,
    ) -> Option<usize> {
        let mut best: Option<(usize, (u32, u64))> = None;
        for (i, s) in slots.enumerate() {
            if s.busy || s.pinned {
                continue;
            }
            let Some(e) = s.expert else { return Some(i) };
            if protected.contains(&e) {
                continue;
            }
            let r = self.rank(e);
            if best.is_none_or(|(_, b)| r < b) {
                best = Some((i, r));
            }
        }
        best.map(|(i, _)| i)
    }
}
