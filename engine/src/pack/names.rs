//! The hub's tensor names and shapes for each family: what a checkpoint must hold.

use crate::pack::manifest::Projection;
use crate::spec::{Family, LayerMlp, ModelSpec, QkNorm};

/// Every dense (non-routed-expert) tensor the spec implies, with its shape, in a stable order.
pub fn dense_tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let h = spec.hidden_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![spec.vocab_size, h],
    )];
    for (l, layer) in spec.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (name, rows) in [
            ("q", spec.q_dim()),
            ("k", spec.kv_dim()),
            ("v", spec.kv_dim()),
        ] {
            out.push((format!("{p}.self_attn.{name}_proj.weight"), vec![rows, h]));
            if spec.qkv_bias {
                out.push((format!("{p}.self_attn.{name}_proj.bias"), vec![rows]));
            }
        }
        out.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, spec.q_dim()],
        ));
        if spec.o_bias {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        match spec.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![spec.head_dim]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![spec.head_dim]));
            }
            QkNorm::Full => {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![spec.q_dim()]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![spec.kv_dim()]));
            }
        }
        match layer.mlp {
            LayerMlp::Dense { intermediate } => {
                out.extend(swiglu(&format!("{p}.mlp"), h, intermediate));
            }
            LayerMlp::Moe => {
                let m = format!("{p}.{}", spec.family.moe_module());
                out.push((format!("{m}.gate.weight"), vec![spec.moe.num_experts, h]));
                if let Some(shared) = spec.moe.shared_expert {
                    out.extend(swiglu(
                        &format!("{m}.shared_expert"),
                        h,
                        shared.intermediate,
                    ));
                    out.push((format!("{m}.shared_expert_gate.weight"), vec![1, h]));
                }
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![spec.vocab_size, h]));
    }
    out
}

fn swiglu(prefix: &str, h: usize, i: usize) -> [(String, Vec<usize>); 3] {
    [
        (format!("{prefix}.gate_proj.weight"), vec![i, h]),
        (format!("{prefix}.up_proj.weight"), vec![i, h]),
        (format!("{prefix}.down_proj.weight"), vec![h, i]),
    ]
}

/// The hub name of one routed expert's projection (the per-expert layout).
pub fn expert_tensor(spec: &ModelSpec, layer: usize, expert: usize, proj: Projection) -> String {
    let m = spec.family.moe_module();
    let leaf = match (spec.family, proj) {
        (Family::Mixtral, Projection::Gate) => "w1",
        (Family::Mixtral, Projection::Up) => "w3",
        (Family::Mixtral, Projection::Down) => "w2",
        (_, Projection::Gate) => "gate_proj",
        (_, Projection::Up) => "up_proj",
        (_, Projection::Down) => "down_proj",
    };
    format!("model.layers.{layer}.{m}.experts.{expert}.{leaf}.weight")
}

/// The shape of one projection: `[rows, cols]` of its `nn.Linear` weight.
pub fn projection_shape(spec: &ModelSpec, proj: Projection) -> [usize; 2] {
    let (h, i) = (spec.hidden_size, spec.moe.expert_intermediate);
    match proj {
        Projection::Gate | Projection::Up => [i, h],
        Projection::Down => [h, i],
    }
}

/// The fused 3-D layout transformers 5 keeps in memory (and writes when saving its state dict):
/// `experts.gate_up_proj` `[E, 2I, H]` (gate rows first, then up) and `experts.down_proj`
/// `[E, H, I]`.
pub fn fused_expert_tensors(spec: &ModelSpec, layer: usize) -> [(String, Vec<usize>); 2] {
    let m = spec.family.moe_module();
    let (e, h, i) = (
        spec.moe.num_experts,
        spec.hidden_size,
        spec.moe.expert_intermediate,
    );
    [
        (
            format!("model.layers.{layer}.{m}.experts.gate_up_proj"),
            vec![e, 2 * i, h],
        ),
        (
            format!("model.layers.{layer}.{m}.experts.down_proj"),
            vec![e, h, i],
        ),
    ]
}
