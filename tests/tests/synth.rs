//! `tilectl model synth`: the hub checkpoint and the direct pack agree byte for byte, seeds
//! decide the bytes, every preset has its real model's shape, and `--route-skew` gives the
//! expert popularity it promises when the synthesized model actually runs.

use std::fs;
use std::path::Path;

use tileflow_engine::backend::cpu::CpuBackend;
use tileflow_engine::backend::ExpertRef;
use tileflow_engine::forward::{
    EngineError, ExpertProvider, KvCacheConfig, LogitRows, ModelRunner, SeqChunk,
};
use tileflow_engine::model::DenseLoader;
use tileflow_engine::pack::manifest::{DENSE_FILE, EXPERTS_FILE};
use tileflow_engine::pack::write::PackSource;
use tileflow_engine::spec::{Family, LayerMlp};
use tileflow_engine::store::Store;
use tileflow_engine::synth::{Synth, PRESETS};
use tileflow_tests::engine_help::PackExperts;
use tileflow_tests::{tilectl, tilectl_ok};

/// The two files of a stored pack that hold weights.
fn pack_bytes(state: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = state.join("models").join(name);
    (
        fs::read(dir.join(EXPERTS_FILE)).unwrap(),
        fs::read(dir.join(DENSE_FILE)).unwrap(),
    )
}

#[test]
fn checkpoint_then_import_is_the_direct_pack_and_the_seed_decides_the_bytes() {
    let state = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let ckpt_dir = ckpt.path().join("tiny-ckpt");
    let ckpt_arg = ckpt_dir.to_str().unwrap();
    let s = state.path();
    let synth = |extra: &[&str]| {
        let mut args = vec!["model", "synth", "--preset", "tiny"];
        args.extend_from_slice(extra);
        tilectl_ok(s, &args);
    };
    synth(&["--out", ckpt_arg, "--seed", "11", "--route-skew", "0.8"]);
    tilectl_ok(s, &["model", "import", ckpt_arg, "--name", "imported"]);
    synth(&["--name", "direct", "--seed", "11", "--route-skew", "0.8"]);
    synth(&["--name", "again", "--seed", "11", "--route-skew", "0.8"]);
    synth(&["--name", "other", "--seed", "12", "--route-skew", "0.8"]);

    let (imported_tiles, imported_dense) = pack_bytes(s, "imported");
    let (direct_tiles, direct_dense) = pack_bytes(s, "direct");
    let (again_tiles, again_dense) = pack_bytes(s, "again");
    let (other_tiles, other_dense) = pack_bytes(s, "other");
    assert!(!direct_tiles.is_empty() && !direct_dense.is_empty());
    assert!(
        imported_tiles == direct_tiles,
        "experts.tiles: import of --out differs from --name"
    );
    assert!(
        imported_dense == direct_dense,
        "dense.safetensors: import of --out differs from --name"
    );
    assert!(
        again_tiles == direct_tiles,
        "experts.tiles: same seed, different bytes"
    );
    assert!(
        again_dense == direct_dense,
        "dense.safetensors: same seed, different bytes"
    );
    assert!(
        other_tiles != direct_tiles,
        "experts.tiles: seeds 11 and 12 give the same bytes"
    );
    assert!(
        other_dense != direct_dense,
        "dense.safetensors: seeds 11 and 12 give the same bytes"
    );
    assert_eq!(other_tiles.len(), direct_tiles.len());

    let manifest = |name: &str| Store::new(s).get(name).unwrap().manifest;
    assert_eq!(manifest("imported").experts, manifest("direct").experts);
    assert_eq!(manifest("imported").spec, manifest("direct").spec);

    // Not an empty directory, not both destinations, not an unknown preset.
    let refused = tilectl(
        s,
        &["model", "synth", "--preset", "tiny", "--out", ckpt_arg],
    );
    assert!(
        !refused.ok && refused.stderr.contains("not empty"),
        "{refused:?}"
    );
    let both = tilectl(
        s,
        &[
            "model", "synth", "--preset", "tiny", "--out", "x", "--name", "y",
        ],
    );
    assert!(!both.ok, "{both:?}");
    let unknown = tilectl(s, &["model", "synth", "--preset", "gpt-5", "--name", "z"]);
    assert!(
        !unknown.ok && unknown.stderr.contains("olmoe-1b-7b"),
        "{unknown:?}"
    );
}

/// The key numbers of each real model's published config.json.
#[derive(Debug, PartialEq)]
struct Published {
    family: Family,
    layers: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    expert_intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    shared_intermediate: Option<usize>,
    norm_topk_prob: bool,
}

fn published(preset: &str) -> Published {
    match preset {
        "tiny" => Published {
            family: Family::Olmoe,
            layers: 4,
            experts: 16,
            top_k: 4,
            hidden: 256,
            expert_intermediate: 128,
            heads: 8,
            kv_heads: 4,
            head_dim: 32,
            vocab: 2048,
            shared_intermediate: None,
            norm_topk_prob: false,
        },
        // allenai/OLMoE-1B-7B-0924
        "olmoe-1b-7b" => Published {
            family: Family::Olmoe,
            layers: 16,
            experts: 64,
            top_k: 8,
            hidden: 2048,
            expert_intermediate: 1024,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            vocab: 50304,
            shared_intermediate: None,
            norm_topk_prob: false,
        },
        // Qwen/Qwen3-30B-A3B
        "qwen3-30b-a3b" => Published {
            family: Family::Qwen3Moe,
            layers: 48,
            experts: 128,
            top_k: 8,
            hidden: 2048,
            expert_intermediate: 768,
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            vocab: 151_936,
            shared_intermediate: None,
            norm_topk_prob: true,
        },
        // Qwen/Qwen1.5-MoE-A2.7B
        "qwen2-moe-a2.7b" => Published {
            family: Family::Qwen2Moe,
            layers: 24,
            experts: 60,
            top_k: 4,
            hidden: 2048,
            expert_intermediate: 1408,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            vocab: 151_936,
            shared_intermediate: Some(5632),
            norm_topk_prob: false,
        },
        // mistralai/Mixtral-8x7B-v0.1
        "mixtral-8x7b" => Published {
            family: Family::Mixtral,
            layers: 32,
            experts: 8,
            top_k: 2,
            hidden: 4096,
            expert_intermediate: 14336,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            vocab: 32000,
            shared_intermediate: None,
            norm_topk_prob: true,
        },
        other => panic!("no published numbers for preset {other}"),
    }
}

#[test]
fn every_preset_has_its_published_shape() {
    for preset in PRESETS {
        let want = published(preset);
        let synth = Synth::new(preset, 0, 0.0).unwrap();
        let spec = synth.spec();
        let got = Published {
            family: spec.family,
            layers: spec.num_layers(),
            experts: spec.moe.num_experts,
            top_k: spec.moe.top_k,
            hidden: spec.hidden_size,
            expert_intermediate: spec.moe.expert_intermediate,
            heads: spec.num_heads,
            kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            vocab: spec.vocab_size,
            shared_intermediate: spec.moe.shared_expert.map(|s| s.intermediate),
            norm_topk_prob: spec.moe.norm_topk_prob,
        };
        assert_eq!(got, want, "preset {preset}");
        assert!(
            spec.layers.iter().all(|l| l.mlp == LayerMlp::Moe),
            "{preset}: every layer is MoE"
        );
        assert_eq!(spec.moe_layers().count(), want.layers, "{preset}");
        let e = spec.eos_token_ids[0] as usize;
        assert!(
            e < spec.vocab_size,
            "{preset}: eos {e} outside the vocabulary"
        );

        // Routed-expert bytes in bf16: layers × experts × 3 projections × hidden × intermediate × 2.
        let expert_bytes: u64 = (want.layers * want.experts * 3 * want.hidden) as u64
            * want.expert_intermediate as u64
            * 2;
        let synth_bytes = (spec.moe_layers().count() * spec.moe.num_experts) as u64
            * spec.expert_elements() as u64
            * synth.expert_dtype().size() as u64;
        assert_eq!(synth_bytes, expert_bytes, "{preset}: routed expert bytes");
    }
    // The numbers the issue quotes, spelled out.
    let olmoe = 16u64 * 64 * 3 * 2048 * 1024 * 2;
    assert_eq!(olmoe, 12_884_901_888);
}

/// A pack's routed experts held in memory, counting how often the router picks each.
#[derive(Debug)]
struct CountingExperts {
    pack: PackExperts,
    /// Picks per layer per expert.
    picks: Vec<Vec<u64>>,
}

impl ExpertProvider for CountingExperts {
    fn prepare(&mut self, layer: usize, experts: &[usize]) -> Result<(), EngineError> {
        for &e in experts {
            self.picks[layer][e] += 1;
        }
        Ok(())
    }

    fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError> {
        self.pack.expert(layer, expert)
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs `prompts` random-token prompts of `len` tokens through a stored model, one token per
/// step (so each `prepare` is exactly one token's top-k), and returns the picks per layer
/// per expert.
fn route_counts(state: &Path, name: &str, prompts: usize, len: usize) -> Vec<Vec<u64>> {
    let stored = Store::new(state).get(name).unwrap();
    let manifest = stored.manifest;
    let spec = manifest.spec.clone();
    let experts = CountingExperts {
        picks: vec![vec![0; spec.moe.num_experts]; spec.num_layers()],
        pack: PackExperts::read(&stored.dir, manifest).unwrap(),
    };
    let mut dense = DenseLoader::open(&stored.dir.join(DENSE_FILE)).unwrap();
    let vocab = spec.eos_token_ids[0] as u64; // the synthetic tokenizer's ordinary tokens
    let mut runner = ModelRunner::load(
        spec,
        CpuBackend::new(),
        &mut dense,
        experts,
        KvCacheConfig::default(),
    )
    .unwrap();
    let mut rng = 0x5EED_u64;
    for p in 0..prompts as u64 {
        runner.add_sequence(p).unwrap();
        for pos in 0..len {
            rng = splitmix(rng);
            let token = [(rng % vocab) as u32];
            let chunk = SeqChunk {
                seq: p,
                tokens: &token,
                start_pos: pos,
                logits: LogitRows::None,
            };
            runner.step(&[chunk]).unwrap();
        }
        runner.free_sequence(p).unwrap();
    }
    runner.experts().picks.clone()
}

/// Least-squares slope of ln(picks) against ln(rank), ranks by descending picks.
fn rank_frequency_slope(picks: &[u64]) -> f64 {
    let mut sorted = picks.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let pts: Vec<(f64, f64)> = sorted
        .iter()
        .enumerate()
        .map(|(r, &c)| (((r + 1) as f64).ln(), (c.max(1) as f64).ln()))
        .collect();
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx
}

/// Most picks over the median picks of a layer.
fn top_over_median(picks: &[u64]) -> f64 {
    let mut sorted = picks.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let median = (sorted[(n - 1) / 2] + sorted[n / 2]) as f64 / 2.0;
    sorted[n - 1] as f64 / median.max(1.0)
}

#[test]
fn route_skew_shapes_expert_popularity_when_the_model_runs() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    for (name, skew) in [("skew0", "0"), ("skew1", "1.0")] {
        tilectl_ok(
            s,
            &[
                "model",
                "synth",
                "--preset",
                "tiny",
                "--name",
                name,
                "--seed",
                "3",
                "--route-skew",
                skew,
            ],
        );
    }
    let (prompts, len) = (96, 24);
    let uniform = route_counts(s, "skew0", prompts, len);
    let zipf = route_counts(s, "skew1", prompts, len);
    for (layer, (u, z)) in uniform.iter().zip(&zipf).enumerate() {
        let (su, sz) = (rank_frequency_slope(u), rank_frequency_slope(z));
        let (ru, rz) = (top_over_median(u), top_over_median(z));
        eprintln!("layer {layer}: skew 0 slope {su:.3} top/median {ru:.2} {u:?}");
        eprintln!("layer {layer}: skew 1 slope {sz:.3} top/median {rz:.2} {z:?}");
        assert_eq!(u.iter().sum::<u64>(), (prompts * len * 4) as u64);
        assert!(
            (sz + 1.0).abs() <= 0.35,
            "layer {layer}: --route-skew 1 gives rank-frequency slope {sz:.3}, want -1 ± 0.35: {z:?}"
        );
        assert!(
            su.abs() <= 0.15 && ru <= 1.3,
            "layer {layer}: --route-skew 0 gives slope {su:.3} and top/median {ru:.2}, want near 0 and 1: {u:?}"
        );
    }
}
