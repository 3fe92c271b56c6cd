//! The dense (non-expert) weights of a model: embeddings, norms, attention, routers, shared
//! experts and dense MLPs, read by hub tensor name from any [`TensorLoader`] and checked
//! against the [`ModelSpec`].
//!
//! Routed experts are not here: the forward pass reads them through
//! [`crate::forward::ExpertProvider`], from the storage tiers.
//!
//! [`DenseWeights`] is generic over where a tensor lives: loaded as [`HostMatrix`], then
//! moved onto a backend with [`DenseWeights::upload`].

use std::collections::HashMap;

use crate::backend::{Backend, BackendError, HostMatrix};
use crate::spec::{Family, LayerMlp, ModelSpec, QkNorm};

/// A source of named tensors converted to f32 (a safetensors file, a map in a test).
pub trait TensorLoader {
    /// Why a tensor could not be read.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Whether the source holds a tensor of this name.
    fn has(&self, name: &str) -> bool;

    /// Reads `name` as f32, row-major. The source checks that its stored shape is `shape`.
    fn load_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Self::Error>;
}

/// Why the dense weights could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The model needs a tensor the source does not have.
    #[error("tensor {name} is missing")]
    Missing {
        /// The hub tensor name.
        name: String,
    },
    /// The source failed to produce the tensor (wrong shape, unreadable, bad dtype).
    #[error("cannot load tensor {name}")]
    Load {
        /// The hub tensor name.
        name: String,
        /// What the source said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The source returned a different number of values than the shape holds.
    #[error("tensor {name}: {got} values for shape {shape:?}")]
    Length {
        /// The hub tensor name.
        name: String,
        /// The shape asked for.
        shape: Vec<usize>,
        /// Values returned.
        got: usize,
    },
    /// The backend refused the tensor.
    #[error("cannot upload tensor {name}")]
    Upload {
        /// The hub tensor name.
        name: String,
        /// What the backend said.
        #[source]
        source: BackendError,
    },
}

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct SwigluWeights<W> {
    /// `gate_proj`: `[intermediate, hidden]`.
    pub gate: W,
    /// `up_proj`: `[intermediate, hidden]`.
    pub up: W,
    /// `down_proj`: `[hidden, intermediate]`.
    pub down: W,
}

/// Qwen2-MoE's shared expert: added to every token, scaled by `sigmoid(gate · x)`.
#[derive(Debug)]
pub struct SharedExpertWeights<W> {
    /// The MLP.
    pub mlp: SwigluWeights<W>,
    /// `shared_expert_gate`: `[1, hidden]`.
    pub gate: W,
}

/// A layer's feed-forward weights (routed experts live elsewhere).
#[derive(Debug)]
pub enum MlpWeights<W> {
    /// A routed-expert layer.
    Moe {
        /// The router: `[num_experts, hidden]`.
        router: W,
        /// The shared expert, where the family has one.
        shared: Option<SharedExpertWeights<W>>,
    },
    /// A dense MLP layer.
    Dense(SwigluWeights<W>),
}

/// A layer's attention weights.
#[derive(Debug)]
pub struct AttentionWeights<W> {
    /// `q_proj`: `[heads * head_dim, hidden]`.
    pub q: W,
    /// `k_proj`: `[kv_heads * head_dim, hidden]`.
    pub k: W,
    /// `v_proj`: `[kv_heads * head_dim, hidden]`.
    pub v: W,
    /// `o_proj`: `[hidden, heads * head_dim]`.
    pub o: W,
    /// q/k/v biases, where the model has them.
    pub q_bias: Option<W>,
    /// k bias.
    pub k_bias: Option<W>,
    /// v bias.
    pub v_bias: Option<W>,
    /// o bias.
    pub o_bias: Option<W>,
    /// q norm weight: `[head_dim]` per head (Qwen3) or `[heads * head_dim]` (OLMoE).
    pub q_norm: Option<W>,
    /// k norm weight: `[head_dim]` or `[kv_heads * head_dim]`.
    pub k_norm: Option<W>,
}

/// One decoder layer's dense weights.
#[derive(Debug)]
pub struct LayerWeights<W> {
    /// Norm before attention: `[hidden]`.
    pub input_norm: W,
    /// Norm before the MLP: `[hidden]`.
    pub post_attention_norm: W,
    /// Attention.
    pub attn: AttentionWeights<W>,
    /// Feed-forward.
    pub mlp: MlpWeights<W>,
}

/// Every dense weight of a model.
#[derive(Debug)]
pub struct DenseWeights<W> {
    /// The family (it names the MoE module of each layer).
    pub family: Family,
    /// `embed_tokens`: `[vocab, hidden]`.
    pub embed: W,
    /// The final norm: `[hidden]`.
    pub final_norm: W,
    /// `lm_head`: `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<W>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights<W>>,
}

/// The hub name of a per-layer tensor.
fn layer_name(i: usize, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}

impl DenseWeights<HostMatrix> {
    /// Reads every dense tensor `spec` needs from `loader`, checking each shape.
    pub fn load<L: TensorLoader>(
        spec: &ModelSpec,
        loader: &mut L,
    ) -> Result<DenseWeights<HostMatrix>, WeightsError> {
        let (h, v) = (spec.hidden_size, spec.vocab_size);
        let mut r = Reader { loader };
        let embed = r.matrix("model.embed_tokens.weight", v, h)?;
        let final_norm = r.vector("model.norm.weight", h)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(r.matrix("lm_head.weight", v, h)?)
        };
        let layers = (0..spec.num_layers())
            .map(|i| r.layer(spec, i))
            .collect::<Result<_, _>>()?;
        Ok(DenseWeights {
            family: spec.family,
            embed,
            final_norm,
            lm_head,
            layers,
        })
    }
}

impl<W> DenseWeights<W> {
    /// Converts every tensor with `f`, which also gets the tensor's hub name.
    pub fn try_map<U, E>(
        self,
        f: &mut impl FnMut(&str, W) -> Result<U, E>,
    ) -> Result<DenseWeights<U>, E> {
        let layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.try_map(i, self.family.moe_module(), f))
            .collect::<Result<_, _>>()?;
        Ok(DenseWeights {
            family: self.family,
            embed: f("model.embed_tokens.weight", self.embed)?,
            final_norm: f("model.norm.weight", self.final_norm)?,
            lm_head: self.lm_head.map(|w| f("lm_head.weight", w)).transpose()?,
            layers,
        })
    }

    /// The matrix the final hidden state is multiplied with (`lm_head`, or the tied embedding).
    pub fn output_projection(&self) -> &W {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

impl DenseWeights<HostMatrix> {
    /// Moves every tensor onto `backend`.
    pub fn upload<B: Backend>(self, backend: &B) -> Result<DenseWeights<B::Weight>, WeightsError> {
        self.try_map(&mut |name, w| {
            backend.upload(w).map_err(|source| WeightsError::Upload {
                name: name.to_string(),
                source,
            })
        })
    }
}

impl<W> LayerWeights<W> {
    fn try_map<U, E>(
        self,
        i: usize,
        moe: &str,
        f: &mut impl FnMut(&str, W) -> Result<U, E>,
    ) -> Result<LayerWeights<U>, E> {
        let mut g = |suffix: &str, w: W| f(&layer_name(i, suffix), w);
        let a = self.attn;
        let mut opt = |suffix: &str, w: Option<W>| w.map(|w| g(suffix, w)).transpose();
        let attn = AttentionWeights {
            q_bias: opt("self_attn.q_proj.bias", a.q_bias)?,
            k_bias: opt("self_attn.k_proj.bias", a.k_bias)?,
            v_bias: opt("self_attn.v_proj.bias", a.v_bias)?,
            o_bias: opt("self_attn.o_proj.bias", a.o_bias)?,
            q_norm: opt("self_attn.q_norm.weight", a.q_norm)?,
            k_norm: opt("self_attn.k_norm.weight", a.k_norm)?,
            q: g("self_attn.q_proj.weight", a.q)?,
            k: g("self_attn.k_proj.weight", a.k)?,
            v: g("self_attn.v_proj.weight", a.v)?,
            o: g("self_attn.o_proj.weight", a.o)?,
        };
        let mut swiglu = |prefix: &str, m: SwigluWeights<W>| -> Result<SwigluWeights<U>, E> {
            Ok(SwigluWeights {
                gate: g(&format!("{prefix}.gate_proj.weight"), m.gate)?,
                up: g(&format!("{prefix}.up_proj.weight"), m.up)?,
                down: g(&format!("{prefix}.down_proj.weight"), m.down)?,
            })
        };
        let mlp = match self.mlp {
            MlpWeights::Dense(m) => MlpWeights::Dense(swiglu("mlp", m)?),
            MlpWeights::Moe { router, shared } => {
                let shared = match shared {
                    None => None,
                    Some(s) => Some(SharedExpertWeights {
                        mlp: swiglu(&format!("{moe}.shared_expert"), s.mlp)?,
                        gate: g(&format!("{moe}.shared_expert_gate.weight"), s.gate)?,
                    }),
                };
                MlpWeights::Moe {
                    router: g(&format!("{moe}.gate.weight"), router)?,
                    shared,
                }
            }
        };
        Ok(LayerWeights {
            input_norm: g("input_layernorm.weight", self.input_norm)?,
            post_attention_norm: g("post_attention_layernorm.weight", self.post_attention_norm)?,
            attn,
            mlp,
        })
    }
}

/// Reads tensors by name and shape, wrapping each failure with the name.
struct Reader<'a, L> {
    loader: &'a mut L,
}

impl<L: TensorLoader> Reader<'_, L> {
    fn load(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightsError> {
        if !self.loader.has(name) {
            return Err(WeightsError::Missing { name: name.into() });
        }
        let data = self
            .loader
            .load_f32(name, shape)
            .map_err(|e| WeightsError::Load {
                name: name.into(),
                source: Box::new(e),
            })?;
        let want: usize = shape.iter().product();
        if data.len() != want {
            return Err(WeightsError::Length {
                name: name.into(),
                shape: shape.to_vec(),
                got: data.len(),
            });
        }
        Ok(data)
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<HostMatrix, WeightsError> {
        let data = self.load(name, &[rows, cols])?;
        Ok(HostMatrix { rows, cols, data })
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<HostMatrix, WeightsError> {
        let data = self.load(name, &[n])?;
        Ok(HostMatrix {
            rows: 1,
            cols: n,
            data,
        })
    }

    fn swiglu(
        &mut self,
        prefix: &str,
        hidden: usize,
        inter: usize,
    ) -> Result<SwigluWeights<HostMatrix>, WeightsError> {
        Ok(SwigluWeights {
            gate: self.matrix(&format!("{prefix}.gate_proj.weight"), inter, hidden)?,
            up: self.matrix(&format!("{prefix}.up_proj.weight"), inter, hidden)?,
            down: self.matrix(&format!("{prefix}.down_proj.weight"), hidden, inter)?,
        })
    }

    fn layer(
        &mut self,
        spec: &ModelSpec,
        i: usize,
    ) -> Result<LayerWeights<HostMatrix>, WeightsError> {
        let h = spec.hidden_size;
        let (qd, kvd) = (spec.q_dim(), spec.kv_dim());
        let n = |s: &str| layer_name(i, s);
        let mut bias = |s: &str, present: bool, len: usize| {
            present.then(|| self.vector(&n(s), len)).transpose()
        };
        let q_bias = bias("self_attn.q_proj.bias", spec.qkv_bias, qd)?;
        let k_bias = bias("self_attn.k_proj.bias", spec.qkv_bias, kvd)?;
        let v_bias = bias("self_attn.v_proj.bias", spec.qkv_bias, kvd)?;
        let o_bias = bias("self_attn.o_proj.bias", spec.o_bias, h)?;
        let (q_norm, k_norm) = match spec.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(self.vector(&n("self_attn.q_norm.weight"), spec.head_dim)?),
                Some(self.vector(&n("self_attn.k_norm.weight"), spec.head_dim)?),
            ),
            QkNorm::Full => (
                Some(self.vector(&n("self_attn.q_norm.weight"), qd)?),
                Some(self.vector(&n("self_attn.k_norm.weight"), kvd)?),
            ),
        };
        let attn = AttentionWeights {
            q: self.matrix(&n("self_attn.q_proj.weight"), qd, h)?,
            k: self.matrix(&n("self_attn.k_proj.weight"), kvd, h)?,
            v: self.matrix(&n("self_attn.v_proj.weight"), kvd, h)?,
            o: self.matrix(&n("self_attn.o_proj.weight"), h, qd)?,
            q_bias,
            k_bias,
            v_bias,
            o_bias,
            q_norm,
            k_norm,
        };
        let mlp = match spec.layers[i].mlp {
            LayerMlp::Dense { intermediate } => {
                MlpWeights::Dense(self.swiglu(&n("mlp"), h, intermediate)?)
            }
            LayerMlp::Moe => {
                let moe = spec.family.moe_module();
                let router =
                    self.matrix(&n(&format!("{moe}.gate.weight")), spec.moe.num_experts, h)?;
                let shared = match spec.moe.shared_expert {
                    None => None,
                    Some(s) => Some(SharedExpertWeights {
                        mlp: self.swiglu(&n(&format!("{moe}.shared_expert")), h, s.intermediate)?,
                        gate: self.matrix(&n(&format!("{moe}.shared_expert_gate.weight")), 1, h)?,
                    }),
                };
                MlpWeights::Moe { router, shared }
            }
        };
        Ok(LayerWeights {
            input_norm: self.vector(&n("input_layernorm.weight"), h)?,
            post_attention_norm: self.vector(&n("post_attention_layernorm.weight"), h)?,
            attn,
            mlp,
        })
    }
}

/// Why [`InMemoryTensors`] could not produce a tensor.
#[derive(Debug, thiserror::Error)]
pub enum InMemoryTensorError {
    /// No tensor of that name.
    #[error("no tensor named {name}")]
    Missing {
        /// The name asked for.
        name: String,
    },
    /// The stored shape differs from the one asked for.
    #[error("tensor {name} has shape {stored:?}, expected {wanted:?}")]
    Shape {
        /// The name.
        name: String,
        /// Its shape.
        stored: Vec<usize>,
        /// The shape asked for.
        wanted: Vec<usize>,
    },
}

/// Named f32 tensors held in memory: a [`TensorLoader`] for tests and synthesized models.
#[derive(Debug, Default, Clone)]
pub struct InMemoryTensors {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl InMemoryTensors {
    /// An empty set.
    pub fn new() -> InMemoryTensors {
        InMemoryTensors::default()
    }

    /// Adds (or replaces) a tensor; `data` must hold `shape.product()` values.
    pub fn insert(&mut self, name: impl Into<String>, shape: &[usize], data: Vec<f32>) {
        self.tensors.insert(name.into(), (shape.to_vec(), data));
    }

    /// A stored tensor's values.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.tensors.get(name).map(|(_, d)| d.as_slice())
    }

    /// Removes a tensor, returning its values.
    pub fn remove(&mut self, name: &str) -> Option<Vec<f32>> {
        self.tensors.remove(name).map(|(_, d)| d)
    }
}

impl TensorLoader for InMemoryTensors {
    type Error = InMemoryTensorError;

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn load_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, InMemoryTensorError> {
        let (stored, data) = self
            .tensors
            .get(name)
            .ok_or_else(|| InMemoryTensorError::Missing { name: name.into() })?;
        if stored.as_slice() != shape {
            return Err(InMemoryTensorError::Shape {
                name: name.into(),
                stored: stored.clone(),
                wanted: shape.to_vec(),
            });
        }
        Ok(data.clone())
    }
}
