//! One expert on its way into a device slot: its tile reads, the copies of landed tiles into the
//! device slot, and the streaming checksum over the tiles in order.

use tileflow_spdk::{DmaBuf, Priority, ReadCompletion, ReadRequest};
use xxhash_rust::xxh3::Xxh3;

use super::{ExpertCache, TierError, TierMemory};

/// Where a fill's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Storage, into host slot `Some(h)` (kept there) or through the staging ring (`None`).
    Storage(Option<usize>),
    /// Host slot `h`, already resident: copies only.
    Host(usize),
}

/// The streaming checksum of a fill (`Xxh3` itself has no `Debug`).
pub(super) struct Digest(pub Xxh3);

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xxh3")
    }
}

/// An expert being brought into device slot `device_slot`.
#[derive(Debug)]
pub(super) struct Fill<E> {
    /// Index in the manifest's list.
    pub expert: usize,
    /// Demand, or a prefetch nobody has asked for yet.
    pub priority: Priority,
    /// Storage bytes charged to the prefetch pacer (0 for demand fills and host copies).
    pub cost: u64,
    pub device_slot: usize,
    pub source: Source,
    /// Bytes of the expert.
    pub bytes: usize,
    pub tiles: usize,
    /// Next tile to submit a read for.
    pub next_submit: usize,
    /// Tile reads submitted and not completed.
    pub reads_out: usize,
    /// Landed tile buffers not yet given back (to the ring or the host slot).
    pub held: Vec<Option<DmaBuf>>,
    pub copied: Vec<bool>,
    /// Copies started and not yet seen complete, by tile.
    pub copies: Vec<(usize, E)>,
    /// Tiles fed to the checksum (or passed, when not verifying), in order.
    pub hashed: usize,
    pub hasher: Option<Digest>,
    pub error: Option<TierError>,
}

impl<E> Fill<E> {
    /// Bytes of tile `k`.
    pub fn tile_len(&self, k: usize, tile_size: usize) -> usize {
        tile_size.min(self.bytes.saturating_sub(k * tile_size))
    }

    fn done(&self) -> bool {
        self.next_submit >= self.tiles
            && self.reads_out == 0
            && self.copies.is_empty()
            && (self.error.is_some() || self.hashed >= self.tiles)
    }
}

/// Tags carry the fill id in the high half and the tile in the low half.
pub(super) fn tag(id: u64, tile: usize) -> u64 {
    (id << 32) | (tile as u64 & 0xffff_ffff)
}

impl<M: TierMemory> ExpertCache<M> {
    /// Submits the tile reads of fill `id` that have a buffer: all of them for a host slot, as
    /// many as the staging ring has free buffers otherwise.
    pub(super) fn submit_tiles(&mut self, id: u64) {
        let Some(fill) = self.fills.get_mut(&id) else {
            return;
        };
        let Source::Storage(host) = fill.source else {
            return;
        };
        let Some(extent) = self.manifest.experts.get(fill.expert) else {
            return;
        };
        while fill.next_submit < fill.tiles {
            if fill.error.is_some() {
                fill.next_submit = fill.tiles;
                break;
            }
            let k = fill.next_submit;
            let buf = match host {
                Some(h) => self
                    .host
                    .get_mut(h)
                    .and_then(|s| s.tiles.get_mut(k))
                    .and_then(Option::take),
                None => self.ring.pop(),
            };
            let Some(buf) = buf else { break };
            let offset = extent.offset.saturating_add((k * self.tile_size) as u64);
            self.queue.submit(ReadRequest {
                tag: tag(id, k),
                file: 0,
                offset,
                len: fill.tile_len(k, self.tile_size),
                buf,
                priority: fill.priority,
            });
            fill.next_submit += 1;
            fill.reads_out += 1;
        }
    }

    /// A tile read finished: keep its buffer, start its copy, and move the fill on.
    pub(super) fn on_completion(&mut self, c: ReadCompletion) {
        let id = c.tag >> 32;
        let k = (c.tag & 0xffff_ffff) as usize;
        let Some(fill) = self.fills.get_mut(&id) else {
            // Not ours (cannot happen): keep a ring buffer rather than lose it.
            if self.host.is_empty() {
                self.ring.push(c.buf);
            }
            return;
        };
        fill.reads_out = fill.reads_out.saturating_sub(1);
        let len = fill.tile_len(k, self.tile_size);
        let extent = &self.manifest.experts[fill.expert];
        match c.result {
            Err(source) => {
                if fill.error.is_none() {
                    fill.error = Some(TierError::Read {
                        model: self.model.clone(),
                        layer: extent.layer,
                        expert: extent.expert,
                        offset: extent.offset,
                        source,
                    });
                }
            }
            Ok(()) if fill.error.is_none() => {
                self.stats.bytes_read += len as u64;
                let dst = &mut self.device[fill.device_slot].mem;
                let at = k * self.tile_size;
                match self.memory.copy_to_device(&c.buf, 0..len, dst, at) {
                    Ok(ev) => {
                        self.stats.h2d_bytes += len as u64;
                        fill.copies.push((k, ev));
                    }
                    Err(source) => {
                        fill.error = Some(TierError::Memory {
                            model: self.model.clone(),
                            what: format!(
                                "cannot copy tile {k} of layer {} expert {} to its device slot",
                                extent.layer, extent.expert
                            ),
                            source,
                        });
                    }
                }
            }
            Ok(()) => {}
        }
        if let Some(slot) = fill.held.get_mut(k) {
            *slot = Some(c.buf);
        }
        self.advance(id);
    }

    /// Feeds landed tiles to the checksum in order, notes finished copies, gives staging
    /// buffers back, and retires the fill once everything is in.
    pub(super) fn advance(&mut self, id: u64) {
        let Some(fill) = self.fills.get_mut(&id) else {
            return;
        };
        if let Source::Storage(_) = fill.source {
            while fill.hashed < fill.tiles && fill.error.is_none() {
                let Some(Some(buf)) = fill.held.get(fill.hashed) else {
                    break;
                };
                let len = fill.tile_len(fill.hashed, self.tile_size);
                if let Some(h) = &mut fill.hasher {
                    h.0.update(&buf[..len]);
                }
                fill.hashed += 1;
            }
        }
        let mut i = 0;
        while i < fill.copies.len() {
            match self.memory.poll(&fill.copies[i].1) {
                Ok(false) => i += 1,
                Ok(true) => {
                    let (k, _) = fill.copies.swap_remove(i);
                    fill.copied[k] = true;
                }
                Err(source) => {
                    let (k, _) = fill.copies.swap_remove(i);
                    if fill.error.is_none() {
                        let e = &self.manifest.experts[fill.expert];
                        fill.error = Some(TierError::Memory {
                            model: self.model.clone(),
                            what: format!(
                                "copy of tile {k} of layer {} expert {} failed",
                                e.layer, e.expert
                            ),
                            source,
                        });
                    }
                }
            }
        }
        if fill.source == Source::Storage(None) {
            for k in 0..fill.tiles {
                let copied = fill.copied[k] && k < fill.hashed;
                if copied || (fill.error.is_some() && !fill.copies.iter().any(|c| c.0 == k)) {
                    if let Some(buf) = fill.held[k].take() {
                        self.ring.push(buf);
                    }
                }
            }
        }
        if fill.done() {
            self.retire(id);
        } else if fill.source == Source::Storage(None) && fill.next_submit < fill.tiles {
            self.submit_tiles(id);
        }
    }

    /// Blocks on one outstanding copy; false when none is outstanding.
    pub(super) fn wait_one_copy(&mut self) -> bool {
        let Some((&id, fill)) = self.fills.iter_mut().find(|(_, f)| !f.copies.is_empty()) else {
            return false;
        };
        if let Some((k, ev)) = fill.copies.pop() {
            match self.memory.wait(ev) {
                Ok(()) => fill.copied[k] = true,
                Err(source) => {
                    let e = &self.manifest.experts[fill.expert];
                    fill.error.get_or_insert(TierError::Memory {
                        model: self.model.clone(),
                        what: format!(
                            "copy of tile {k} of layer {} expert {} failed",
                            e.layer, e.expert
                        ),
                        source,
                    });
                }
            }
        }
        self.advance(id);
        true
    }

    /// Ends a fill: gives its buffers back, checks the digest, and makes the expert resident or
    /// records why it is not.
    fn retire(&mut self, id: u64) {
        let Some(mut fill) = self.fills.remove(&id) else {
            return;
        };
        self.filling.remove(&fill.expert);
        self.pacer.finish(fill.cost);
        let extent = &self.manifest.experts[fill.expert];
        match fill.source {
            Source::Storage(None) => self
                .ring
                .extend(fill.held.iter_mut().filter_map(Option::take)),
            Source::Storage(Some(h)) | Source::Host(h) => {
                if let Source::Storage(_) = fill.source {
                    for (k, buf) in fill.held.iter_mut().enumerate() {
                        if let (Some(b), Some(t)) = (buf.take(), self.host[h].tiles.get_mut(k)) {
                            *t = Some(b);
                        }
                    }
                }
                self.host[h].meta.busy = false;
            }
        }
        let checked = fill.hasher.is_some();
        if let (None, Some(h)) = (&fill.error, fill.hasher.take()) {
            let actual = format!("{:016x}", h.0.digest());
            if actual != extent.xxh3 {
                fill.error = Some(TierError::Checksum {
                    model: self.model.clone(),
                    layer: extent.layer,
                    expert: extent.expert,
                    offset: extent.offset,
                    path: self.path.display().to_string(),
                    expected: extent.xxh3.clone(),
                    actual,
                });
            }
        }
        let slot = &mut self.device[fill.device_slot].meta;
        match fill.error {
            None => {
                if checked {
                    self.verified[fill.expert] = true;
                }
                slot.busy = false;
                slot.expert = Some(fill.expert);
                slot.prefetched = fill.priority == Priority::Prefetch;
                self.device_index.insert(fill.expert, fill.device_slot);
                if slot.prefetched {
                    self.usage.refresh(fill.expert);
                }
                if let Source::Storage(Some(h)) = fill.source {
                    self.host[h].meta.expert = Some(fill.expert);
                    self.host_index.insert(fill.expert, h);
                }
            }
            Some(err) => {
                *slot = Default::default();
                match fill.source {
                    Source::Storage(Some(h)) => self.host[h].meta.expert = None,
                    // A host copy that fails its check means the host slot is bad too.
                    Source::Host(h) if matches!(err, TierError::Checksum { .. }) => {
                        self.host[h].meta.expert = None;
                        self.host_index.remove(&fill.expert);
                    }
                    _ => {}
                }
                match err {
                    TierError::Checksum { .. } => self.stats.checksum_failures += 1,
                    TierError::Read { .. } => self.stats.read_failures += 1,
                    _ => {}
                }
                if fill.priority == Priority::Demand {
                    self.failed.insert(fill.expert, err);
                } else {
                    tracing::debug!(
                        model = %self.model,
                        error = %crate::error_chain(&err),
                        "prefetch dropped"
                    );
                }
            }
        }
    }
}
