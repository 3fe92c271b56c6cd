//! Unit tests of config.json parsing, each field against what transformers 5 does with it.

use serde_json::{json, Value};

use super::*;

fn mixtral() -> Value {
    json!({
        "model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "num_local_experts": 8,
        "num_experts_per_tok": 2, "intermediate_size": 32, "rope_theta": 1e6,
        "sliding_window": 8, "hidden_act": "silu"
    })
}

fn qwen2() -> Value {
    json!({
        "model_type": "qwen2_moe", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 100,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 96,
        "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2, "mlp_only_layers": [3],
        "use_sliding_window": false, "sliding_window": 16
    })
}

fn qwen3() -> Value {
    json!({
        "model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                             "original_max_position_embeddings": 64}
    })
}

fn olmoe() -> Value {
    json!({
        "model_type": "olmoe", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "num_experts": 8, "num_experts_per_tok": 2,
        "intermediate_size": 32, "clip_qkv": 8.0,
        "rope_scaling": {"type": "linear", "factor": 2.0}
    })
}

fn parse(v: &Value) -> Result<ModelSpec, SpecError> {
    ModelSpec::from_config_str(&v.to_string(), "config.json")
}

/// The error message of parsing `v`, which must fail.
fn error(v: &Value) -> String {
    match parse(v) {
        Ok(s) => panic!("parsed, expected an error: {s:?}"),
        Err(e) => e.to_string(),
    }
}

fn with(mut v: Value, changes: Value) -> Value {
    for (k, x) in changes.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn without(mut v: Value, field: &str) -> Value {
    v.as_object_mut().unwrap().remove(field);
    v
}

fn windows(s: &ModelSpec) -> Vec<Option<usize>> {
    s.layers.iter().map(|l| l.sliding_window).collect()
}

#[test]
fn mixtral_reads_every_field() {
    let s = parse(&mixtral()).unwrap();
    assert_eq!(s.family, Family::Mixtral);
    assert_eq!(s.head_dim, 16);
    assert_eq!(s.num_kv_heads, 2);
    assert_eq!(s.rope.theta, 1e6);
    assert!(s.moe.norm_topk_prob);
    assert!(s
        .layers
        .iter()
        .all(|l| l.sliding_window == Some(8) && l.mlp == LayerMlp::Moe));
}

#[test]
fn mixtral_head_dim_experts_alias_and_kv_heads() {
    // MixtralConfig.head_dim is honoured (attention and RoPE width).
    let s = parse(&with(mixtral(), json!({"head_dim": 32}))).unwrap();
    assert_eq!((s.head_dim, s.rope.head_dim, s.q_dim()), (32, 32, 128));
    // transformers 5 writes `"head_dim": null`: hidden / heads.
    assert_eq!(
        parse(&with(mixtral(), json!({"head_dim": null})))
            .unwrap()
            .head_dim,
        16
    );
    // attribute_map: num_experts is num_local_experts.
    let v = with(
        without(mixtral(), "num_local_experts"),
        json!({"num_experts": 4}),
    );
    assert_eq!(parse(&v).unwrap().moe.num_experts, 4);
    let e = error(&with(mixtral(), json!({"num_experts": 4})));
    assert!(
        e.contains("num_local_experts") && e.contains("num_experts"),
        "{e}"
    );
    // null kv heads become the head count; an absent field has a fixed class default (8),
    // which we do not guess.
    let s = parse(&with(mixtral(), json!({"num_key_value_heads": null}))).unwrap();
    assert_eq!(s.num_kv_heads, 4);
    let e = error(&without(mixtral(), "num_key_value_heads"));
    assert!(e.contains("missing field `num_key_value_heads`"), "{e}");
}

#[test]
fn qwen2_moe_dense_layers_and_shared_expert() {
    let s = parse(&qwen2()).unwrap();
    let kinds: Vec<_> = s.layers.iter().map(|l| l.mlp).collect();
    let dense = LayerMlp::Dense { intermediate: 96 };
    assert_eq!(kinds, vec![dense, LayerMlp::Moe, dense, dense]);
    assert_eq!(
        s.moe.shared_expert,
        Some(SharedExpertSpec { intermediate: 48 })
    );
    assert!(s.qkv_bias && !s.o_bias && !s.moe.norm_topk_prob);
    assert!(s.layers.iter().all(|l| l.sliding_window.is_none()));

    // A zero-width shared expert adds nothing; an absent size is not guessed (5632 in transformers).
    let s = parse(&with(
        qwen2(),
        json!({"shared_expert_intermediate_size": 0}),
    ))
    .unwrap();
    assert_eq!(s.moe.shared_expert, None);
    let e = error(&without(qwen2(), "shared_expert_intermediate_size"));
    assert!(e.contains("shared_expert_intermediate_size"), "{e}");
}

#[test]
fn qwen2_moe_qkv_bias_comes_from_the_config() {
    let s = parse(&with(qwen2(), json!({"qkv_bias": false}))).unwrap();
    assert!(!s.qkv_bias && !s.o_bias);
    let s = parse(&with(qwen2(), json!({"qkv_bias": true}))).unwrap();
    assert!(s.qkv_bias && !s.o_bias);
    // Qwen2MoeConfig has no attention_bias; it changes nothing.
    let s = parse(&with(qwen2(), json!({"attention_bias": true}))).unwrap();
    assert!(s.qkv_bias && !s.o_bias);
    let e = error(&with(qwen2(), json!({"qkv_bias": "yes"})));
    assert!(e.contains("qkv_bias"), "{e}");
}

#[test]
fn qwen_without_routed_experts_is_an_error_naming_the_field() {
    for base in [qwen2(), qwen3()] {
        let e = error(&with(base.clone(), json!({"num_experts": 0})));
        assert!(
            e.contains("`num_experts` = 0 is not supported") && e.contains("dense"),
            "{e}"
        );
        // A sparse step past the last layer leaves every layer dense too.
        let e = error(&with(
            base,
            json!({"decoder_sparse_step": 9, "mlp_only_layers": [], "intermediate_size": 96}),
        ));
        assert!(e.contains("decoder_sparse_step"), "{e}");
    }
    // transformers 5 saves Qwen3-MoE's count as num_local_experts.
    let v = with(
        without(qwen3(), "num_experts"),
        json!({"num_local_experts": 0}),
    );
    assert!(error(&v).contains("`num_local_experts` = 0"));
    // Qwen2MoeConfig has no such alias: its num_experts is required.
    let v = with(
        without(qwen2(), "num_experts"),
        json!({"num_local_experts": 8}),
    );
    assert!(error(&v).contains("missing field `num_experts`"));
}

#[test]
fn qwen_sparse_step_and_mlp_only_layers() {
    let v = with(
        qwen3(),
        json!({"num_hidden_layers": 6, "decoder_sparse_step": 3, "mlp_only_layers": [5],
               "intermediate_size": 40}),
    );
    let s = parse(&v).unwrap();
    let moe: Vec<usize> = s.moe_layers().collect();
    assert_eq!(moe, vec![2]);
    assert_eq!(s.layers[0].mlp, LayerMlp::Dense { intermediate: 40 });
    let e = error(&with(v.clone(), json!({"decoder_sparse_step": 0})));
    assert!(e.contains("decoder_sparse_step"), "{e}");
    let e = error(&with(v.clone(), json!({"mlp_only_layers": [6]})));
    assert!(e.contains("mlp_only_layers"), "{e}");
    let e = error(&without(v, "intermediate_size"));
    assert!(e.contains("intermediate_size"), "{e}");
}

#[test]
fn qwen2_moe_sliding_layers_follow_transformers_5() {
    let base = with(
        qwen2(),
        json!({"num_hidden_layers": 6, "decoder_sparse_step": 1, "mlp_only_layers": [],
               "use_sliding_window": true, "sliding_window": 16, "max_window_layers": 4}),
    );
    // Default layer_types: even layers below max_window_layers.
    let s = parse(&base).unwrap();
    let w = Some(16);
    assert_eq!(windows(&s), vec![w, None, w, None, None, None]);
    // Without use_sliding_window nothing slides, whatever sliding_window says.
    let s = parse(&with(base.clone(), json!({"use_sliding_window": false}))).unwrap();
    assert_eq!(windows(&s), vec![None; 6]);
    // Explicit layer_types win.
    let types = json!([
        "full_attention",
        "sliding_attention",
        "full_attention",
        "full_attention",
        "full_attention",
        "sliding_attention"
    ]);
    let s = parse(&with(base.clone(), json!({"layer_types": types.clone()}))).unwrap();
    assert_eq!(windows(&s), vec![None, w, None, None, None, w]);
    // ... but a sliding layer without use_sliding_window would get a window of 0.
    let v = with(
        base.clone(),
        json!({"layer_types": types, "use_sliding_window": false}),
    );
    let e = error(&v);
    assert!(
        e.contains("layer_types") && e.contains("use_sliding_window"),
        "{e}"
    );
    // The class default of max_window_layers (28) is not guessed.
    let e = error(&without(base.clone(), "max_window_layers"));
    assert!(e.contains("max_window_layers"), "{e}");
    let e = error(&with(base.clone(), json!({"sliding_window": null})));
    assert!(e.contains("sliding_window"), "{e}");
    let e = error(&with(
        base.clone(),
        json!({"layer_types": ["full_attention"]}),
    ));
    assert!(e.contains("layer_types") && e.contains("6"), "{e}");
    let e = error(&with(
        base,
        json!({"layer_types": ["chunked_attention", "full_attention", "full_attention",
                               "full_attention", "full_attention", "full_attention"]}),
    ));
    assert!(
        e.contains("layer_types") && e.contains("chunked_attention"),
        "{e}"
    );
}

#[test]
fn qwen3_moe_reads_head_dim_yarn_and_norm_topk_default() {
    let s = parse(&qwen3()).unwrap();
    assert_eq!(s.head_dim, 32);
    assert_eq!(s.qk_norm, QkNorm::PerHead);
    // Qwen3MoeConfig.norm_topk_prob defaults to false (hub configs say true explicitly).
    assert!(!s.moe.norm_topk_prob);
    assert!(
        parse(&with(qwen3(), json!({"norm_topk_prob": true})))
            .unwrap()
            .moe
            .norm_topk_prob
    );
    assert_eq!(s.rope.theta, 5e5);
    assert!(matches!(s.rope.scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
    let s = parse(&with(qwen3(), json!({"attention_bias": true}))).unwrap();
    assert!(s.qkv_bias && s.o_bias);
}

#[test]
fn qwen3_moe_slides_every_layer_and_ignores_max_window_layers() {
    let v = with(
        qwen3(),
        json!({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1}),
    );
    assert_eq!(windows(&parse(&v).unwrap()), vec![Some(8), Some(8)]);
    // use_sliding_window with a null window is full attention in transformers.
    let s = parse(&with(v.clone(), json!({"sliding_window": null}))).unwrap();
    assert_eq!(windows(&s), vec![None, None]);
    // layer_types is not read by Qwen3-MoE: agreeing is fine, disagreeing is an error.
    let same = with(
        v.clone(),
        json!({"layer_types": ["sliding_attention", "sliding_attention"]}),
    );
    assert!(parse(&same).is_ok());
    let differ = with(
        v,
        json!({"layer_types": ["full_attention", "sliding_attention"]}),
    );
    let e = error(&differ);
    assert!(e.contains("layer_types") && e.contains("layer 0"), "{e}");
}

#[test]
fn olmoe_full_qk_norm_clip_and_head_dim() {
    let s = parse(&olmoe()).unwrap();
    assert_eq!(s.qk_norm, QkNorm::Full);
    assert_eq!(s.clip_qkv, Some(8.0));
    assert_eq!(s.num_kv_heads, 4);
    assert!(matches!(s.rope.scaling, RopeScaling::Linear { factor } if factor == 2.0));
    assert!(!s.moe.norm_topk_prob);
    assert!(s.layers.iter().all(|l| l.sliding_window.is_none()));
    // clip_qkv null: no clamp; non-positive: an error.
    assert_eq!(
        parse(&with(olmoe(), json!({"clip_qkv": null})))
            .unwrap()
            .clip_qkv,
        None
    );
    assert!(error(&with(olmoe(), json!({"clip_qkv": 0.0}))).contains("clip_qkv"));
    // Its q/k norms are sized from hidden_size / heads: another head_dim cannot run.
    assert_eq!(
        parse(&with(olmoe(), json!({"head_dim": 16})))
            .unwrap()
            .head_dim,
        16
    );
    let e = error(&with(olmoe(), json!({"head_dim": 32})));
    assert!(e.contains("`head_dim` = 32 is not supported"), "{e}");
    // OLMoE's mask is always causal; a layer_types claiming otherwise is an error.
    let e = error(&with(
        olmoe(),
        json!({"layer_types": ["sliding_attention", "full_attention"]}),
    ));
    assert!(e.contains("layer_types"), "{e}");
    // clip_qkv is OLMoE's alone.
    assert_eq!(
        parse(&with(mixtral(), json!({"clip_qkv": 4.0})))
            .unwrap()
            .clip_qkv,
        None
    );
}

#[test]
fn rope_follows_transformers_5_standardisation() {
    // rope_theta inside the parameters wins over the top level; absent anywhere it is 10000.
    let v = with(
        mixtral(),
        json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    );
    assert_eq!(parse(&v).unwrap().rope.theta, 5e5);
    assert_eq!(
        parse(&without(mixtral(), "rope_theta")).unwrap().rope.theta,
        1e4
    );
    // A non-empty rope_scaling wins over rope_parameters.
    let v = with(
        mixtral(),
        json!({"rope_scaling": {"rope_type": "linear", "factor": 3.0},
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    );
    assert!(
        matches!(parse(&v).unwrap().rope.scaling, RopeScaling::Linear { factor } if factor == 3.0)
    );
    // YaRN: the explicit factor is used even when the context ratio differs...
    let v = with(
        qwen3(),
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                   "original_max_position_embeddings": 64}}),
    );
    let RopeScaling::Yarn {
        factor,
        original_max_position_embeddings,
        truncate,
        ..
    } = parse(&v).unwrap().rope.scaling
    else {
        panic!("not yarn")
    };
    assert_eq!(
        (factor, original_max_position_embeddings, truncate),
        (2.0, 64.0, true)
    );
    // ... a null factor is that ratio, a missing one an error; the original context defaults
    // to max_position_embeddings; a null truncate is false.
    let v = with(
        qwen3(),
        json!({"rope_parameters": {"rope_type": "yarn", "factor": null, "truncate": null,
                                   "original_max_position_embeddings": 32}}),
    );
    let RopeScaling::Yarn {
        factor, truncate, ..
    } = parse(&v).unwrap().rope.scaling
    else {
        panic!("not yarn")
    };
    assert_eq!((factor, truncate), (8.0, false));
    let v = with(
        qwen3(),
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}),
    );
    assert!(matches!(parse(&v).unwrap().rope.scaling,
        RopeScaling::Yarn { original_max_position_embeddings, .. }
            if original_max_position_embeddings == 256.0));
    let v = with(qwen3(), json!({"rope_parameters": {"rope_type": "yarn"}}));
    assert!(error(&v).contains("rope_parameters.factor"));
}

#[test]
fn rope_options_we_do_not_implement_name_the_field() {
    let e = error(&with(
        mixtral(),
        json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    ));
    assert!(
        e.contains("rope_scaling.rope_type") && e.contains("dynamic"),
        "{e}"
    );
    // Partial rotary changes the scaled RoPE functions...
    let e = error(&with(
        olmoe(),
        json!({"rope_scaling": {"type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}}),
    ));
    assert!(e.contains("rope_scaling.partial_rotary_factor"), "{e}");
    let e = error(&with(olmoe(), json!({"partial_rotary_factor": 0.5})));
    assert!(e.contains("`partial_rotary_factor`"), "{e}");
    // ... while these families' default RoPE rotates the whole head regardless.
    let s = parse(&with(mixtral(), json!({"partial_rotary_factor": 0.5}))).unwrap();
    assert_eq!(s.rope.scaling, RopeScaling::Default);
    // Per-layer-type parameters.
    let e = error(&with(
        qwen2(),
        json!({"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
    ));
    assert!(e.contains("rope_parameters.full_attention"), "{e}");
}

#[test]
fn unsupported_options_name_the_field() {
    assert!(error(&with(mixtral(), json!({"model_type": "llama"}))).contains("model_type"));
    assert!(error(&with(mixtral(), json!({"hidden_act": "gelu"}))).contains("hidden_act"));
    assert!(parse(&with(mixtral(), json!({"hidden_act": "swish"}))).is_ok());
    assert!(
        error(&with(mixtral(), json!({"num_key_value_heads": 3}))).contains("num_key_value_heads")
    );
    assert!(error(&without(mixtral(), "num_local_experts")).contains("num_local_experts"));
    assert!(error(&with(mixtral(), json!({"vocab_size": "many"}))).contains("vocab_size"));
    assert!(error(&with(mixtral(), json!({"sliding_window": 0}))).contains("sliding_window"));
    assert!(
        error(&with(mixtral(), json!({"num_experts_per_tok": 9}))).contains("num_experts_per_tok")
    );
    assert!(error(&with(mixtral(), json!({"head_dim": 15}))).contains("head_dim"));
    assert!(error(&with(
        mixtral(),
        json!({"quantization_config": {"bits": 4}})
    ))
    .contains("quantization_config"));
}

#[test]
fn harmless_fields_are_accepted() {
    let v = with(
        qwen2(),
        json!({"router_aux_loss_coef": 0.001, "output_router_logits": false,
               "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": true,
               "torch_dtype": "bfloat16", "transformers_version": "5.17.0",
               "pad_token_id": null, "max_window_layers": 21, "router_jitter_noise": 0.0}),
    );
    parse(&v).unwrap();
}

#[test]
fn validate_catches_what_a_hand_edited_manifest_could_say() {
    let good = parse(&qwen2()).unwrap();
    good.validate().unwrap();
    let bad = |f: &dyn Fn(&mut ModelSpec)| {
        let mut s = good.clone();
        f(&mut s);
        s.validate().unwrap_err().field
    };
    assert_eq!(bad(&|s| s.num_kv_heads = 0), "num_kv_heads");
    assert_eq!(bad(&|s| s.num_kv_heads = 3), "num_kv_heads");
    assert_eq!(bad(&|s| s.head_dim = 15), "head_dim");
    assert_eq!(bad(&|s| s.rope.head_dim = 8), "rope.head_dim");
    assert_eq!(bad(&|s| s.rope.theta = f64::NAN), "rope.theta");
    assert_eq!(bad(&|s| s.rms_norm_eps = 0.0), "rms_norm_eps");
    assert_eq!(bad(&|s| s.moe.top_k = 0), "moe.top_k");
    assert_eq!(bad(&|s| s.moe.top_k = 9), "moe.top_k");
    assert_eq!(bad(&|s| s.moe.num_experts = 0), "moe.num_experts");
    assert_eq!(bad(&|s| s.layers.clear()), "layers");
    assert_eq!(
        bad(&|s| s.layers[2].sliding_window = Some(0)),
        "layers[2].sliding_window"
    );
    assert_eq!(
        bad(&|s| s.layers[0].mlp = LayerMlp::Dense { intermediate: 0 }),
        "layers[0].mlp.intermediate"
    );
    assert_eq!(bad(&|s| s.vocab_size = usize::MAX / 2), "vocab_size");
    assert_eq!(
        bad(&|s| s.moe.expert_intermediate = 1 << 40),
        "moe.expert_intermediate"
    );
    assert_eq!(bad(&|s| s.clip_qkv = Some(-1.0)), "clip_qkv");
}

#[test]
fn spec_json_rejects_unknown_fields() {
    let s = parse(&qwen2()).unwrap();
    let mut v = serde_json::to_value(&s).unwrap();
    assert_eq!(serde_json::from_value::<ModelSpec>(v.clone()).unwrap(), s);
    v["moe"]["capacity_factor"] = 1.into();
    let e = serde_json::from_value::<ModelSpec>(v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("capacity_factor"), "{e}");
}
