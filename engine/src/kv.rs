//! The paged KV cache's bookkeeping: a fixed pool of blocks of `block_size` token slots,
//! shared by all layers, and a block table per sequence.
//!
//! Block `b` covers slots `b * block_size .. (b + 1) * block_size` of every layer's key and
//! value pool; the pools themselves live on the backend ([`crate::backend::Backend::KvPool`])
//! as `[num_blocks * block_size, kv_heads, head_dim]` per layer. Position `p` of a sequence is
//! in block `table[p / block_size]` at offset `p % block_size`. This module only hands out and
//! takes back blocks; it never touches the numbers.

use std::collections::HashMap;

/// Identifies a sequence (a request's token stream) in the cache and the forward pass.
pub type SeqId = u64;

/// Why the KV cache refused a request.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The layout cannot back a cache.
    #[error("invalid KV cache layout: {reason}")]
    InvalidLayout {
        /// What is wrong.
        reason: String,
    },
    /// The sequence id is not in the cache.
    #[error("sequence {seq} is not in the KV cache")]
    UnknownSequence {
        /// The sequence.
        seq: SeqId,
    },
    /// The sequence id is already in the cache.
    #[error("sequence {seq} is already in the KV cache")]
    SequenceExists {
        /// The sequence.
        seq: SeqId,
    },
    /// Not enough free blocks for the tokens asked for.
    #[error("KV cache out of blocks: sequence {seq} needs {needed} more, {free} free in all")]
    OutOfBlocks {
        /// The first sequence that did not fit.
        seq: SeqId,
        /// Blocks the whole request needed.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// A position past the sequence's reserved length.
    #[error("sequence {seq}: position {pos} is past its {len} reserved tokens")]
    PositionOutOfRange {
        /// The sequence.
        seq: SeqId,
        /// The position asked for.
        pos: usize,
        /// Tokens reserved.
        len: usize,
    },
}

/// The shape of a KV cache: how many blocks, how big, and what one token slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers (each has its own key and value pool).
    pub num_layers: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Key/value heads per slot.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Floats in one token slot of one layer's key (or value) pool.
    pub fn slot_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Token slots in one layer's pool.
    pub fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Floats in one layer's key (or value) pool.
    pub fn layer_elements(&self) -> usize {
        self.slots() * self.slot_width()
    }

    /// Bytes of keys and values of every layer at `bytes_per_element`.
    pub fn total_bytes(&self, bytes_per_element: usize) -> usize {
        2 * self.num_layers * self.layer_elements() * bytes_per_element
    }

    /// Checks that every dimension is positive and the pool is addressable.
    pub fn validate(&self) -> Result<(), KvError> {
        let dims = [
            ("num_layers", self.num_layers),
            ("num_blocks", self.num_blocks),
            ("block_size", self.block_size),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(KvError::InvalidLayout {
                reason: format!("{name} must be positive"),
            });
        }
        let addressable = u32::try_from(self.num_blocks).is_ok()
            && self
                .num_blocks
                .checked_mul(self.block_size)
                .and_then(|s| s.checked_mul(self.slot_width()))
                .and_then(|e| e.checked_mul(2 * self.num_layers * 4))
                .is_some();
        if !addressable {
            return Err(KvError::InvalidLayout {
                reason: format!(
                    "{} blocks of {} slots do not fit in memory",
                    self.num_blocks, self.block_size
                ),
            });
        }
        Ok(())
    }
}

/// One sequence's blocks and how many of its positions are reserved.
#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    blocks: Vec<u32>,
    len: usize,
}

/// The block allocator and every sequence's block table.
#[derive(Debug)]
pub struct PagedKvCache {
    layout: KvLayout,
    /// Free blocks; the most recently freed is handed out first.
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl PagedKvCache {
    /// An empty cache over `layout.num_blocks` blocks.
    pub fn new(layout: KvLayout) -> Result<PagedKvCache, KvError> {
        layout.validate()?;
        let count = u32::try_from(layout.num_blocks).map_err(|_| KvError::InvalidLayout {
            reason: "more blocks than u32 can name".into(),
        })?;
        Ok(PagedKvCache {
            layout,
            free: (0..count).rev().collect(),
            seqs: HashMap::new(),
        })
    }

    /// The cache's layout.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Sequences in the cache.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Whether `seq` is in the cache.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Registers an empty sequence.
    pub fn add_sequence(&mut self, seq: SeqId) -> Result<(), KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::SequenceExists { seq });
        }
        self.seqs.insert(seq, SeqBlocks::default());
        Ok(())
    }

    /// Removes a sequence and returns its blocks to the pool; returns how many it held.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<usize, KvError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        let n = s.blocks.len();
        self.free.extend(s.blocks.into_iter().rev());
        Ok(n)
    }

    /// Positions reserved for `seq` (the tokens whose keys and values are, or are about to
    /// be, cached).
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self.entry(seq)?.len)
    }

    /// `seq`'s blocks in position order.
    pub fn blocks(&self, seq: SeqId) -> Result<&[u32], KvError> {
        Ok(&self.entry(seq)?.blocks)
    }

    /// The pool slot (`block * block_size + offset`) of position `pos` of `seq`.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Result<usize, KvError> {
        let s = self.entry(seq)?;
        if pos >= s.len {
            return Err(KvError::PositionOutOfRange {
                seq,
                pos,
                len: s.len,
            });
        }
        let bs = self.layout.block_size;
        Ok(s.blocks[pos / bs] as usize * bs + pos % bs)
    }

    /// Sets the reserved length of each listed sequence, all or none: blocks are taken for
    /// growth and given back for truncation. When the pool cannot cover the whole request,
    /// nothing changes. A sequence listed twice is taken at its last length.
    pub fn resize(&mut self, requests: &[(SeqId, usize)]) -> Result<(), KvError> {
        let bs = self.layout.block_size;
        let mut needed = 0usize;
        let mut first_short = None;
        for &(seq, len) in requests {
            let have = self.entry(seq)?.blocks.len();
            let want = len.div_ceil(bs);
            if want > have {
                needed += want - have;
                first_short.get_or_insert(seq);
            }
        }
        if needed > self.free.len() {
            return Err(KvError::OutOfBlocks {
                seq: first_short.unwrap_or_default(),
                needed,
                free: self.free.len(),
            });
        }
        for &(seq, len) in requests {
            let want = len.div_ceil(bs);
            let s = self
                .seqs
                .get_mut(&seq)
                .ok_or(KvError::UnknownSequence { seq })?;
            while s.blocks.len() > want {
                if let Some(b) = s.blocks.pop() {
                    self.free.push(b);
                }
            }
            if s.blocks.len() < want {
                // Counted above: the pool holds at least this many.
                let take = want - s.blocks.len();
                let from = self.free.len() - take;
                s.blocks.extend(self.free.drain(from..).rev());
            }
            s.len = len;
        }
        Ok(())
    }

    fn entry(&self, seq: SeqId) -> Result<&SeqBlocks, KvError> {
        self.seqs.get(&seq).ok_or(KvError::UnknownSequence { seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(num_blocks: usize) -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_blocks,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
        }
    }

    #[test]
    fn grows_truncates_and_maps_slots() {
        let mut kv = PagedKvCache::new(layout(8)).unwrap();
        kv.add_sequence(7).unwrap();
        kv.resize(&[(7, 6)]).unwrap();
        assert_eq!(kv.blocks(7).unwrap().len(), 2);
        assert_eq!(kv.free_blocks(), 6);
        let b1 = kv.blocks(7).unwrap()[1] as usize;
        assert_eq!(kv.slot(7, 5).unwrap(), b1 * 4 + 1);
        assert!(matches!(
            kv.slot(7, 6),
            Err(KvError::PositionOutOfRange { seq: 7, .. })
        ));
        kv.resize(&[(7, 3)]).unwrap();
        assert_eq!(kv.blocks(7).unwrap().len(), 1);
        assert_eq!(kv.free_blocks(), 7);
    }

    #[test]
    fn out_of_blocks_changes_nothing_and_freed_blocks_are_reused() {
        let mut kv = PagedKvCache::new(layout(4)).unwrap();
        kv.add_sequence(1).unwrap();
        kv.add_sequence(2).unwrap();
        kv.resize(&[(1, 8)]).unwrap();
        let err = kv.resize(&[(1, 9), (2, 8)]).unwrap_err();
        assert!(
            matches!(
                err,
                KvError::OutOfBlocks {
                    seq: 1,
                    needed: 3,
                    free: 2
                }
            ),
            "{err}"
        );
        assert_eq!(kv.len(1).unwrap(), 8);
        assert_eq!(kv.len(2).unwrap(), 0);
        let held: Vec<u32> = kv.blocks(1).unwrap().to_vec();
        assert_eq!(kv.free_sequence(1).unwrap(), 2);
        kv.resize(&[(2, 16)]).unwrap();
        assert_eq!(kv.free_blocks(), 0);
        assert!(held.iter().all(|b| kv.blocks(2).unwrap().contains(b)));
    }

    #[test]
    fn unknown_and_duplicate_sequences_are_errors() {
        let mut kv = PagedKvCache::new(layout(2)).unwrap();
        assert!(matches!(
            kv.free_sequence(3),
            Err(KvError::UnknownSequence { seq: 3 })
        ));
        kv.add_sequence(3).unwrap();
        assert!(matches!(
            kv.add_sequence(3),
            Err(KvError::SequenceExists { seq: 3 })
        ));
        assert!(matches!(
            kv.resize(&[(4, 1)]),
            Err(KvError::UnknownSequence { seq: 4 })
        ));
        assert!(PagedKvCache::new(KvLayout {
            block_size: 0,
            ..layout(2)
        })
        .is_err());
    }
}
