//! Every op of the CUDA backend against the CPU reference backend on fresh random inputs:
//! ‖Δ‖/‖ref‖ within the bound of the element types involved, never NaN, with every new
//! activation poisoned (NaN) first so an element a kernel leaves unwritten shows.
//!
//! Runs on a machine with a GPU (the GPU host); elsewhere each test says so and passes.
#![cfg(feature = "cuda")]

use std::sync::{Arc, OnceLock};

use tileflow_engine::backend::cpu::CpuBackend;
use tileflow_engine::backend::{
    AttentionPlan, Backend, ChunkAttention, ExpertBytes, ExpertRef, ExpertWork, HostMatrix,
    QkvPrep, Routing,
};
use tileflow_engine::dtype::Dtype;
use tileflow_engine::kv::KvLayout;
use tileflow_engine::pack::ProjectionExtent;
use tileflow_engine::rope::{RopeScaling, RopeSpec};
use tileflow_engine::sampler::LogitSummary;
use tileflow_engine::tier::TierMemory;
use tileflow_gpu::{CudaBackend, CudaDevice, CudaTierMemory};
use tileflow_spdk::DmaArena;

/// The GPU, opened once for the whole binary; `None` (and a note) where there is none.
fn device() -> Option<Arc<CudaDevice>> {
    static DEV: OnceLock<Option<Arc<CudaDevice>>> = OnceLock::new();
    DEV.get_or_init(|| match tileflow_gpu::probe() {
        Ok(gpus) if !gpus.is_empty() => Some(CudaDevice::open(0, None).expect("open cuda:0")),
        other => {
            eprintln!("no GPU here ({other:?}): CUDA op tests skipped");
            None
        }
    })
    .clone()
}

fn backends(dtype: Dtype) -> Option<(CpuBackend, CudaBackend)> {
    let dev = device()?;
    Some((
        CpuBackend::new(),
        CudaBackend::new(dev, dtype).unwrap().with_poison(),
    ))
}

/// CUDA backends whose one-token kernels compute 1, 2, 4 and 8 columns per warp (test shapes
/// are too small for the chosen count to be more than one).
fn one_row_backends(dtype: Dtype) -> Vec<(u32, CudaBackend)> {
    let dev = device().unwrap();
    [1, 2, 4, 8]
        .map(|c| {
            let b = CudaBackend::new(dev.clone(), dtype).unwrap();
            (c, b.with_poison().with_one_row_columns(c))
        })
        .into()
}

/// splitmix64 values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn matrix(&mut self, rows: usize, cols: usize, scale: f32) -> HostMatrix {
        let data = (0..rows * cols).map(|_| self.next() * scale).collect();
        HostMatrix::new(rows, cols, data).unwrap()
    }

    /// A matrix whose values survive a round trip through `dtype`.
    fn weight(&mut self, rows: usize, cols: usize, dtype: Dtype) -> HostMatrix {
        let m = self.matrix(rows, cols, 0.2);
        HostMatrix::new(rows, cols, dtype.to_f32(&dtype.from_f32(&m.data))).unwrap()
    }
}

/// ‖got − want‖ / ‖want‖, failing on NaN or a shape mismatch.
fn close(what: &str, got: &HostMatrix, want: &HostMatrix, tol: f64) {
    assert_eq!(
        (got.rows, got.cols),
        (want.rows, want.cols),
        "{what}: shape"
    );
    assert!(
        got.data.iter().all(|v| v.is_finite()),
        "{what}: NaN or inf in the output"
    );
    let (mut d, mut n) = (0f64, 0f64);
    for (g, w) in got.data.iter().zip(&want.data) {
        d += f64::from(g - w).powi(2);
        n += f64::from(*w).powi(2);
    }
    let rel = (d / n.max(1e-30)).sqrt();
    assert!(rel <= tol, "{what}: ‖Δ‖/‖ref‖ = {rel:e} > {tol:e}");
}

/// f32 results of the same f32 arithmetic in another order.
const F32_TOL: f64 = 1e-5;
/// Activations rounded to bf16 for a tensor-core GEMM.
const BF16_ACT_TOL: f64 = 1e-2;

#[test]
fn linear_matches_on_every_path() {
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        let Some((cpu, gpu)) = backends(dtype) else {
            return;
        };
        let mut rng = Rng(1);
        for (m, k, n) in [
            (1, 64, 48),
            (1, 4104, 13),
            (1, 37, 5),
            (5, 200, 33),
            (16, 96, 70),
            (40, 128, 96),
            (3, 37, 5),
            (19, 64, 1),
            (63, 64, 32),
            (19, 48, 64),
            (300, 64, 40),
        ] {
            let x = rng.matrix(m, k, 1.0);
            let w = rng.weight(n, k, dtype);
            let bias = rng.matrix(1, n, 1.0);
            let want = cpu.linear(&x, &w, Some(&bias)).unwrap();
            let gx = gpu.upload_act(x.clone()).unwrap();
            let gw = gpu.upload(w.clone()).unwrap();
            let gb = gpu.upload(bias.clone()).unwrap();
            let got = gpu
                .download(&gpu.linear(&gx, &gw, Some(&gb)).unwrap())
                .unwrap();
            let tol = if m >= 256 && dtype == Dtype::BF16 {
                BF16_ACT_TOL
            } else {
                F32_TOL
            };
            close(
                &format!("linear {dtype:?} [{m},{k}]x[{n},{k}]"),
                &got,
                &want,
                tol,
            );
            let nobias = gpu.download(&gpu.linear(&gx, &gw, None).unwrap()).unwrap();
            close(
                "linear without bias",
                &nobias,
                &cpu.linear(&x, &w, None).unwrap(),
                tol,
            );
        }
        assert!(gpu
            .linear(
                &gpu.upload_act(rng.matrix(2, 3, 1.0)).unwrap(),
                &gpu.upload(rng.weight(4, 5, dtype)).unwrap(),
                None
            )
            .is_err());
    }
}

#[test]
fn norms_match_over_rows_and_heads() {
    let Some((cpu, gpu)) = backends(Dtype::BF16) else {
        return;
    };
    let mut rng = Rng(2);
    for (rows, cols, g) in [(3, 2048, 2048), (5, 256, 64), (1, 40, 8)] {
        let x = rng.matrix(rows, cols, 3.0);
        let delta = rng.matrix(rows, cols, 1.0);
        let w = rng.matrix(1, g, 1.0);
        let want = cpu.rms_norm(&x, &w, 1e-6).unwrap();
        let (gx, gw) = (
            gpu.upload_act(x.clone()).unwrap(),
            gpu.upload(w.clone()).unwrap(),
        );
        close(
            "rms_norm",
            &gpu.download(&gpu.rms_norm(&gx, &gw, 1e-6).unwrap())
                .unwrap(),
            &want,
            F32_TOL,
        );
        let mut cx = x.clone();
        let want = cpu.add_rms_norm(&mut cx, &delta, &w, 1e-5).unwrap();
        let mut gx = gpu.upload_act(x).unwrap();
        let gd = gpu.upload_act(delta).unwrap();
        let got = gpu.add_rms_norm(&mut gx, &gd, &gw, 1e-5).unwrap();
        close("add_rms_norm", &gpu.download(&got).unwrap(), &want, F32_TOL);
        close(
            "add_rms_norm residual",
            &gpu.download(&gx).unwrap(),
            &cx,
            F32_TOL,
        );
    }
}

#[test]
fn elementwise_ops_match() {
    let Some((cpu, gpu)) = backends(Dtype::BF16) else {
        return;
    };
    let mut rng = Rng(3);
    let (a, b) = (rng.matrix(7, 300, 4.0), rng.matrix(7, 300, 4.0));
    let (ga, gb) = (
        gpu.upload_act(a.clone()).unwrap(),
        gpu.upload_act(b.clone()).unwrap(),
    );
    close(
        "swiglu",
        &gpu.download(&gpu.swiglu(&ga, &gb).unwrap()).unwrap(),
        &cpu.swiglu(&a, &b).unwrap(),
        F32_TOL,
    );
    let mut ca = a.clone();
    cpu.clamp(&mut ca, 1.5).unwrap();
    let mut gc = gpu.upload_act(a.clone()).unwrap();
    gpu.clamp(&mut gc, 1.5).unwrap();
    close("clamp", &gpu.download(&gc).unwrap(), &ca, 0.0);

    let g = rng.matrix(7, 1, 3.0);
    let mut co = a.clone();
    cpu.add_gated(&mut co, &b, &g).unwrap();
    let mut go = gpu.upload_act(a.clone()).unwrap();
    gpu.add_gated(&mut go, &gb, &gpu.upload_act(g).unwrap())
        .unwrap();
    close("add_gated", &gpu.download(&go).unwrap(), &co, F32_TOL);

    let rows = [6, 0, 3, 3];
    close(
        "gather_rows",
        &gpu.download(&gpu.gather_rows(&ga, &rows).unwrap()).unwrap(),
        &cpu.gather_rows(&a, &rows).unwrap(),
        0.0,
    );
    assert!(gpu.gather_rows(&ga, &[7]).is_err());
    let z = gpu.download(&gpu.zeros(3, 5).unwrap()).unwrap();
    assert!(z.data.iter().all(|&v| v == 0.0));

    for dtype in [Dtype::F32, Dtype::BF16] {
        let Some((_, gpu)) = backends(dtype) else {
            return;
        };
        let table = rng.weight(50, 24, dtype);
        let ids = [3, 49, 0, 3];
        close(
            "embed",
            &gpu.download(
                &gpu.embed(&gpu.upload(table.clone()).unwrap(), &ids)
                    .unwrap(),
            )
            .unwrap(),
            &cpu.embed(&table, &ids).unwrap(),
            0.0,
        );
        assert!(gpu.embed(&gpu.upload(table).unwrap(), &[50]).is_err());
    }
}

#[test]
fn rope_matches_for_every_position() {
    let Some((cpu, gpu)) = backends(Dtype::BF16) else {
        return;
    };
    let mut rng = Rng(4);
    for (scaling, hd) in [
        (RopeScaling::Default, 64),
        (RopeScaling::Linear { factor: 4.0 }, 128),
    ] {
        let table = RopeSpec {
            theta: 10000.0,
            head_dim: hd,
            scaling,
        }
        .table();
        let x = rng.matrix(5, 4 * hd, 1.0);
        let positions = [0, 1, 7, 300, 4095];
        let mut cx = x.clone();
        cpu.rope(&mut cx, &positions, &table).unwrap();
        let mut gx = gpu.upload_act(x).unwrap();
        gpu.rope(&mut gx, &positions, &table).unwrap();
        close("rope", &gpu.download(&gx).unwrap(), &cx, F32_TOL);
    }
}

/// The fused q/k norm, clamp, RoPE and KV write against the CPU's separate ops: q itself, and
/// attention over the pool the keys and values went to. Shapes: OLMoE's (norms over the whole
/// projection, clamped), Qwen3's (per-head norms, GQA), neither (Mixtral), and rows too wide
/// for the kernel's shared memory (the separate ops).
#[test]
fn fused_attention_inputs_match_the_ops() {
    let Some((cpu, gpu)) = backends(Dtype::BF16) else {
        return;
    };
    let mut rng = Rng(9);
    for (heads, kv_heads, hd, norm, clip) in [
        (4, 4, 32, Some(128), Some(1.0)),
        (4, 2, 64, Some(64), None),
        (2, 1, 128, None, None),
        (104, 8, 128, Some(128), Some(2.0)),
    ] {
        for (rows, start) in [(1, 9), (6, 0)] {
            let layout = KvLayout {
                num_layers: 2,
                num_blocks: 6,
                block_size: 4,
                num_kv_heads: kv_heads,
                head_dim: hd,
            };
            let blocks = vec![3u32, 0, 5, 1];
            let positions: Vec<usize> = (start..start + rows).collect();
            let slots: Vec<usize> = positions
                .iter()
                .map(|&p| blocks[p / 4] as usize * 4 + p % 4)
                .collect();
            let table = RopeSpec {
                theta: 10000.0,
                head_dim: hd,
                scaling: RopeScaling::Default,
            }
            .table();
            let (q, k, v) = (
                rng.matrix(rows, heads * hd, 2.0),
                rng.matrix(rows, kv_heads * hd, 2.0),
                rng.matrix(rows, kv_heads * hd, 2.0),
            );
            let (qn, kn) = (
                norm.map(|g| rng.matrix(1, g.min(heads * hd), 1.0)),
                norm.map(|g| rng.matrix(1, g.min(kv_heads * hd), 1.0)),
            );
            let (gqn, gkn) = (
                qn.clone().map(|w| gpu.upload(w).unwrap()),
                kn.clone().map(|w| gpu.upload(w).unwrap()),
            );
            fn prep<'a, W>(
                norms: (Option<&'a W>, Option<&'a W>),
                clip: Option<f32>,
                (positions, slots): (&'a [usize], &'a [usize]),
                rope: &'a tileflow_engine::rope::RopeTable,
            ) -> QkvPrep<'a, W> {
                QkvPrep {
                    q_norm: norms.0,
                    k_norm: norms.1,
                    eps: 1e-6,
                    clip,
                    positions,
                    rope,
                    layer: 1,
                    slots,
                }
            }
            let at = (&positions[..], &slots[..]);
            let mut cpool = cpu.alloc_kv(&layout).unwrap();
            let want = cpu
                .prepare_attention(
                    [q.clone(), k.clone(), v.clone()],
                    &mut cpool,
                    &prep((qn.as_ref(), kn.as_ref()), clip, at, &table),
                )
                .unwrap();
            let mut gpool = gpu.alloc_kv(&layout).unwrap();
            let up = |m: &HostMatrix| gpu.upload_act(m.clone()).unwrap();
            let got = gpu
                .prepare_attention(
                    [up(&q), up(&k), up(&v)],
                    &mut gpool,
                    &prep((gqn.as_ref(), gkn.as_ref()), clip, at, &table),
                )
                .unwrap();
            let what = format!("{heads}/{kv_heads}x{hd} norm {norm:?} clip {clip:?}, {rows} rows");
            close(
                &format!("q of {what}"),
                &gpu.download(&got).unwrap(),
                &want,
                F32_TOL,
            );
            let plan = AttentionPlan {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: hd,
                scale: (hd as f32).powf(-0.5),
                sliding_window: None,
                chunks: vec![ChunkAttention {
                    first_row: 0,
                    rows,
                    start_pos: start,
                    blocks: blocks.clone(),
                }],
            };
            // Earlier positions' slots hold zeros in both pools; attention reads them all.
            let probe = rng.matrix(rows, heads * hd, 1.0);
            let want = cpu.attention(&probe, &cpool, 1, &plan).unwrap();
            let got = gpu.attention(&up(&probe), &gpool, 1, &plan).unwrap();
            close(
                &format!("keys and values of {what}"),
                &gpu.download(&got).unwrap(),
                &want,
                F32_TOL,
            );
        }
    }
}

#[test]
fn paged_attention_matches_for_prefill_decode_gqa_and_windows() {
    let Some((cpu, gpu)) = backends(Dtype::BF16) else {
        return;
    };
    let mut rng = Rng(5);
    for (heads, kv_heads, hd, window) in [(4, 2, 40, None), (8, 2, 128, Some(3)), (2, 2, 256, None)]
    {
        let layout = KvLayout {
            num_layers: 2,
            num_blocks: 12,
            block_size: 4,
            num_kv_heads: kv_heads,
            head_dim: hd,
        };
        let mut cpool = cpu.alloc_kv(&layout).unwrap();
        let mut gpool = gpu.alloc_kv(&layout).unwrap();
        // Sequence A: blocks 5, 2 (7 tokens of prefill); sequence B: blocks 0, 9, 1 (10 tokens
        // cached, then one decode token at position 10).
        let (a_blocks, b_blocks) = (vec![5u32, 2], vec![0u32, 9, 1]);
        let slot = |blocks: &[u32], p: usize| blocks[p / 4] as usize * 4 + p % 4;
        let b_slots: Vec<usize> = (0..10).map(|p| slot(&b_blocks, p)).collect();
        let (k, v) = (
            rng.matrix(10, kv_heads * hd, 1.0),
            rng.matrix(10, kv_heads * hd, 1.0),
        );
        cpu.write_kv(&mut cpool, 1, &k, &v, &b_slots).unwrap();
        let (gk, gv) = (gpu.upload_act(k).unwrap(), gpu.upload_act(v).unwrap());
        gpu.write_kv(&mut gpool, 1, &gk, &gv, &b_slots).unwrap();
        // The step: A's 7 tokens and B's one, written then attended.
        let mut slots: Vec<usize> = (0..7).map(|p| slot(&a_blocks, p)).collect();
        slots.push(slot(&b_blocks, 10));
        let (k, v) = (
            rng.matrix(8, kv_heads * hd, 1.0),
            rng.matrix(8, kv_heads * hd, 1.0),
        );
        cpu.write_kv(&mut cpool, 1, &k, &v, &slots).unwrap();
        let (gk, gv) = (gpu.upload_act(k).unwrap(), gpu.upload_act(v).unwrap());
        gpu.write_kv(&mut gpool, 1, &gk, &gv, &slots).unwrap();
        let plan = AttentionPlan {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            scale: (hd as f32).powf(-0.5),
            sliding_window: window,
            chunks: vec![
                ChunkAttention {
                    first_row: 0,
                    rows: 7,
                    start_pos: 0,
                    blocks: a_blocks.clone(),
                },
                ChunkAttention {
                    first_row: 7,
                    rows: 1,
                    start_pos: 10,
                    blocks: b_blocks.clone(),
                },
            ],
        };
        let q = rng.matrix(8, heads * hd, 1.0);
        let want = cpu.attention(&q, &cpool, 1, &plan).unwrap();
        let got = gpu
            .attention(&gpu.upload_act(q).unwrap(), &gpool, 1, &plan)
            .unwrap();
        close(
            &format!("attention {heads}/{kv_heads}x{hd} window {window:?}"),
            &gpu.download(&got).unwrap(),
            &want,
            F32_TOL,
        );
    }
}

#[test]
fn routing_matches_with_and_without_renormalisation() {
    let Some((cpu, gpu)) = backends(Dtype::BF16) else {
        return;
    };
    let mut rng = Rng(6);
    for (rows, e, k) in [(1, 64, 8), (9, 128, 8), (3, 8, 2), (2, 60, 4)] {
        let logits = rng.matrix(rows, e, 4.0);
        let g = gpu.upload_act(logits.clone()).unwrap();
        for renorm in [true, false] {
            let want = cpu.route(&logits, k, renorm).unwrap();
            let got = gpu.route(&g, k, renorm).unwrap();
            assert_eq!(got.experts, want.experts, "route {rows}x{e} top {k}");
            let gw = HostMatrix::new(1, got.weights.len(), got.weights).unwrap();
            let ww = HostMatrix::new(1, want.weights.len(), want.weights).unwrap();
            close("route weights", &gw, &ww, F32_TOL);
        }
    }
    assert!(gpu
        .route(&gpu.upload_act(rng.matrix(1, 4, 1.0)).unwrap(), 5, true)
        .is_err());
}

/// An expert's extent bytes (gate | up | down) in `dtype`, with its projections.
fn expert_bytes(
    rng: &mut Rng,
    h: usize,
    inter: usize,
    dtype: Dtype,
) -> (Vec<u8>, [ProjectionExtent; 3]) {
    let mut bytes = Vec::new();
    let mut ext = |shape: [usize; 2], bytes: &mut Vec<u8>| {
        let offset = bytes.len() as u64;
        let m = rng.weight(shape[0], shape[1], dtype);
        bytes.extend_from_slice(&dtype.from_f32(&m.data));
        ProjectionExtent { offset, shape }
    };
    let gate = ext([inter, h], &mut bytes);
    let up = ext([inter, h], &mut bytes);
    let down = ext([h, inter], &mut bytes);
    (bytes, [gate, up, down])
}

/// VRAM slots holding `experts`, filled through the tier memory's copy path from page-locked
/// memory (the arena must outlive the slots' use).
fn vram_experts(
    memory: &CudaTierMemory,
    experts: &[(Vec<u8>, [ProjectionExtent; 3])],
) -> (DmaArena, Vec<tileflow_gpu::cuda::CudaSlot>) {
    let len = experts[0].0.len();
    let host = memory
        .alloc_host(len.next_multiple_of(4096) * experts.len())
        .unwrap();
    let (arena, bufs) = DmaArena::new(host, len.next_multiple_of(4096), experts.len()).unwrap();
    let mut slots = Vec::new();
    for ((bytes, _), mut buf) in experts.iter().zip(bufs) {
        buf[..len].copy_from_slice(bytes);
        let mut slot = memory.alloc_device_slot(len).unwrap();
        let ev = memory.copy_to_device(&buf, 0..len, &mut slot, 0).unwrap();
        memory.wait(ev).unwrap();
        slots.push(slot);
    }
    (arena, slots)
}

#[test]
fn experts_match_from_host_bytes_and_from_vram_slots() {
    for dtype in [Dtype::F32, Dtype::BF16] {
        let Some((cpu, gpu)) = backends(dtype) else {
            return;
        };
        let dev = device().unwrap();
        let memory = CudaTierMemory::new(dev);
        let mut rng = Rng(7);
        let (h, inter, rows) = (96, 72, 11);
        let experts: Vec<_> = (0..5)
            .map(|_| expert_bytes(&mut rng, h, inter, dtype))
            .collect();
        let len = experts[0].0.len();
        let (_arena, slots) = vram_experts(&memory, &experts);
        // Expert e gets the rows where (row * 7 + e) % 3 == 0: some rows several experts,
        // some none, expert 4 every row.
        let assignment = |e: usize| -> Vec<usize> {
            (0..rows)
                .filter(|r| e == 4 || (r * 7 + e).is_multiple_of(3))
                .collect()
        };
        let work = |device: bool| -> Vec<ExpertWork<'_>> {
            [3usize, 0, 4, 1]
                .iter()
                .map(|&e| {
                    let (bytes, [gate, up, down]) = &experts[e];
                    let bytes = if device {
                        memory.device_bytes(&slots[e], len).unwrap()
                    } else {
                        ExpertBytes::Host(bytes)
                    };
                    let rows = assignment(e);
                    ExpertWork {
                        expert: e,
                        weights: ExpertRef {
                            bytes,
                            dtype,
                            gate: *gate,
                            up: *up,
                            down: *down,
                        },
                        scales: rows.iter().map(|r| 0.1 + *r as f32 * 0.05).collect(),
                        rows,
                    }
                })
                .collect()
        };
        let x = rng.matrix(rows, h, 1.0);
        let base = rng.matrix(rows, h, 0.5);
        let mut want = base.clone();
        cpu.experts(&x, &work(false), &mut want).unwrap();
        let gx = gpu.upload_act(x).unwrap();
        for device in [false, true] {
            let mut got = gpu.upload_act(base.clone()).unwrap();
            gpu.experts(&gx, &work(device), &mut got).unwrap();
            close(
                &format!(
                    "experts {dtype:?} from {}",
                    if device { "VRAM slots" } else { "host bytes" }
                ),
                &gpu.download(&got).unwrap(),
                &want,
                F32_TOL,
            );
        }
        // A projection that does not fit its bytes is an error naming the expert.
        let mut bad = work(false);
        bad[0].weights.down.offset = len as u64;
        let mut out = gpu.upload_act(base).unwrap();
        let err = gpu.experts(&gx, &bad, &mut out).unwrap_err().to_string();
        assert!(err.contains("expert 3"), "{err}");
    }
}

/// The host's grouping of a routing into expert work (as the forward pass does it).
fn work_of<'a>(routing: &Routing, refs: &[ExpertRef<'a>]) -> Vec<ExpertWork<'a>> {
    let mut by_expert: std::collections::BTreeMap<usize, (Vec<usize>, Vec<f32>)> =
        std::collections::BTreeMap::new();
    for (i, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
        let g = by_expert.entry(e as usize).or_default();
        g.0.push(i / routing.top_k);
        g.1.push(w);
    }
    by_expert
        .into_iter()
        .map(|(e, (rows, scales))| ExpertWork {
            expert: e,
            weights: refs[e],
            rows,
            scales,
        })
        .collect()
}

#[test]
fn device_routing_matches_host_routing_and_a_nan_router_adds_nothing() {
    for dtype in [Dtype::F32, Dtype::BF16] {
        let Some((cpu, gpu)) = backends(dtype) else {
            return;
        };
        let memory = CudaTierMemory::new(device().unwrap());
        let mut rng = Rng(11);
        // 520 columns: one column a block leaves the down kernel more groups than blocks.
        let (h, inter, ne) = (520, 72, 12);
        let experts: Vec<_> = (0..ne)
            .map(|_| expert_bytes(&mut rng, h, inter, dtype))
            .collect();
        let len = experts[0].0.len();
        let (_arena, slots) = vram_experts(&memory, &experts);
        let refs = |device: bool| -> Vec<ExpertRef<'_>> {
            experts
                .iter()
                .zip(&slots)
                .map(|((bytes, [gate, up, down]), slot)| ExpertRef {
                    bytes: if device {
                        memory.device_bytes(slot, len).unwrap()
                    } else {
                        ExpertBytes::Host(bytes)
                    },
                    dtype,
                    gate: *gate,
                    up: *up,
                    down: *down,
                })
                .collect()
        };
        assert!(gpu.expert_table(&refs(false)).unwrap().is_none());
        let table = gpu.expert_table(&refs(true)).unwrap().unwrap();
        for (rows, k, renorm) in [
            (1, 2, true),
            (1, 10, false),
            (11, 3, false),
            (16, 6, true),
            (40, 4, false),
            (200, 6, true),
        ] {
            let mut logits = rng.matrix(rows, ne, 3.0);
            let x = rng.matrix(rows, h, 1.0);
            let base = HostMatrix::zeros(rows, h);
            let routing = cpu.route(&logits, k, renorm).unwrap();
            let mut want = base.clone();
            cpu.experts(&x, &work_of(&routing, &refs(false)), &mut want)
                .unwrap();
            let gx = gpu.upload_act(x.clone()).unwrap();
            let mut log = gpu.routing_log(3, rows, k, renorm).unwrap();
            let gl = gpu.upload_act(logits.clone()).unwrap();
            let got = gpu.route_experts(&gl, &table, &gx, &mut log, 1).unwrap();
            let what = format!("device routing {dtype:?} {rows} rows top {k}");
            close(&what, &gpu.download(&got).unwrap(), &want, F32_TOL);
            if rows == 1 {
                for (c, forced) in one_row_backends(dtype) {
                    let mut log = forced.routing_log(1, rows, k, renorm).unwrap();
                    let got = forced.route_experts(&gl, &table, &gx, &mut log, 0).unwrap();
                    let what = format!("{what}, {c} columns per warp");
                    close(&what, &forced.download(&got).unwrap(), &want, F32_TOL);
                }
            }
            let back = gpu.read_routing_log(&log).unwrap();
            assert_eq!(back.len(), 3, "{what}");
            assert_eq!(back[1].experts, routing.experts, "{what}");
            let gw = HostMatrix::new(1, back[1].weights.len(), back[1].weights.clone()).unwrap();
            let ww = HostMatrix::new(1, routing.weights.len(), routing.weights.clone()).unwrap();
            close(&what, &gw, &ww, F32_TOL);

            // A router that saw NaN names no expert: its row gets zeros, the others theirs.
            let bad = rows / 2;
            logits.row_mut(bad).fill(f32::NAN);
            let gl = gpu.upload_act(logits).unwrap();
            let got = gpu.route_experts(&gl, &table, &gx, &mut log, 2).unwrap();
            let got = gpu.download(&got).unwrap();
            let back = gpu.read_routing_log(&log).unwrap();
            assert!(
                back[2].experts[bad * k..(bad + 1) * k]
                    .iter()
                    .all(|&e| e as usize >= ne),
                "{what}: {:?}",
                back[2].experts
            );
            assert_eq!(got.row(bad), base.row(bad), "{what}: the NaN row");
            for r in (0..rows).filter(|&r| r != bad) {
                let one = |m: &HostMatrix| HostMatrix::new(1, h, m.row(r).to_vec()).unwrap();
                close(&what, &one(&got), &one(&want), F32_TOL);
            }
        }
        // Shapes that do not fit the table or the log are errors, not launches.
        let mut log = gpu.routing_log(1, 2, 2, true).unwrap();
        let gl = gpu.upload_act(rng.matrix(2, ne + 1, 1.0)).unwrap();
        let gx = gpu.upload_act(rng.matrix(2, h, 1.0)).unwrap();
        assert!(gpu.route_experts(&gl, &table, &gx, &mut log, 0).is_err());
        let gl = gpu.upload_act(rng.matrix(2, ne, 1.0)).unwrap();
        assert!(gpu.route_experts(&gl, &table, &gx, &mut log, 1).is_err());
    }
}

/// The one-token matrix-vector kernels with every number of columns per warp: rows of x that
/// end inside a chunk (k = 64, 2056, 4104), column counts that leave a warp's last group
/// short, one to three matrices in one launch.
#[test]
fn one_row_products_match_for_every_column_count() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let Some((cpu, _)) = backends(dtype) else {
            return;
        };
        let mut rng = Rng(13);
        for (k, n) in [(64, 48), (4104, 13), (2056, 37), (520, 9)] {
            let x = rng.matrix(1, k, 1.0);
            let ws: Vec<HostMatrix> = [n, 24, 9]
                .iter()
                .map(|&n| rng.weight(n, k, dtype))
                .collect();
            for (c, gpu) in one_row_backends(dtype) {
                let gx = gpu.upload_act(x.clone()).unwrap();
                let gws: Vec<_> = ws.iter().map(|w| gpu.upload(w.clone()).unwrap()).collect();
                let what = format!("one row {dtype:?} k {k}, {c} columns per warp");
                let got = gpu.linear(&gx, &gws[0], None).unwrap();
                let want = cpu.linear(&x, &ws[0], None).unwrap();
                close(&what, &gpu.download(&got).unwrap(), &want, F32_TOL);
                let pairs: Vec<_> = gws.iter().map(|w| (w, None)).collect();
                let got = gpu.linears(&gx, &pairs).unwrap();
                for (i, g) in got.iter().enumerate() {
                    let want = cpu.linear(&x, &ws[i], None).unwrap();
                    close(
                        &format!("{what} #{i}"),
                        &gpu.download(g).unwrap(),
                        &want,
                        F32_TOL,
                    );
                }
            }
        }
    }
}

/// The norm computed inside the products' launch (one row, up to 4096 wide) against the CPU's
/// add_rms_norm (or rms_norm) then linears: the products, the normed row and the residual
/// stream; wider rows, two rows and an f32 matrix take the ops one after another.
#[test]
fn norm_linears_match_the_ops() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let Some((cpu, _)) = backends(dtype) else {
            return;
        };
        let mut rng = Rng(14);
        for (m, k, with_delta) in [
            (1, 64, true),
            (1, 2056, false),
            (1, 4096, true),
            (1, 4104, true),
            (2, 64, true),
        ] {
            let x = rng.matrix(m, k, 1.0);
            let delta = rng.matrix(m, k, 0.5);
            let norm = HostMatrix::new(1, k, rng.matrix(1, k, 1.0).data).unwrap();
            let ws: Vec<HostMatrix> = [37, 24, 9]
                .iter()
                .map(|&n| rng.weight(n, k, dtype))
                .collect();
            let bias = rng.matrix(1, 24, 1.0);
            let mut want_x = x.clone();
            let want_h = if with_delta {
                cpu.add_rms_norm(&mut want_x, &delta, &norm, 1e-6).unwrap()
            } else {
                cpu.rms_norm(&want_x, &norm, 1e-6).unwrap()
            };
            for (c, gpu) in one_row_backends(dtype) {
                let what = format!(
                    "norm_linears {dtype:?} [{m},{k}] delta {with_delta}, {c} columns per warp"
                );
                let mut gx = gpu.upload_act(x.clone()).unwrap();
                let gd = gpu.upload_act(delta.clone()).unwrap();
                let gn = gpu.upload(norm.clone()).unwrap();
                let gws: Vec<_> = ws.iter().map(|w| gpu.upload(w.clone()).unwrap()).collect();
                let gb = gpu.upload(bias.clone()).unwrap();
                for count in 1..=3 {
                    let pairs: Vec<_> = gws
                        .iter()
                        .take(count)
                        .enumerate()
                        .map(|(i, w)| (w, (i == 1).then_some(&gb)))
                        .collect();
                    let mut gx2 = gpu.upload_act(x.clone()).unwrap();
                    let (h, outs) = gpu
                        .norm_linears(&mut gx2, with_delta.then_some(&gd), (&gn, 1e-6), &pairs)
                        .unwrap();
                    close(
                        &format!("{what}: h"),
                        &gpu.download(&h).unwrap(),
                        &want_h,
                        F32_TOL,
                    );
                    close(
                        &format!("{what}: x"),
                        &gpu.download(&gx2).unwrap(),
                        &want_x,
                        F32_TOL,
                    );
                    assert_eq!(outs.len(), count, "{what}");
                    for (i, o) in outs.iter().enumerate() {
                        let want = cpu
                            .linear(&want_h, &ws[i], (i == 1).then_some(&bias))
                            .unwrap();
                        close(
                            &format!("{what} #{i}"),
                            &gpu.download(o).unwrap(),
                            &want,
                            F32_TOL,
                        );
                    }
                }
                // A weight of the wrong width is an error.
                let wrong = gpu.upload(rng.weight(4, k + 8, dtype)).unwrap();
                assert!(gpu
                    .norm_linears(&mut gx, Some(&gd), (&gn, 1e-6), &[(&wrong, None)])
                    .is_err());
            }
        }
    }
}

#[test]
fn fused_linears_match_one_by_one() {
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let Some((cpu, gpu)) = backends(dtype) else {
            return;
        };
        let mut rng = Rng(12);
        for (m, k) in [(1, 264), (1, 2056), (3, 264)] {
            let x = rng.matrix(m, k, 1.0);
            let ws: Vec<HostMatrix> = [40, 24, 9]
                .iter()
                .map(|&n| rng.weight(n, k, dtype))
                .collect();
            let bias = rng.matrix(1, 24, 1.0);
            let gx = gpu.upload_act(x.clone()).unwrap();
            let gws: Vec<_> = ws.iter().map(|w| gpu.upload(w.clone()).unwrap()).collect();
            let gb = gpu.upload(bias.clone()).unwrap();
            let pairs = [(&gws[0], None), (&gws[1], Some(&gb)), (&gws[2], None)];
            let got = gpu.linears(&gx, &pairs).unwrap();
            assert_eq!(got.len(), 3);
            for (i, g) in got.iter().enumerate() {
                let b = (i == 1).then_some(&bias);
                let want = cpu.linear(&x, &ws[i], b).unwrap();
                close(
                    &format!("linears {dtype:?} [{m},{k}] #{i}"),
                    &gpu.download(g).unwrap(),
                    &want,
                    F32_TOL,
                );
            }
            let wrong = gpu.upload(rng.weight(4, k + 8, dtype)).unwrap();
            assert!(gpu
                .linears(&gx, &[(&gws[0], None), (&wrong, None)])
                .is_err());
        }
    }
}

/// The logits' summary on the device against the sampler's own scan: argmax (the first of
/// equal maxima), maximum, log-sum-exp; rows the sampler would refuse (a NaN, +∞, every token
/// masked) get none.
#[test]
fn logit_summaries_match_the_samplers_scan() {
    let Some((_, gpu)) = backends(Dtype::BF16) else {
        return;
    };
    let mut rng = Rng(12);
    let vocab = 50_304;
    let mut m = rng.matrix(6, vocab, 8.0);
    m.row_mut(1)[777] = 20.0;
    m.row_mut(1)[40_000] = 20.0;
    m.row_mut(2)[..30_000].fill(f32::NEG_INFINITY);
    m.row_mut(3)[123] = f32::NAN;
    m.row_mut(4)[9] = f32::INFINITY;
    m.row_mut(5).fill(f32::NEG_INFINITY);
    let got = gpu
        .logit_summaries(&gpu.upload_act(m.clone()).unwrap())
        .unwrap()
        .expect("the CUDA backend summarises logits");
    assert_eq!(got.len(), 6);
    for (r, g) in got.iter().enumerate() {
        match LogitSummary::scan(m.row(r)) {
            Ok(want) => {
                let g = g.unwrap_or_else(|| panic!("row {r}: no summary"));
                assert_eq!((g.argmax, g.max), (want.argmax, want.max), "row {r}");
                assert!(
                    (g.log_sum_exp - want.log_sum_exp).abs() < 1e-6,
                    "row {r}: {} vs {}",
                    g.log_sum_exp,
                    want.log_sum_exp
                );
            }
            Err(_) => assert!(g.is_none(), "row {r}: {g:?}"),
        }
    }
    assert_eq!(got[1].unwrap().argmax, 777);
}
