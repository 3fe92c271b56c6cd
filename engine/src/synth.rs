//! Random-weight models of real shapes, for the demo, tests and benchmarks.
//!
//! A preset is a hub `config.json`; weights are drawn from a counter-based generator so any
//! tensor (or one expert of it) can be produced alone, in parallel, and identically for a seed,
//! whether written as a hub checkpoint or straight into a tile pack.

use std::path::Path;

use serde_json::{json, Value};

use crate::dtype::Dtype;
use crate::pack::manifest::{Projection, SourceDigest};
use crate::pack::names::{dense_tensors, expert_tensor, projection_shape};
use crate::pack::write::{PackError, PackSource, Progress};
use crate::safetensors_io::SafetensorsWriter;
use crate::spec::ModelSpec;

/// The presets `tilectl model synth --preset` knows.
pub const PRESETS: [&str; 5] = [
    "tiny",
    "olmoe-1b-7b",
    "qwen3-30b-a3b",
    "qwen2-moe-a2.7b",
    "mixtral-8x7b",
];

/// The config.json of a preset (real shapes; `tiny` is ours).
pub fn preset_config(preset: &str) -> Option<Value> {
    let v = match preset {
        "tiny" => json!({
            "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
            "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 4, "intermediate_size": 128, "num_experts": 16,
            "num_experts_per_tok": 4, "vocab_size": 2048, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "norm_topk_prob": false,
            "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "bfloat16",
        }),
        // allenai/OLMoE-1B-7B-0924
        "olmoe-1b-7b" => json!({
            "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
            "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 1024, "num_experts": 64,
            "num_experts_per_tok": 8, "vocab_size": 50304, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "norm_topk_prob": false,
            "clip_qkv": null, "tie_word_embeddings": false, "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }),
        // Qwen/Qwen3-30B-A3B
        "qwen3-30b-a3b" => json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
            "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
            "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "norm_topk_prob": true, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "attention_bias": false, "use_sliding_window": false,
            "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "bfloat16",
        }),
        // Qwen/Qwen1.5-MoE-A2.7B
        "qwen2-moe-a2.7b" => json!({
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 5632, "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
            "vocab_size": 151936, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "norm_topk_prob": false, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": false, "tie_word_embeddings": false,
            "hidden_act": "silu", "torch_dtype": "bfloat16",
        }),
        // mistralai/Mixtral-8x7B-v0.1
        "mixtral-8x7b" => json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8,
            "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": null,
            "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "bfloat16",
        }),
        _ => return None,
    };
    Some(v)
}

/// Tokenizer size of a synthesized model: the model's vocabulary, capped where real
/// tokenizers stop (the embedding may be padded past the tokenizer).
fn tokenizer_vocab(spec: &ModelSpec) -> usize {
    spec.vocab_size.min(151_646)
}

/// A synthesized model.
#[derive(Debug)]
pub struct Synth {
    preset: String,
    config: Value,
    spec: ModelSpec,
    seed: u64,
    route_skew: f64,
    dtype: Dtype,
    /// Router row scales by popularity rank, calibrated once.
    rank_scales: std::sync::OnceLock<Vec<f32>>,
}

impl Synth {
    /// A preset with a seed and a router skew (Zipf exponent of expert popularity, 0 = uniform).
    pub fn new(preset: &str, seed: u64, route_skew: f64) -> Result<Synth, PackError> {
        let mut config = preset_config(preset).ok_or_else(|| {
            PackError::Source(format!(
                "unknown preset {preset:?}; presets are {}",
                PRESETS.join(", ")
            ))
        })?;
        if !(0.0..=8.0).contains(&route_skew) {
            return Err(PackError::Source(format!(
                "--route-skew {route_skew} is outside 0..=8"
            )));
        }
        config["eos_token_id"] = json!(0);
        let spec = ModelSpec::from_config_str(&config.to_string(), &format!("preset {preset}"))
            .map_err(|e| PackError::Other {
                what: format!("preset {preset}"),
                source: Box::new(e),
            })?;
        // The synthetic tokenizer puts its three special tokens last; eos is <|endoftext|>.
        let eos = tokenizer_vocab(&spec) - 3;
        config["eos_token_id"] = json!(eos);
        config["bos_token_id"] = Value::Null;
        let spec = ModelSpec {
            eos_token_ids: vec![eos as u32],
            ..spec
        };
        Ok(Synth {
            preset: preset.to_string(),
            config,
            spec,
            seed,
            route_skew,
            dtype: Dtype::BF16,
            rank_scales: std::sync::OnceLock::new(),
        })
    }

    /// Writes a hub-layout checkpoint (sharded safetensors with an index, config.json,
    /// tokenizer) into `dir`.
    pub fn write_checkpoint(
        &self,
        dir: &Path,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<(), PackError> {
        const SHARD_BYTES: u64 = 4 << 30;
        let werr = |path: &Path| {
            let path = path.display().to_string();
            move |source| PackError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(werr(dir))?;
        let mut all: Vec<(String, Dtype, Vec<usize>)> = self.dense_entries();
        for layer in self.spec.moe_layers() {
            for expert in 0..self.spec.moe.num_experts {
                for proj in Projection::ALL {
                    let shape = projection_shape(&self.spec, proj).to_vec();
                    all.push((
                        expert_tensor(&self.spec, layer, expert, proj),
                        self.dtype,
                        shape,
                    ));
                }
            }
        }
        let bytes_of =
            |e: &(String, Dtype, Vec<usize>)| (e.2.iter().product::<usize>() * e.1.size()) as u64;
        let total: u64 = all.iter().map(bytes_of).sum();
        let mut shards: Vec<Vec<(String, Dtype, Vec<usize>)>> = vec![Vec::new()];
        let mut in_shard = 0u64;
        for e in all {
            if in_shard > 0 && in_shard + bytes_of(&e) > SHARD_BYTES {
                shards.push(Vec::new());
                in_shard = 0;
            }
            in_shard += bytes_of(&e);
            if let Some(s) = shards.last_mut() {
                s.push(e);
            }
        }
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut done = 0u64;
        for (k, shard) in shards.iter().enumerate() {
            let file = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", k + 1)
            };
            let mut w = SafetensorsWriter::create(dir.join(&file), shard)?;
            for (name, _, _) in shard {
                let bytes = self.tensor_bytes(name)?;
                w.write_tensor(name, &bytes)?;
                done += bytes.len() as u64;
                progress(Progress { done, total });
                weight_map.insert(name.clone(), Value::String(file.clone()));
            }
            w.finish()?;
        }
        if n > 1 {
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = dir.join("model.safetensors.index.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&index).unwrap_or_default())
                .map_err(werr(&path))?;
        }
        self.write_aux_files(dir)
    }

    /// Bytes of any tensor by hub name (dense or one expert projection).
    fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>, PackError> {
        if let Some((layer, expert, proj)) = self.parse_expert_name(name) {
            let [r, c] = projection_shape(&self.spec, proj);
            let mut out = vec![0u8; r * c * self.dtype.size()];
            self.read_expert(layer, expert, proj, &mut out)?;
            return Ok(out);
        }
        self.read_dense(name)
    }

    fn parse_expert_name(&self, name: &str) -> Option<(usize, usize, Projection)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let rest = rest
            .strip_prefix(self.spec.family.moe_module())?
            .strip_prefix(".experts.")?;
        let (expert, _) = rest.split_once('.')?;
        let expert: usize = expert.parse().ok()?;
        Projection::ALL
            .into_iter()
            .find(|&p| expert_tensor(&self.spec, layer, expert, p) == name)
            .map(|p| (layer, expert, p))
    }

    /// The stream id of a tensor: a hash of its name, so every tensor has its own stream.
    fn stream(&self, name: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), self.seed)
    }

    /// Uniform values in [-a, a] for `n` elements of stream `stream`, encoded in `dtype`.
    fn fill(&self, stream: u64, a: f32, out: &mut [u8]) {
        let size = self.dtype.size();
        let mut vals = [0f32; 1024];
        for (block, chunk) in out.chunks_mut(1024 * size).enumerate() {
            let mut s = splitmix(stream ^ (block as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let n = chunk.len() / size;
            for v in vals.iter_mut().take(n) {
                s = splitmix(s);
                let unit = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                *v = (2.0 * unit - 1.0) * a;
            }
            encode(self.dtype, &vals[..n], chunk);
        }
    }

    /// Per-expert scale of layer `layer`'s router rows.
    ///
    /// A router row with a larger norm spreads that expert's logits wider, so it wins top-k more
    /// often. The scales are calibrated (Monte Carlo over isotropic hidden states, which is what
    /// RMSNorm'd random activations look like) so that the probability of expert e being picked
    /// follows Zipf: ∝ 1 / rank(e)^route_skew, with ranks shuffled per layer.
    fn router_scales(&self, layer: usize) -> Vec<f32> {
        let (e, k) = (self.spec.moe.num_experts, self.spec.moe.top_k);
        let mut rank: Vec<usize> = (0..e).collect();
        let mut s = splitmix(self.seed ^ 0x5EED ^ (layer as u64) << 32);
        for i in (1..e).rev() {
            s = splitmix(s);
            rank.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let by_rank = self.rank_scales.get_or_init(|| {
            let weights: Vec<f64> = (0..e)
                .map(|r| (1.0 / (r as f64 + 1.0)).powf(self.route_skew))
                .collect();
            let total: f64 = weights.iter().sum();
            let target: Vec<f64> = weights
                .iter()
                .map(|w| (w / total * k as f64).min(0.995))
                .collect();
            zipf_scales(&target, k, self.seed)
        });
        rank.iter().map(|&r| by_rank[r]).collect()
    }
}

/// Scales σ_e such that expert e is in the top-k of independent N(0, σ_e²) logits with
/// probability `target[e]` (fixed-point iteration on Monte Carlo frequencies).
fn zipf_scales(target: &[f64], k: usize, seed: u64) -> Vec<f32> {
    const SAMPLES: usize = 4000;
    let e = target.len();
    let mut sigma = vec![1f64; e];
    let mut z = vec![0f64; e];
    let mut order: Vec<usize> = (0..e).collect();
    for round in 0..40u64 {
        let mut hits = vec![0usize; e];
        let mut s = splitmix(seed ^ round);
        for _ in 0..SAMPLES {
            for (zi, sg) in z.iter_mut().zip(&sigma) {
                // Box-Muller from two uniforms.
                s = splitmix(s);
                let u1 = ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                s = splitmix(s);
                let u2 = (s >> 11) as f64 / (1u64 << 53) as f64;
                *zi = sg * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            }
            order.select_nth_unstable_by(k - 1, |&a, &b| z[b].total_cmp(&z[a]));
            for &i in &order[..k] {
                hits[i] += 1;
            }
        }
        for i in 0..e {
            let freq = (hits[i] as f64 + 0.5) / SAMPLES as f64;
            sigma[i] *= (target[i] / freq).powf(0.5);
        }
        let mean_log = sigma.iter().map(|v| v.ln()).sum::<f64>() / e as f64;
        sigma.iter_mut().for_each(|v| *v /= mean_log.exp());
    }
    sigma.into_iter().map(|v| v as f32).collect()
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn encode(dtype: Dtype, vals: &[f32], out: &mut [u8]) {
    let size = dtype.size();
    for (v, o) in vals.iter().zip(out.chunks_exact_mut(size)) {
        match dtype {
            Dtype::F32 => o.copy_from_slice(&v.to_le_bytes()),
            Dtype::F16 => o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes()),
            Dtype::BF16 => o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes()),
        }
    }
}

impl PackSource for Synth {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn expert_dtype(&self) -> Dtype {
        self.dtype
    }

    fn dense_entries(&self) -> Vec<(String, Dtype, Vec<usize>)> {
        dense_tensors(&self.spec)
            .into_iter()
            .map(|(n, s)| (n, self.dtype, s))
            .collect()
    }

    fn read_dense(&self, name: &str) -> Result<Vec<u8>, PackError> {
        let (_, shape) = dense_tensors(&self.spec)
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| {
                PackError::Source(format!("preset {} has no tensor {name}", self.preset))
            })?;
        let n: usize = shape.iter().product();
        let size = self.dtype.size();
        if name.ends_with("norm.weight") {
            // Norm gains near one, so activations keep their scale through the layers.
            let mut out = vec![0u8; n * size];
            self.fill(self.stream(name), 0.1, &mut out);
            let vals: Vec<f32> = self
                .dtype
                .to_f32(&out)
                .into_iter()
                .map(|v| 1.0 + v)
                .collect();
            return Ok(self.dtype.from_f32(&vals));
        }
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let mut out = vec![0u8; n * size];
        if name == "model.embed_tokens.weight" {
            self.fill(self.stream(name), 1.0, &mut out);
        } else if name.ends_with(".gate.weight") && self.route_skew > 0.0 {
            let layer = name
                .split('.')
                .nth(2)
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let scales = self.router_scales(layer);
            let row = self.spec.hidden_size * size;
            for (e, chunk) in out.chunks_mut(row).enumerate() {
                let a = 3f32.sqrt() / fan_in.sqrt() * 4.0 * scales[e];
                self.fill(self.stream(name) ^ e as u64, a, chunk);
            }
        } else if name.ends_with(".bias") {
            self.fill(self.stream(name), 0.02, &mut out);
        } else {
            // Uniform with std 1/sqrt(fan_in); routers a little sharper so routing is decisive.
            let sharp = if name.ends_with(".gate.weight") {
                4.0
            } else {
                1.0
            };
            self.fill(
                self.stream(name),
                3f32.sqrt() / fan_in.sqrt() * sharp,
                &mut out,
            );
        }
        Ok(out)
    }

    fn read_expert(
        &self,
        layer: usize,
        expert: usize,
        proj: Projection,
        out: &mut [u8],
    ) -> Result<(), PackError> {
        let [_, cols] = projection_shape(&self.spec, proj);
        let name = expert_tensor(&self.spec, layer, expert, proj);
        self.fill(self.stream(&name), 3f32.sqrt() / (cols as f32).sqrt(), out);
        Ok(())
    }

    fn write_aux_files(&self, dir: &Path) -> Result<(), PackError> {
        let path = dir.join("config.json");
        let text = serde_json::to_vec_pretty(&self.config).unwrap_or_default();
        std::fs::write(&path, text).map_err(|source| PackError::Write {
            path: path.display().to_string(),
            source,
        })?;
        crate::synth_tokenizer::write_synthetic_tokenizer(dir, tokenizer_vocab(&self.spec)).map_err(
            |e| PackError::Other {
                what: format!("cannot write the tokenizer into {}", dir.display()),
                source: Box::new(e),
            },
        )
    }

    fn describe(&self) -> (String, Vec<SourceDigest>) {
        (
            format!(
                "synth:{}:seed={}:route_skew={}",
                self.preset, self.seed, self.route_skew
            ),
            Vec::new(),
        )
    }
}
