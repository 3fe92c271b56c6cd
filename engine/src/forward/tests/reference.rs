//! A deliberately plain implementation of the four families' forward pass: per-token loops,
//! no KV cache (every call recomputes the whole sequence), no backend, no paging. Written
//! from transformers' modeling files, independently of the engine's code paths.

use super::TinyModel;
use crate::spec::{LayerMlp, QkNorm};

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for xs in x.chunks(w.len()) {
        let mut ss = 0.0f32;
        for v in xs {
            ss += v * v;
        }
        let r = 1.0 / (ss / xs.len() as f32 + eps).sqrt();
        for (v, wv) in xs.iter().zip(w) {
            out.push(wv * (v * r));
        }
    }
    out
}

/// `w` is `[n, k]` row-major; returns `x · wᵀ (+ b)`.
fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let k = x.len();
    let n = w.len() / k;
    (0..n)
        .map(|j| {
            let mut s = 0.0f32;
            for i in 0..k {
                s += x[i] * w[j * k + i];
            }
            s + b.map_or(0.0, |b| b[j])
        })
        .collect()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn swiglu(x: &[f32], gate: &[f32], up: &[f32], down: &[f32]) -> Vec<f32> {
    let g = linear(x, gate, None);
    let u = linear(x, up, None);
    let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
    linear(&a, down, None)
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32], scale: f32) {
    let half = head_dim / 2;
    for head in x.chunks_mut(head_dim) {
        let orig = head.to_vec();
        for i in 0..head_dim {
            let f = inv_freq[i % half] * pos as f32;
            let (c, s) = (f.cos() * scale, f.sin() * scale);
            let rotated = if i < half {
                -orig[i + half]
            } else {
                orig[i - half]
            };
            head[i] = orig[i] * c + rotated * s;
        }
    }
}

/// Logits of every position of `tokens`, `[tokens.len()][vocab]`.
pub fn logits(m: &TinyModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let s = &m.spec;
    let t = |name: &str| -> &[f32] {
        m.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference: no tensor {name}"))
    };
    let (h, hd, eps) = (s.hidden_size, s.head_dim, s.rms_norm_eps);
    let (inv_freq, rope_scale) = s.rope.inv_freq();
    let n = tokens.len();
    let embed = t("model.embed_tokens.weight");
    let mut x: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&id| embed[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    for (l, layer) in s.layers.iter().enumerate() {
        let p = |suffix: &str| format!("model.layers.{l}.{suffix}");
        let bias = |suffix: &str, on: bool| on.then(|| t(&p(suffix)));
        let hn: Vec<Vec<f32>> = x
            .iter()
            .map(|r| rmsnorm(r, t(&p("input_layernorm.weight")), eps))
            .collect();
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (pos, r) in hn.iter().enumerate() {
            let mut q = linear(
                r,
                t(&p("self_attn.q_proj.weight")),
                bias("self_attn.q_proj.bias", s.qkv_bias),
            );
            let mut k = linear(
                r,
                t(&p("self_attn.k_proj.weight")),
                bias("self_attn.k_proj.bias", s.qkv_bias),
            );
            let mut v = linear(
                r,
                t(&p("self_attn.v_proj.weight")),
                bias("self_attn.v_proj.bias", s.qkv_bias),
            );
            if s.qk_norm != QkNorm::None {
                q = rmsnorm(&q, t(&p("self_attn.q_norm.weight")), eps);
                k = rmsnorm(&k, t(&p("self_attn.k_norm.weight")), eps);
            }
            if let Some(c) = s.clip_qkv {
                for val in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                    *val = val.clamp(-c, c);
                }
            }
            rope(&mut q, hd, pos, &inv_freq, rope_scale);
            rope(&mut k, hd, pos, &inv_freq, rope_scale);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let group = s.num_heads / s.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        for i in 0..n {
            let mut attn = vec![0.0f32; s.num_heads * hd];
            for head in 0..s.num_heads {
                let kvh = head / group;
                let q = &qs[i][head * hd..(head + 1) * hd];
                let visible: Vec<usize> = (0..=i)
                    .filter(|&j| layer.sliding_window.is_none_or(|w| i - j < w))
                    .collect();
                let scores: Vec<f32> = visible
                    .iter()
                    .map(|&j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let probs = softmax(&scores);
                for (&j, pr) in visible.iter().zip(&probs) {
                    for d in 0..hd {
                        attn[head * hd + d] += pr * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = linear(
                &attn,
                t(&p("self_attn.o_proj.weight")),
                bias("self_attn.o_proj.bias", s.o_bias),
            );
            x[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        for xi in x.iter_mut() {
            let hn = rmsnorm(xi, t(&p("post_attention_layernorm.weight")), eps);
            let out = match layer.mlp {
                LayerMlp::Dense { .. } => swiglu(
                    &hn,
                    t(&p("mlp.gate_proj.weight")),
                    t(&p("mlp.up_proj.weight")),
                    t(&p("mlp.down_proj.weight")),
                ),
                LayerMlp::Moe => moe(m, l, &hn),
            };
            xi.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
        }
    }
    let head = if s.tie_word_embeddings {
        embed
    } else {
        t("lm_head.weight")
    };
    x.iter()
        .map(|r| linear(&rmsnorm(r, t("model.norm.weight"), eps), head, None))
        .collect()
}

fn moe(m: &TinyModel, l: usize, hn: &[f32]) -> Vec<f32> {
    let s = &m.spec;
    let module = s.family.moe_module();
    let t = |suffix: &str| {
        m.tensors
            .get(&format!("model.layers.{l}.{module}.{suffix}"))
            .unwrap()
    };
    let probs = softmax(&linear(hn, t("gate.weight"), None));
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap().then(a.cmp(&b)));
    let top = &order[..s.moe.top_k];
    let total: f32 = top.iter().map(|&e| probs[e]).sum();
    let mut out = vec![0.0f32; hn.len()];
    let mut chosen = top.to_vec();
    chosen.sort_unstable();
    for e in chosen {
        let w = if s.moe.norm_topk_prob {
            probs[e] / total
        } else {
            probs[e]
        };
        let [g, u, d] = &m.experts_as_stored[&(l, e)];
        let y = swiglu(hn, &g.data, &u.data, &d.data);
        out.iter_mut().zip(&y).for_each(|(o, y)| *o += w * y);
    }
    if s.moe.shared_expert.is_some() {
        let y = swiglu(
            hn,
            t("shared_expert.gate_proj.weight"),
            t("shared_expert.up_proj.weight"),
            t("shared_expert.down_proj.weight"),
        );
        let g = linear(hn, t("shared_expert_gate.weight"), None)[0];
        let sig = 1.0 / (1.0 + (-g).exp());
        out.iter_mut().zip(&y).for_each(|(o, y)| *o += sig * y);
    }
    out
}
