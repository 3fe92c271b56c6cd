//! In-process engine helpers shared by the tests that drive `ModelRunner` directly: greedy
//! picking, log-softmax, and a pack's routed experts held in memory.

use std::path::Path;

use tileflow_engine::backend::{ExpertBytes, ExpertRef};
use tileflow_engine::forward::EngineError;
use tileflow_engine::pack::manifest::{Manifest, EXPERTS_FILE};

/// Index of the largest value (the first on ties), as greedy decoding picks it.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `log(softmax(logits))`, with the sum in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&l| l - lse).collect()
}

/// A pack's whole `experts.tiles` in memory with its manifest: the ground truth that test
/// `ExpertProvider`s hand out.
#[derive(Debug)]
pub struct PackExperts {
    /// The pack's manifest.
    pub manifest: Manifest,
    /// The bytes of `experts.tiles`.
    pub tiles: Vec<u8>,
}

impl PackExperts {
    /// Reads `experts.tiles` of the pack in `dir`.
    pub fn read(dir: &Path, manifest: Manifest) -> std::io::Result<PackExperts> {
        let tiles = std::fs::read(dir.join(EXPERTS_FILE))?;
        Ok(PackExperts { manifest, tiles })
    }

    /// The weights of (layer, expert), as a provider's `expert()` returns them.
    pub fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError> {
        let x =
            self.manifest
                .extent(layer, expert)
                .ok_or_else(|| EngineError::ExpertUnavailable {
                    layer,
                    expert,
                    reason: "not in the manifest".into(),
                })?;
        let start = x.offset as usize;
        Ok(ExpertRef {
            bytes: ExpertBytes::Host(&self.tiles[start..start + x.bytes as usize]),
            dtype: self.manifest.expert_dtype,
            gate: x.gate,
            up: x.up,
            down: x.down,
        })
    }
}

impl tileflow_engine::forward::ExpertProvider for PackExperts {
    fn prepare(&mut self, _layer: usize, _experts: &[usize]) -> Result<(), EngineError> {
        Ok(())
    }

    fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError> {
        PackExperts::expert(self, layer, expert)
    }
}
