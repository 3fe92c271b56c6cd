//! Random-weight models of real shapes, for the demo, tests and benchmarks.
//!
//! A preset is a hub `config.json`; weights are drawn from a counter-based generator so any
//! tensor (or one expert of it) can be produced alone, in parallel, and identically for a seed,
//! whether written as a hub checkpoint or straight into a tile pack. Routers are built so that
//! expert popularity per layer follows Zipf's law with a chosen exponent (the `route` module).

mod route;

use std::path::Path;

use rayon::prelude::*;
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
    /// Router biases by popularity rank, calibrated once.
    route_bias: std::sync::OnceLock<Vec<f64>>,
}

impl Synth {
    /// A preset with a seed and a router skew (Zipf exponent of expert popularity, 0 = uniform).
    pub fn new(preset: &str, seed: u64, route_skew: f64) -> Result<Synth, PackError> {
        Synth::with_layers(preset, None, seed, route_skew)
    }

    /// As [`Synth::new`], keeping only the first `layers` decoder layers when given (a preset
    /// too large for the disk at hand; the shapes of every layer stay the preset's).
    pub fn with_layers(
        preset: &str,
        layers: Option<usize>,
        seed: u64,
        route_skew: f64,
    ) -> Result<Synth, PackError> {
        let mut config = preset_config(preset).ok_or_else(|| {
            PackError::Source(format!(
                "unknown preset {preset:?}; presets are {}",
                PRESETS.join(", ")
            ))
        })?;
        if let Some(n) = layers {
            let all = config["num_hidden_layers"].as_u64().unwrap_or(0);
            if n == 0 || n as u64 > all {
                return Err(PackError::Source(format!(
                    "--layers {n}: preset {preset} has {all} layers"
                )));
            }
            config["num_hidden_layers"] = json!(n);
        }
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
        if spec.hidden_size <= route::reserved_channels(&spec) {
            return Err(PackError::Source(format!(
                "preset {preset}: hidden size {} leaves no room for {} routing channels",
                spec.hidden_size,
                route::reserved_channels(&spec)
            )));
        }
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
            route_bias: std::sync::OnceLock::new(),
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

    /// Uniform values in [-a, a] for stream `stream`, encoded in the model's dtype.
    ///
    /// Each block of [`BLOCK`] elements is drawn from its own counter, so large tensors are
    /// generated in parallel pieces with the same bytes as in one piece.
    fn fill(&self, stream: u64, a: f32, out: &mut [u8]) {
        let piece = BLOCK * PIECE_BLOCKS * self.dtype.size();
        if out.len() <= piece {
            fill_blocks(self.dtype, stream, a, 0, out);
            return;
        }
        out.par_chunks_mut(piece)
            .enumerate()
            .for_each(|(i, part)| fill_blocks(self.dtype, stream, a, i * PIECE_BLOCKS, part));
    }

    /// Zeroes the rows of the routing channels in a matrix whose rows are hidden channels
    /// (`o_proj`, down projections, `o_proj` bias): nothing may write to them.
    fn clear_routing_rows(&self, cols: usize, out: &mut [u8]) {
        let n = route::reserved_channels(&self.spec) * cols * self.dtype.size();
        out[..n].fill(0);
    }

    /// The embedding: uniform values, with the routing channels of each row set to the bias
    /// constant and the token's Gaussian code.
    fn embedding(&self, name: &str, out: &mut [u8]) {
        self.fill(self.stream(name), 1.0, out);
        let (e, size) = (self.spec.moe.num_experts, self.dtype.size());
        let stream = self.stream(name) ^ 0xC0DE;
        let row_bytes = self.spec.hidden_size * size;
        out.par_chunks_mut(row_bytes)
            .enumerate()
            .for_each(|(token, row)| {
                let mut vals = Vec::with_capacity(e + 1);
                vals.push(route::BIAS_VALUE);
                vals.extend((0..e).map(|c| route::code_value(stream, token, c, e)));
                encode(self.dtype, &vals, &mut row[..(e + 1) * size]);
            });
    }

    /// Layer `layer`'s router (`[experts, hidden]`, f32): see [`route`].
    fn router(&self, layer: usize) -> Result<Vec<f32>, PackError> {
        let (e, k) = (self.spec.moe.num_experts, self.spec.moe.top_k);
        let bias = self.route_bias.get_or_init(|| {
            let target = route::zipf_targets(e, k, self.route_skew);
            route::zipf_biases(&target, k, self.seed ^ 0x2AB1)
        });
        let layer_seed = self.seed ^ ((layer as u64) << 32);
        let rank = route::permutation(e, splitmix(layer_seed ^ 0x5EED));
        let mix = route::orthogonal(e, splitmix(layer_seed ^ 0xC0DE));
        let norm = format!("model.layers.{layer}.post_attention_layernorm.weight");
        let gains = self.dtype.to_f32(&self.read_dense(&norm)?);
        Ok(route::router_rows(
            self.spec.hidden_size,
            bias,
            &rank,
            &mix,
            &gains,
        ))
    }
}

/// Elements per generator block.
const BLOCK: usize = 1024;
/// Blocks per parallel piece of a large tensor.
const PIECE_BLOCKS: usize = 256;

/// Fills `out` with uniform values in [-a, a] from blocks `first_block..` of `stream`.
///
/// Element j of block b is a 32-bit hash of (key(stream, b) + j·φ): no element depends on
/// another, so the loop vectorises (generation must outrun the disk).
fn fill_blocks(dtype: Dtype, stream: u64, a: f32, first_block: usize, out: &mut [u8]) {
    let size = dtype.size();
    let step = 2.0 * a / (1u32 << 24) as f32;
    let mut vals = [0f32; BLOCK];
    let mut bits = [0u16; BLOCK];
    for (i, chunk) in out.chunks_mut(BLOCK * size).enumerate() {
        let block = (first_block + i) as u64;
        let key = splitmix(stream ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as u32;
        let n = chunk.len() / size;
        for (j, v) in vals[..n].iter_mut().enumerate() {
            let h = hash32(key.wrapping_add((j as u32).wrapping_mul(0x9E37_79B9)));
            *v = (h >> 8) as f32 * step - a;
        }
        if dtype == Dtype::BF16 {
            for (b, v) in bits[..n].iter_mut().zip(&vals[..n]) {
                *b = bf16_bits(*v);
            }
            for (o, b) in chunk.chunks_exact_mut(2).zip(&bits[..n]) {
                o.copy_from_slice(&b.to_le_bytes());
            }
        } else {
            encode(dtype, &vals[..n], chunk);
        }
    }
}

/// bf16 bits of a finite f32, rounded to nearest even (as `half::bf16::from_f32`).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// A 32-bit bijective mixer (Wellons' lowbias32).
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
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
        let cols = *shape.last().unwrap_or(&1);
        let fan_in = cols as f32;
        let mut out = vec![0u8; n * size];
        if name == "model.embed_tokens.weight" {
            self.embedding(name, &mut out);
        } else if name.ends_with(".gate.weight") {
            let layer = name
                .split('.')
                .nth(2)
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| PackError::Source(format!("{name} names no layer")))?;
            return Ok(self.dtype.from_f32(&self.router(layer)?));
        } else if name.ends_with(".bias") {
            self.fill(self.stream(name), 0.02, &mut out);
        } else {
            // Uniform with std 1/sqrt(fan_in).
            self.fill(self.stream(name), 3f32.sqrt() / fan_in.sqrt(), &mut out);
        }
        if name.ends_with(".o_proj.weight") || name.ends_with(".down_proj.weight") {
            self.clear_routing_rows(cols, &mut out);
        } else if name.ends_with(".o_proj.bias") {
            self.clear_routing_rows(1, &mut out);
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
        if proj == Projection::Down {
            self.clear_routing_rows(cols, out);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_can_be_dropped_but_not_added() {
        let s = Synth::with_layers("tiny", Some(2), 0, 0.0).unwrap();
        assert_eq!(s.spec.num_layers(), 2);
        assert_eq!(s.config["num_hidden_layers"], 2);
        let e = Synth::with_layers("tiny", Some(5), 0, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--layers 5: preset tiny has 4 layers"), "{e}");
        assert!(Synth::with_layers("tiny", Some(0), 0, 0.0).is_err());
    }

    #[test]
    fn parallel_fill_is_the_serial_stream() {
        let synth = Synth::new("tiny", 5, 0.0).unwrap();
        let n = 3 * BLOCK * PIECE_BLOCKS * 2 + 1234;
        let mut parallel = vec![0u8; n];
        synth.fill(77, 0.5, &mut parallel);
        let mut serial = vec![0u8; n];
        fill_blocks(Dtype::BF16, 77, 0.5, 0, &mut serial);
        assert!(parallel == serial);
        let vals = Dtype::BF16.to_f32(&serial);
        assert!(vals.iter().all(|v| v.abs() <= 0.5));
        let mean = vals.iter().map(|&v| v as f64).sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / vals.len() as f64;
        assert!(
            mean.abs() < 0.005 && (var - 0.25 / 3.0).abs() < 0.002,
            "{mean} {var}"
        );
    }

    /// Nothing writes the routing channels, and the embedding sets them.
    #[test]
    fn routing_channels_are_reserved() {
        let synth = Synth::new("tiny", 1, 1.0).unwrap();
        let spec = synth.spec().clone();
        let r = route::reserved_channels(&spec);
        let f32s = |name: &str| Dtype::BF16.to_f32(&synth.read_dense(name).unwrap());
        let o = f32s("model.layers.2.self_attn.o_proj.weight");
        assert!(o[..r * spec.q_dim()].iter().all(|&v| v == 0.0));
        assert!(o[r * spec.q_dim()..].iter().any(|&v| v != 0.0));
        let [rows, cols] = projection_shape(&spec, Projection::Down);
        let mut down = vec![0u8; rows * cols * 2];
        synth
            .read_expert(3, 7, Projection::Down, &mut down)
            .unwrap();
        let down = Dtype::BF16.to_f32(&down);
        assert!(down[..r * cols].iter().all(|&v| v == 0.0));
        let embed = f32s("model.embed_tokens.weight");
        for row in embed.chunks_exact(spec.hidden_size).take(100) {
            assert_eq!(row[0], half::bf16::from_f32(route::BIAS_VALUE).to_f32());
        }
        let router = f32s("model.layers.1.mlp.gate.weight");
        for row in router.chunks_exact(spec.hidden_size) {
            assert!(row[r..].iter().all(|&v| v == 0.0));
        }
    }
}
