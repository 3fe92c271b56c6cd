//! Tiny random models of every family, checked against a naive reference and against
//! themselves under batching, chunking, paging and rewinding.

mod reference;

use std::collections::HashMap;

use serde_json::{json, Value};

use super::{
    EngineError, InMemoryExperts, KvCacheConfig, LogitRows, ModelRunner, PrefetchStats, SeqChunk,
};
use crate::backend::cpu::CpuBackend;
use crate::backend::HostMatrix;
use crate::dtype::Dtype;
use crate::kv::KvError;
use crate::spec::{LayerMlp, ModelSpec, QkNorm};
use crate::weights::{DenseWeights, InMemoryTensors, WeightsError};

/// splitmix64: deterministic weights without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// A tiny model: its spec, dense tensors by hub name, and routed experts.
pub(super) struct TinyModel {
    spec: ModelSpec,
    tensors: InMemoryTensors,
    expert_dtype: Dtype,
    /// (gate, up, down) per (layer, expert), already rounded to `expert_dtype`.
    experts_as_stored: HashMap<(usize, usize), [HostMatrix; 3]>,
}

fn mixtral_config() -> Value {
    json!({
        "model_type": "mixtral", "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "num_local_experts": 4,
        "num_experts_per_tok": 2, "intermediate_size": 24, "rope_theta": 10000.0,
        "sliding_window": 6
    })
}

fn qwen2_config() -> Value {
    json!({
        "model_type": "qwen2_moe", "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 64,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "num_experts": 6,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16, "intermediate_size": 40,
        "shared_expert_intermediate_size": 24, "mlp_only_layers": [1],
        "norm_topk_prob": false, "use_sliding_window": true, "sliding_window": 5,
        "max_window_layers": 2, "rope_theta": 1e6
    })
}

fn qwen3_config() -> Value {
    json!({
        "model_type": "qwen3_moe", "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 12, "num_hidden_layers": 2, "vocab_size": 64,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "num_experts": 8,
        "num_experts_per_tok": 3, "moe_intermediate_size": 16, "attention_bias": true,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                             "original_max_position_embeddings": 32}
    })
}

fn olmoe_config() -> Value {
    json!({
        "model_type": "olmoe", "hidden_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "num_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 16, "clip_qkv": 1.5,
        "tie_word_embeddings": true, "rope_scaling": {"type": "linear", "factor": 2.0}
    })
}

fn all_families() -> Vec<(&'static str, Value)> {
    vec![
        ("mixtral", mixtral_config()),
        ("qwen2_moe", qwen2_config()),
        ("qwen3_moe", qwen3_config()),
        ("olmoe", olmoe_config()),
    ]
}

impl TinyModel {
    fn new(config: &Value, seed: u64, expert_dtype: Dtype) -> TinyModel {
        let spec = ModelSpec::from_config_str(&config.to_string(), "test config").unwrap();
        let mut rng = Rng(seed);
        let mut tensors = InMemoryTensors::new();
        let (h, v) = (spec.hidden_size, spec.vocab_size);
        let mut put = |rng: &mut Rng, name: String, shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            tensors.insert(name, shape, rng.vec(n, scale));
        };
        let norm = |rng: &mut Rng, n: usize| -> Vec<f32> {
            rng.vec(n, 0.2).into_iter().map(|x| 1.0 + x).collect()
        };
        put(&mut rng, "model.embed_tokens.weight".into(), &[v, h], 1.0);
        if !spec.tie_word_embeddings {
            put(&mut rng, "lm_head.weight".into(), &[v, h], 0.4);
        }
        let lin = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
        let (qd, kvd) = (spec.q_dim(), spec.kv_dim());
        let mut norms = Vec::new();
        norms.push(("model.norm.weight".to_string(), h));
        let mut experts_as_stored = HashMap::new();
        for (l, layer) in spec.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            norms.push((p("input_layernorm.weight"), h));
            norms.push((p("post_attention_layernorm.weight"), h));
            put(&mut rng, p("self_attn.q_proj.weight"), &[qd, h], lin(h));
            put(&mut rng, p("self_attn.k_proj.weight"), &[kvd, h], lin(h));
            put(&mut rng, p("self_attn.v_proj.weight"), &[kvd, h], lin(h));
            put(&mut rng, p("self_attn.o_proj.weight"), &[h, qd], lin(qd));
            if spec.qkv_bias {
                put(&mut rng, p("self_attn.q_proj.bias"), &[qd], 0.3);
                put(&mut rng, p("self_attn.k_proj.bias"), &[kvd], 0.3);
                put(&mut rng, p("self_attn.v_proj.bias"), &[kvd], 0.3);
            }
            if spec.o_bias {
                put(&mut rng, p("self_attn.o_proj.bias"), &[h], 0.3);
            }
            match spec.qk_norm {
                QkNorm::None => {}
                QkNorm::PerHead => {
                    norms.push((p("self_attn.q_norm.weight"), spec.head_dim));
                    norms.push((p("self_attn.k_norm.weight"), spec.head_dim));
                }
                QkNorm::Full => {
                    norms.push((p("self_attn.q_norm.weight"), qd));
                    norms.push((p("self_attn.k_norm.weight"), kvd));
                }
            }
            let mut mlp = |rng: &mut Rng, prefix: String, inter: usize| {
                put(
                    rng,
                    format!("{prefix}.gate_proj.weight"),
                    &[inter, h],
                    lin(h),
                );
                put(rng, format!("{prefix}.up_proj.weight"), &[inter, h], lin(h));
                put(
                    rng,
                    format!("{prefix}.down_proj.weight"),
                    &[h, inter],
                    lin(inter),
                );
            };
            match layer.mlp {
                LayerMlp::Dense { intermediate } => mlp(&mut rng, p("mlp"), intermediate),
                LayerMlp::Moe => {
                    let moe = p(spec.family.moe_module());
                    if let Some(shared) = spec.moe.shared_expert {
                        mlp(
                            &mut rng,
                            format!("{moe}.shared_expert"),
                            shared.intermediate,
                        );
                        put(
                            &mut rng,
                            format!("{moe}.shared_expert_gate.weight"),
                            &[1, h],
                            1.0,
                        );
                    }
                    let e = spec.moe.num_experts;
                    put(
                        &mut rng,
                        format!("{moe}.gate.weight"),
                        &[e, h],
                        2.0 * lin(h),
                    );
                    let i = spec.moe.expert_intermediate;
                    for expert in 0..e {
                        let mut m = |rows: usize, cols: usize| {
                            let raw = rng.vec(rows * cols, lin(cols));
                            let data = expert_dtype.to_f32(&expert_dtype.from_f32(&raw));
                            HostMatrix { rows, cols, data }
                        };
                        let (g, u, d) = (m(i, h), m(i, h), m(h, i));
                        experts_as_stored.insert((l, expert), [g, u, d]);
                    }
                }
            }
        }
        for (name, n) in norms {
            let w = norm(&mut rng, n);
            tensors.insert(name, &[n], w);
        }
        TinyModel {
            spec,
            tensors,
            expert_dtype,
            experts_as_stored,
        }
    }

    fn runner(&self, cache: KvCacheConfig) -> ModelRunner<CpuBackend, InMemoryExperts> {
        let mut experts = InMemoryExperts::new(self.expert_dtype);
        for (&(l, e), [g, u, d]) in &self.experts_as_stored {
            experts.insert(l, e, g, u, d);
        }
        let mut tensors = self.tensors.clone();
        let backend = CpuBackend::new();
        ModelRunner::load(self.spec.clone(), backend, &mut tensors, experts, cache).unwrap()
    }
}

fn small_cache() -> KvCacheConfig {
    KvCacheConfig {
        num_blocks: 32,
        block_size: 4,
    }
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % 64)
        .collect()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: max scaled difference {worst:e} > {tol:e}"
    );
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefill (all logits) and a few greedy decode steps, each checked against the reference.
#[test]
fn every_family_matches_the_naive_reference() {
    for (name, config) in all_families() {
        let model = TinyModel::new(&config, 7, Dtype::F32);
        let mut runner = model.runner(small_cache());
        let mut tokens = prompt(13, 1);
        runner.add_sequence(1).unwrap();
        let chunk = SeqChunk {
            logits: LogitRows::All,
            ..SeqChunk::new(1, &tokens, 0)
        };
        let got = runner.step(&[chunk]).unwrap().remove(0);
        let want: Vec<f32> = reference::logits(&model, &tokens).concat();
        assert_close(&got, &want, 1e-5, &format!("{name} prefill"));
        for _ in 0..3 {
            let vocab = model.spec.vocab_size;
            let next = argmax(&got[got.len() - vocab..]);
            tokens.push(next);
            let pos = tokens.len() - 1;
            let got = runner
                .step(&[SeqChunk::new(1, &tokens[pos..], pos)])
                .unwrap()
                .remove(0);
            let want = reference::logits(&model, &tokens).pop().unwrap();
            assert_close(&got, &want, 1e-5, &format!("{name} decode at {pos}"));
        }
        assert!(runner.experts().prepared_count() > 0);
    }
}

#[test]
fn bf16_experts_are_computed_from_their_bytes() {
    let model = TinyModel::new(&olmoe_config(), 3, Dtype::BF16);
    let mut runner = model.runner(small_cache());
    let tokens = prompt(9, 2);
    runner.add_sequence(4).unwrap();
    let got = runner.step(&[SeqChunk::new(4, &tokens, 0)]).unwrap();
    let want = reference::logits(&model, &tokens).pop().unwrap();
    assert_close(&got[0], &want, 1e-5, "bf16 experts");
}

#[test]
fn chunked_prefill_matches_one_shot() {
    for (name, config) in all_families() {
        let model = TinyModel::new(&config, 11, Dtype::F32);
        let tokens = prompt(14, 3);
        let mut one = model.runner(small_cache());
        one.add_sequence(0).unwrap();
        let whole = one.step(&[SeqChunk::new(0, &tokens, 0)]).unwrap();

        let mut chunked = model.runner(small_cache());
        chunked.add_sequence(0).unwrap();
        let mut last = Vec::new();
        for (start, end) in [(0, 5), (5, 6), (6, 14)] {
            let logits = if end == 14 {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            let c = SeqChunk {
                logits,
                ..SeqChunk::new(0, &tokens[start..end], start)
            };
            last = chunked.step(&[c]).unwrap();
            assert_eq!(last[0].is_empty(), end != 14);
        }
        assert_close(
            &last[0],
            &whole[0],
            1e-5,
            &format!("{name} chunked prefill"),
        );

        let next = [argmax(&whole[0])];
        let a = one.step(&[SeqChunk::new(0, &next, 14)]).unwrap();
        let b = chunked.step(&[SeqChunk::new(0, &next, 14)]).unwrap();
        assert_close(&b[0], &a[0], 1e-5, &format!("{name} decode after chunks"));
    }
}

/// Runs `chunks` of `seq` one step at a time on a runner of its own; returns the last logits.
fn alone(model: &TinyModel, seq: u64, chunks: &[(&[u32], usize)]) -> Vec<f32> {
    let mut r = model.runner(small_cache());
    r.add_sequence(seq).unwrap();
    let mut out = Vec::new();
    for &(t, start) in chunks {
        out = r.step(&[SeqChunk::new(seq, t, start)]).unwrap().remove(0);
    }
    out
}

#[test]
fn a_mixed_batch_gives_each_sequence_its_solo_logits() {
    for (name, config) in [("qwen2_moe", qwen2_config()), ("mixtral", mixtral_config())] {
        let model = TinyModel::new(&config, 5, Dtype::F32);
        let (a, b, c) = (prompt(9, 4), prompt(10, 5), prompt(8, 6));
        let mut r = model.runner(small_cache());
        for s in [10, 20, 30] {
            r.add_sequence(s).unwrap();
        }
        // b and c have history; then one step holds a's whole prompt, b's next six tokens
        // and c's decode token.
        r.step(&[SeqChunk::new(20, &b[..4], 0), SeqChunk::new(30, &c[..7], 0)])
            .unwrap();
        let out = r
            .step(&[
                SeqChunk::new(10, &a, 0),
                SeqChunk::new(20, &b[4..], 4),
                SeqChunk::new(30, &c[7..], 7),
            ])
            .unwrap();
        let solo_a = alone(&model, 10, &[(&a, 0)]);
        let solo_b = alone(&model, 20, &[(&b[..4], 0), (&b[4..], 4)]);
        let solo_c = alone(&model, 30, &[(&c[..7], 0), (&c[7..], 7)]);
        assert_close(
            &out[0],
            &solo_a,
            1e-5,
            &format!("{name} prefill in a batch"),
        );
        assert_close(&out[1], &solo_b, 1e-5, &format!("{name} chunk in a batch"));
        assert_close(&out[2], &solo_c, 1e-5, &format!("{name} decode in a batch"));
        assert_eq!(r.seq_len(20).unwrap(), 10);
    }
}

#[test]
fn freed_blocks_are_reused_and_exhaustion_is_an_error() {
    let model = TinyModel::new(&qwen3_config(), 9, Dtype::F32);
    let cache = KvCacheConfig {
        num_blocks: 3,
        block_size: 4,
    };
    let mut r = model.runner(cache);
    r.add_sequence(1).unwrap();
    r.add_sequence(2).unwrap();
    r.step(&[SeqChunk::new(1, &prompt(11, 1), 0)]).unwrap();
    let b = prompt(7, 2);
    let err = r.step(&[SeqChunk::new(2, &b, 0)]).unwrap_err();
    assert!(
        matches!(err, EngineError::Kv(KvError::OutOfBlocks { seq: 2, .. })),
        "{err}"
    );
    assert_eq!(r.seq_len(2).unwrap(), 0);
    r.free_sequence(1).unwrap();
    assert_eq!(r.kv_cache().free_blocks(), 3);
    let got = r.step(&[SeqChunk::new(2, &b, 0)]).unwrap();
    // The reused blocks held sequence 1's keys; none of them may leak into sequence 2.
    assert_close(
        &got[0],
        &alone(&model, 2, &[(&b, 0)]),
        1e-6,
        "reused blocks",
    );
    assert!(matches!(
        r.step(&[SeqChunk::new(1, &b, 0)]),
        Err(EngineError::UnknownSequence { seq: 1 })
    ));
}

#[test]
fn sliding_window_masks_keys_outside_it() {
    let tokens = prompt(10, 7);
    let all = |config: &Value| {
        let model = TinyModel::new(config, 13, Dtype::F32);
        let mut r = model.runner(small_cache());
        r.add_sequence(0).unwrap();
        let c = SeqChunk {
            logits: LogitRows::All,
            ..SeqChunk::new(0, &tokens, 0)
        };
        r.step(&[c]).unwrap().remove(0)
    };
    let mut windowed = mixtral_config();
    windowed["sliding_window"] = 4.into();
    let mut full = mixtral_config();
    full.as_object_mut().unwrap().remove("sliding_window");
    let (w, f) = (all(&windowed), all(&full));
    let vocab = 64;
    // Positions 0..=3 see every earlier key either way; position 9 does not.
    assert_close(&w[..4 * vocab], &f[..4 * vocab], 1e-6, "inside the window");
    let diff = w[9 * vocab..]
        .iter()
        .zip(&f[9 * vocab..])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff > 1e-3,
        "window 4 changed nothing at position 9 ({diff})"
    );
}

#[test]
fn rewinding_recomputes_from_the_cut() {
    let model = TinyModel::new(&qwen2_config(), 17, Dtype::F32);
    let first = prompt(12, 8);
    let mut r = model.runner(small_cache());
    r.add_sequence(3).unwrap();
    r.step(&[SeqChunk::new(3, &first, 0)]).unwrap();
    let tail = [1u32, 2, 3];
    let got = r.step(&[SeqChunk::new(3, &tail, 5)]).unwrap();
    assert_eq!(r.seq_len(3).unwrap(), 8);
    let mut fresh = first[..5].to_vec();
    fresh.extend_from_slice(&tail);
    let want = reference::logits(&model, &fresh).pop().unwrap();
    assert_close(&got[0], &want, 1e-5, "after rewind");
}

#[test]
fn bad_batches_are_errors_that_name_the_sequence() {
    let model = TinyModel::new(&mixtral_config(), 1, Dtype::F32);
    let mut r = model.runner(small_cache());
    r.add_sequence(5).unwrap();
    let t = [1u32, 2];
    let cases: Vec<(Vec<SeqChunk<'_>>, &str)> = vec![
        (vec![SeqChunk::new(6, &t, 0)], "sequence 6 is not known"),
        (
            vec![SeqChunk::new(5, &t, 0), SeqChunk::new(5, &t, 2)],
            "sequence 5 appears more than once",
        ),
        (vec![SeqChunk::new(5, &t, 1)], "starts at position 1"),
        (vec![SeqChunk::new(5, &[], 0)], "sequence 5: empty chunk"),
        (vec![SeqChunk::new(5, &[64], 0)], "token id 64"),
    ];
    for (batch, want) in cases {
        let e = r.step(&batch).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    assert!(r.add_sequence(5).is_err());
    assert_eq!(r.seq_len(5).unwrap(), 0);
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let model = TinyModel::new(&qwen2_config(), 2, Dtype::F32);
    let name = "model.layers.0.mlp.shared_expert_gate.weight";
    let mut t = model.tensors.clone();
    t.remove(name);
    let e = DenseWeights::load(&model.spec, &mut t).unwrap_err();
    assert!(
        matches!(&e, WeightsError::Missing { name: n } if n == name),
        "{e}"
    );

    let name = "model.layers.2.self_attn.k_proj.bias";
    let mut t = model.tensors.clone();
    t.insert(name, &[3], vec![0.0; 3]);
    let e = DenseWeights::load(&model.spec, &mut t).unwrap_err();
    assert!(e.to_string().contains(name), "{e}");

    // OLMoE ties the head to the embedding: no lm_head is read.
    let olmoe = TinyModel::new(&olmoe_config(), 2, Dtype::F32);
    let w = DenseWeights::load(&olmoe.spec, &mut olmoe.tensors.clone()).unwrap();
    assert!(w.lm_head.is_none());
}

#[test]
fn a_missing_expert_names_layer_and_expert() {
    let model = TinyModel::new(&mixtral_config(), 4, Dtype::F32);
    let dense = DenseWeights::load(&model.spec, &mut model.tensors.clone()).unwrap();
    let mut r = ModelRunner::new(
        model.spec.clone(),
        CpuBackend::new(),
        dense,
        InMemoryExperts::new(Dtype::F32),
        small_cache(),
    )
    .unwrap();
    r.add_sequence(1).unwrap();
    let e = r.step(&[SeqChunk::new(1, &[1, 2, 3], 0)]).unwrap_err();
    assert_eq!(e.failed_sequences(), Some(&[1][..]), "{e}");
    let EngineError::RoutedExpert { source, .. } = &e else {
        panic!("{e}")
    };
    assert!(
        matches!(**source, EngineError::ExpertUnavailable { layer: 0, .. }),
        "{source}"
    );
    assert_eq!(e.expert().map(|x| x.0), Some(0));
    assert_eq!(r.seq_len(1).unwrap(), 0);
}

/// Look-ahead hints change nothing in what the model computes, and the prediction counts
/// cover every MoE layer-step but the first layer's.
#[test]
fn prefetch_depth_changes_no_logits_and_counts_predictions() {
    let model = TinyModel::new(&qwen2_config(), 21, Dtype::F32);
    let tokens = prompt(6, 3);
    let run = |depth: usize| {
        let mut r = model.runner(small_cache());
        r.set_prefetch_depth(depth);
        assert_eq!(r.prefetch_depth(), depth);
        r.add_sequence(1).unwrap();
        let mut out = r.step(&[SeqChunk::new(1, &tokens, 0)]).unwrap();
        for pos in tokens.len()..tokens.len() + 3 {
            let next = [argmax(&out[0])];
            out = r.step(&[SeqChunk::new(1, &next, pos)]).unwrap();
        }
        (out, r.prefetch_stats())
    };
    let (off, none) = run(0);
    assert_eq!(none, PrefetchStats::default());
    let moe_layers = model
        .spec
        .layers
        .iter()
        .filter(|l| matches!(l.mlp, LayerMlp::Moe))
        .count() as u64;
    for depth in [1, 2] {
        let (on, stats) = run(depth);
        assert_close(&on[0], &off[0], 0.0, "logits with prefetch");
        assert_eq!(
            stats.look_ahead.layer_steps,
            4 * (moe_layers - 1),
            "{stats:?}"
        );
        assert_eq!(stats.history_only.layer_steps, 3, "{stats:?}");
        assert!(stats.look_ahead.predicted_hits <= stats.look_ahead.actual);
        assert!(stats.recall().is_some_and(|r| r > 0.0), "{stats:?}");
    }
}
