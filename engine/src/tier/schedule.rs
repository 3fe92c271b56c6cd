//! Deciding what to fetch when: demand fills for `prepare`, paced prefetches, victim choice, and
//! the [`ExpertProvider`] the forward pass calls.

use std::collections::BTreeMap;
use std::time::Instant;

use tileflow_spdk::Priority;
use xxhash_rust::xxh3::Xxh3;

use super::fill::{Digest, Fill, Source};
use super::{
    DeviceSlot, ExpertCache, TierError, TierMemory, TierMemoryError, TierStats, Verify,
    MAX_STALL_EVENTS,
};
use crate::backend::ExpertRef;
use crate::forward::{EngineError, ExpertProvider, Placement};

/// What the wait for a prepare call found.
type FetchError = (usize, Box<TierError>);

impl<M: TierMemory> ExpertCache<M> {
    /// Handles every completion ready now, without blocking, then starts what can start.
    pub(super) fn drain_ready(&mut self) {
        while let Some(c) = self.queue.try_complete() {
            self.on_completion(c);
        }
        let ids: Vec<u64> = self.fills.keys().copied().collect();
        for id in ids {
            self.advance(id);
        }
        self.pump();
    }

    /// Starts queued demand fills, hands free staging buffers to fills (demand first), then
    /// starts the prefetches the pacer allows.
    fn pump(&mut self) {
        let mut i = 0;
        while i < self.demand_queue.len() {
            let pos = self.demand_queue[i];
            if self.try_start(pos, Priority::Demand) {
                self.demand_queue.remove(i);
            } else {
                i += 1;
            }
        }
        self.feed_ring();
        while let Some(&pos) = self.prefetch_queue.front() {
            if self.device_index.contains_key(&pos) || self.filling.contains_key(&pos) {
                self.prefetch_queue.pop_front();
                continue;
            }
            if !self.demand_queue.is_empty() {
                break;
            }
            let cost = if self.host_copy_source(pos).is_some() {
                0
            } else {
                self.manifest.experts[pos].bytes
            };
            if !self.pacer.may_start(cost, Instant::now())
                || !self.try_start(pos, Priority::Prefetch)
            {
                break;
            }
            self.prefetch_queue.pop_front();
        }
        self.feed_ring();
    }

    /// Gives free staging buffers to fills waiting for them, demand fills first.
    fn feed_ring(&mut self) {
        if !self.host.is_empty() {
            return;
        }
        for priority in [Priority::Demand, Priority::Prefetch] {
            let ids: Vec<u64> = self
                .fills
                .iter()
                .filter(|(_, f)| f.priority == priority && f.next_submit < f.tiles)
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                if self.ring.is_empty() {
                    return;
                }
                self.submit_tiles(id);
            }
        }
    }

    /// The host slot holding `pos`, if it can be copied from now.
    fn host_copy_source(&self, pos: usize) -> Option<usize> {
        self.host_index
            .get(&pos)
            .copied()
            .filter(|&h| !self.host[h].meta.busy)
    }

    /// A device slot for a new fill: an empty one, a new one under the budget, or a victim.
    /// A prefetch does not displace another unused prefetch.
    fn device_slot_for(&self, priority: Priority) -> Option<usize> {
        if let Some(i) = self
            .device
            .iter()
            .position(|s| s.meta.expert.is_none() && !s.meta.busy)
        {
            return Some(i);
        }
        if self.device.len() < self.device_cap {
            return Some(self.device.len());
        }
        let spare = priority == Priority::Prefetch;
        self.usage.victim(
            self.device.iter().map(|s| {
                let mut m = s.meta;
                // Treated as busy: never chosen.
                m.busy |= spare && m.prefetched;
                m
            }),
            &self.protected,
        )
    }

    /// Starts a fill of `pos`; false when no slot can take it yet (it stays queued).
    fn try_start(&mut self, pos: usize, priority: Priority) -> bool {
        let from_host = self.host_copy_source(pos);
        let Some(dslot) = self.device_slot_for(priority) else {
            return false;
        };
        let host_slot = match (from_host, self.host.is_empty()) {
            (Some(_), _) | (None, true) => None,
            (None, false) => {
                let host = self.host.iter().map(|s| s.meta);
                match self.usage.victim(host, &self.host_protected) {
                    Some(h) => Some(h),
                    None => return false,
                }
            }
        };
        let extent = &self.manifest.experts[pos];
        let bytes = match usize::try_from(extent.bytes) {
            Ok(b) if b <= self.slot_bytes => b,
            _ => {
                self.fail_start(pos, priority, TierError::Alloc { bytes: usize::MAX });
                return true;
            }
        };
        if dslot == self.device.len() {
            match self.memory.alloc_device_slot(self.slot_bytes) {
                Ok(mem) => self.device.push(DeviceSlot {
                    meta: Default::default(),
                    mem,
                }),
                Err(source) => {
                    let err = TierError::Memory {
                        model: self.model.clone(),
                        what: format!("device slot {dslot}"),
                        source,
                    };
                    self.fail_start(pos, priority, err);
                    return true;
                }
            }
        }
        let meta = &mut self.device[dslot].meta;
        if let Some(old) = meta.expert.take() {
            self.device_index.remove(&old);
            self.stats.device_evictions += 1;
            if meta.prefetched {
                self.stats.prefetch.wasted += 1;
            }
        }
        *meta = Default::default();
        meta.busy = true;
        if let Some(h) = host_slot {
            let meta = &mut self.host[h].meta;
            if let Some(old) = meta.expert.take() {
                self.host_index.remove(&old);
                self.stats.host_evictions += 1;
            }
            meta.busy = true;
        }
        let source = match from_host {
            Some(h) => {
                self.host[h].meta.busy = true;
                Source::Host(h)
            }
            None => Source::Storage(host_slot),
        };
        let verify = match (self.verify, source) {
            (Verify::Always, _) => true,
            (Verify::First, Source::Storage(_)) => !self.verified[pos],
            _ => false,
        };
        let cost = match (priority, source) {
            (Priority::Prefetch, Source::Storage(_)) => bytes as u64,
            _ => 0,
        };
        self.pacer.start(cost);
        let tiles = bytes.div_ceil(self.tile_size);
        let id = self.next_fill;
        self.next_fill += 1;
        let mut fill = Fill {
            expert: pos,
            priority,
            cost,
            device_slot: dslot,
            source,
            bytes,
            tiles,
            next_submit: 0,
            reads_out: 0,
            held: (0..tiles).map(|_| None).collect(),
            copied: vec![false; tiles],
            copies: Vec::new(),
            hashed: 0,
            hasher: verify.then(|| Digest(Xxh3::new())),
            error: None,
        };
        if let Source::Host(h) = source {
            self.copy_from_host(&mut fill, h);
        }
        self.fills.insert(id, fill);
        self.filling.insert(pos, id);
        self.submit_tiles(id);
        self.advance(id);
        true
    }

    /// Starts the copy of a host-tier hit (its tiles as one transfer where the memory can),
    /// hashing the host bytes when verifying.
    fn copy_from_host(&mut self, fill: &mut Fill<M::Event>, h: usize) {
        fill.next_submit = fill.tiles;
        fill.hashed = fill.tiles;
        let mut srcs = Vec::with_capacity(fill.tiles);
        for k in 0..fill.tiles {
            let len = fill.tile_len(k, self.tile_size);
            let Some(Some(src)) = self.host[h].tiles.get(k) else {
                // A host slot always holds its tiles; were one missing, the bytes after it
                // would land at the wrong offsets.
                break;
            };
            if let Some(hasher) = &mut fill.hasher {
                hasher.0.update(&src[..len]);
            }
            srcs.push((src, 0..len));
        }
        let complete = srcs.len() == fill.tiles;
        let bytes: usize = srcs.iter().map(|(_, r)| r.len()).sum();
        let dst = &mut self.device[fill.device_slot].mem;
        let e = &self.manifest.experts[fill.expert];
        let result = if complete {
            self.memory.copy_all_to_device(&srcs, dst, 0)
        } else {
            Err(TierMemoryError::Copy {
                reason: "the host slot is missing a tile".into(),
            })
        };
        match result {
            Ok(ev) => {
                self.stats.h2d_bytes += bytes as u64;
                if let Some(ev) = ev {
                    fill.copies.push((fill.tiles.saturating_sub(1), ev));
                }
            }
            Err(source) => {
                fill.error.get_or_insert(TierError::Memory {
                    model: self.model.clone(),
                    what: format!(
                        "cannot copy layer {} expert {} from its host slot",
                        e.layer, e.expert
                    ),
                    source,
                });
            }
        }
    }

    /// A fill that could not even start: a demand reports it, a prefetch is dropped.
    fn fail_start(&mut self, pos: usize, priority: Priority, err: TierError) {
        if priority == Priority::Demand {
            self.failed.insert(pos, err);
        }
    }

    /// Makes every expert of `positions` resident in the device tier, waiting for their fills;
    /// they stay resident until the next call. The first failure is returned with its expert.
    pub(super) fn fetch_all(&mut self, positions: &[usize]) -> Result<(), FetchError> {
        self.begin(positions, &[]);
        self.wait_resident(positions)
    }

    /// Starts a step's layer: `positions` are kept in the device tier (demand fills start for
    /// those missing) and `host` in their host slots (the CPU reads them) until the next
    /// call; lookups and runs are counted.
    pub(super) fn begin(&mut self, positions: &[usize], host: &[usize]) {
        // The CPU's host slots are kept from the first fill this call may start; the device
        // set is protected after the fills that completed meanwhile were handled (a queued
        // prefetch of this set is then still a late one, turned into a demand read).
        self.host_protected = host.iter().copied().collect();
        self.drain_ready();
        self.protected = positions.iter().copied().collect();
        for &pos in positions {
            self.failed.remove(&pos);
            self.lookup(pos);
            self.stats.ran_device.experts += 1;
            self.stats.ran_device.bytes += self.manifest.experts[pos].bytes;
        }
        for &pos in host {
            self.usage.touch(pos);
            self.stats.ran_host.experts += 1;
            self.stats.ran_host.bytes += self.manifest.experts[pos].bytes;
        }
        self.pump();
    }

    /// Waits until every expert of `positions` (begun with [`ExpertCache::begin`]) is
    /// resident in the device tier. The first failure is returned with its expert.
    pub(super) fn wait_resident(&mut self, positions: &[usize]) -> Result<(), FetchError> {
        let start = Instant::now();
        let mut blocked = false;
        let result = loop {
            let mut pending = None;
            let mut failed = None;
            for &pos in positions {
                if let Some(err) = self.failed.remove(&pos) {
                    failed = Some((pos, Box::new(err)));
                    break;
                }
                if !self.device_index.contains_key(&pos) {
                    pending.get_or_insert(pos);
                }
            }
            if let Some(f) = failed {
                break Err(f);
            }
            let Some(waiting) = pending else { break Ok(()) };
            blocked = true;
            if let Some(c) = self.queue.wait() {
                self.on_completion(c);
                self.pump();
                continue;
            }
            if self.wait_one_copy() {
                self.pump();
                continue;
            }
            let before = self.fills.len();
            self.pump();
            if self.fills.len() == before && self.queue.in_flight() == 0 {
                let e = &self.manifest.experts[waiting];
                break Err((
                    waiting,
                    Box::new(TierError::NoSlot {
                        model: self.model.clone(),
                        layer: e.layer,
                        expert: e.expert,
                    }),
                ));
            }
        };
        if blocked {
            let stall = start.elapsed();
            self.stats.stall += stall;
            if self.stalls.len() < MAX_STALL_EVENTS {
                self.stalls.push(stall);
            }
        }
        result
    }

    /// One lookup by the forward pass: counts it and queues a demand fill on a miss.
    fn lookup(&mut self, pos: usize) {
        self.usage.touch(pos);
        if let Some(&slot) = self.device_index.get(&pos) {
            self.stats.device.hits += 1;
            let meta = &mut self.device[slot].meta;
            if meta.prefetched {
                meta.prefetched = false;
                self.stats.prefetch.used += 1;
            }
            return;
        }
        self.stats.device.misses += 1;
        if let Some(fill) = self.filling.get(&pos).and_then(|id| self.fills.get_mut(id)) {
            if fill.priority == Priority::Prefetch {
                fill.priority = Priority::Demand;
                self.stats.prefetch.late += 1;
            }
            return;
        }
        if let Some(i) = self.prefetch_queue.iter().position(|&p| p == pos) {
            self.prefetch_queue.remove(i);
            self.stats.prefetch.late += 1;
        }
        if !self.host.is_empty() {
            if self.host_index.contains_key(&pos) {
                self.stats.host.hits += 1;
            } else {
                self.stats.host.misses += 1;
            }
        }
        if !self.demand_queue.contains(&pos) {
            self.demand_queue.push_back(pos);
        }
    }

    /// Drops queued (not yet started) prefetches that the forward pass has passed: those of
    /// earlier layers, and those of `layer` that it is not asking for. Their reads would only
    /// delay the reads still to come; each counts as wasted.
    fn drop_stale_prefetches(&mut self, layer: usize, wanted: &[usize]) {
        let experts = &self.manifest.experts;
        let before = self.prefetch_queue.len();
        self.prefetch_queue.retain(|&pos| {
            let l = experts[pos].layer;
            l > layer || (l == layer && wanted.contains(&pos))
        });
        self.stats.prefetch.wasted += (before - self.prefetch_queue.len()) as u64;
    }

    /// Queues prefetches of the experts of `positions` that are neither resident nor on their
    /// way, dropping the oldest queued hint when the queue holds a device tier's worth.
    pub(super) fn queue_prefetch(&mut self, positions: &[usize]) {
        self.drain_ready();
        for &pos in positions {
            if self.device_index.contains_key(&pos)
                || self.filling.contains_key(&pos)
                || self.prefetch_queue.contains(&pos)
                || self.demand_queue.contains(&pos)
            {
                continue;
            }
            self.stats.prefetch.issued += 1;
            if self.prefetch_queue.len() >= self.device_cap {
                self.prefetch_queue.pop_front();
                self.stats.prefetch.wasted += 1;
            }
            self.prefetch_queue.push_back(pos);
        }
        self.pump();
    }
}

impl<M: TierMemory> ExpertCache<M> {
    /// Reads every expert once, layer by layer, as many at a time as the device tier holds:
    /// afterwards the device tier holds the last of them and the host tier as many as fit
    /// (for benchmarks that measure a warm cache). The counters start again from zero.
    pub fn warm(&mut self) -> Result<(), EngineError> {
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for x in &self.manifest.experts {
            by_layer.entry(x.layer).or_default().push(x.expert);
        }
        let step = self.capacity();
        for (layer, mut experts) in by_layer {
            experts.sort_unstable();
            for chunk in experts.chunks(step) {
                ExpertProvider::prepare(self, layer, chunk)?;
            }
        }
        self.stats = TierStats {
            source: self.stats.source,
            ..TierStats::default()
        };
        self.stalls.clear();
        Ok(())
    }
}

impl<M: TierMemory> ExpertProvider for ExpertCache<M> {
    fn capacity(&self) -> usize {
        ExpertCache::capacity(self)
    }

    fn prepare(&mut self, layer: usize, experts: &[usize]) -> Result<(), EngineError> {
        let positions = self.positions(layer, experts)?;
        self.drop_stale_prefetches(layer, &positions);
        self.fetch_all(&positions)
            .map_err(|(pos, e)| self.read_error(layer, pos, e))
    }

    fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError> {
        let view = self
            .peek(layer, expert)
            .ok_or_else(|| EngineError::ExpertUnavailable {
                layer,
                expert,
                reason: "it was not prepared (or was evicted) before use".into(),
            })?;
        Ok(ExpertRef {
            bytes: view.bytes,
            dtype: view.dtype,
            gate: view.extent.gate,
            up: view.extent.up,
            down: view.extent.down,
        })
    }

    fn all_resident(&self) -> bool {
        self.device_index.len() == self.manifest.experts.len()
    }

    fn prefetch(&mut self, layer: usize, experts: &[usize]) {
        let positions: Vec<usize> = experts
            .iter()
            .filter_map(|&e| self.position(layer, e).ok())
            .collect();
        self.queue_prefetch(&positions);
    }

    fn placement(&self, layer: usize, expert: usize) -> Placement {
        match self.position(layer, expert) {
            Ok(pos) if self.device_index.contains_key(&pos) => Placement::Device,
            Ok(pos) if self.host_index.contains_key(&pos) => Placement::Host,
            _ => Placement::Storage,
        }
    }

    fn start(&mut self, layer: usize, device: &[usize], host: &[usize]) -> Result<(), EngineError> {
        let device = self.positions(layer, device)?;
        let host = self.positions(layer, host)?;
        self.drop_stale_prefetches(layer, &device);
        self.begin(&device, &host);
        Ok(())
    }

    fn finish(&mut self, layer: usize, device: &[usize]) -> Result<(), EngineError> {
        let positions = self.positions(layer, device)?;
        self.wait_resident(&positions)
            .map_err(|(pos, e)| self.read_error(layer, pos, e))
    }

    fn expert_bytes(&self, layer: usize, expert: usize) -> u64 {
        self.position(layer, expert)
            .map_or(0, |pos| self.manifest.experts[pos].bytes)
    }

    fn host_expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError> {
        let unavailable = |reason: &str| EngineError::ExpertUnavailable {
            layer,
            expert,
            reason: reason.into(),
        };
        let pos = self
            .position(layer, expert)
            .map_err(|_| unavailable("the model has no such expert"))?;
        if !self.host_protected.contains(&pos) {
            return Err(unavailable("it was not started for the CPU"));
        }
        let view = self.host_view(pos).ok_or_else(|| {
            unavailable("it is not in the host tier (or a read into its slot is in flight)")
        })?;
        Ok(ExpertRef {
            bytes: view.bytes,
            dtype: view.dtype,
            gate: view.extent.gate,
            up: view.extent.up,
            down: view.extent.down,
        })
    }
}

impl<M: TierMemory> ExpertCache<M> {
    /// The manifest positions of `experts` of `layer`.
    fn positions(&self, layer: usize, experts: &[usize]) -> Result<Vec<usize>, EngineError> {
        experts
            .iter()
            .map(|&expert| {
                self.position(layer, expert)
                    .map_err(|e| EngineError::ExpertRead {
                        layer,
                        expert,
                        source: Box::new(e),
                    })
            })
            .collect()
    }

    /// The error of a failed fill of `pos` in `layer`.
    fn read_error(&self, layer: usize, pos: usize, e: Box<TierError>) -> EngineError {
        let expert = self.manifest.experts.get(pos).map_or(0, |x| x.expert);
        EngineError::ExpertRead {
            layer,
            expert,
            source: e,
        }
    }
}
