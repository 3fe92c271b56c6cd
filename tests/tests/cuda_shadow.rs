//! Every op of real fixture models run on the CUDA backend and the CPU reference side by side
//! (a backend that runs both and compares each result): the first op whose results part is
//! named, with its layer and step, instead of a wrong token at the end.
//!
//! Runs where there is a GPU (the GPU host); elsewhere it says so and passes.
#![cfg(feature = "cuda")]

use std::cell::RefCell;

use tileflow_engine::backend::cpu::{CpuBackend, CpuKvPool};
use tileflow_engine::backend::{
    AttentionPlan, Backend, BackendError, ExpertWork, HostMatrix, QkvPrep, Routing,
};
use tileflow_engine::forward::{KvCacheConfig, ModelRunner, SeqChunk};
use tileflow_engine::kv::KvLayout;
use tileflow_engine::model::DenseLoader;
use tileflow_engine::pack::manifest::DENSE_FILE;
use tileflow_engine::rope::RopeTable;
use tileflow_engine::store::Store;
use tileflow_gpu::{CudaBackend, CudaDevice};
use tileflow_tests::engine_help::PackExperts;
use tileflow_tests::greedy::import_fixture;
use tileflow_tests::{golden_cases, FAMILIES};

/// Runs every op on both backends and records where their results part.
#[derive(Debug)]
struct Shadow {
    cpu: CpuBackend,
    gpu: CudaBackend,
    ops: RefCell<usize>,
    worst: RefCell<Vec<(f64, String)>>,
}

type Pair = (HostMatrix, tileflow_gpu::cuda::CudaAct);

impl Shadow {
    fn compare(&self, op: &str, cpu: &HostMatrix, gpu: &tileflow_gpu::cuda::CudaAct) {
        let got = self.gpu.download(gpu).unwrap();
        let (mut d, mut n) = (0f64, 0f64);
        for (g, w) in got.data.iter().zip(&cpu.data) {
            d += f64::from(g - w).powi(2);
            n += f64::from(*w).powi(2);
        }
        let rel = if got.data.iter().all(|v| v.is_finite()) {
            (d / n.max(1e-30)).sqrt()
        } else {
            f64::INFINITY
        };
        let mut i = self.ops.borrow_mut();
        *i += 1;
        if rel > 1e-4 {
            self.worst
                .borrow_mut()
                .push((rel, format!("op #{} {op} [{}, {}]", *i, cpu.rows, cpu.cols)));
        }
    }

    fn pair(&self, op: &str, c: HostMatrix, g: tileflow_gpu::cuda::CudaAct) -> Pair {
        self.compare(op, &c, &g);
        (c, g)
    }
}

impl Backend for Shadow {
    type Weight = (HostMatrix, tileflow_gpu::cuda::CudaWeight);
    type Act = Pair;
    type KvPool = (CpuKvPool, tileflow_gpu::cuda::CudaKvPool);
    type ExpertTable = ();
    type RoutingLog = ();

    fn name(&self) -> String {
        "shadow".into()
    }
    fn upload(&self, w: HostMatrix) -> Result<Self::Weight, BackendError> {
        Ok((w.clone(), self.gpu.upload(w)?))
    }
    fn upload_act(&self, a: HostMatrix) -> Result<Pair, BackendError> {
        Ok((a.clone(), self.gpu.upload_act(a)?))
    }
    fn download(&self, a: &Pair) -> Result<HostMatrix, BackendError> {
        Ok(a.0.clone())
    }
    fn alloc_kv(&self, l: &KvLayout) -> Result<Self::KvPool, BackendError> {
        Ok((self.cpu.alloc_kv(l)?, self.gpu.alloc_kv(l)?))
    }
    fn embed(&self, t: &Self::Weight, ids: &[u32]) -> Result<Pair, BackendError> {
        Ok(self.pair(
            "embed",
            self.cpu.embed(&t.0, ids)?,
            self.gpu.embed(&t.1, ids)?,
        ))
    }
    fn rms_norm(&self, x: &Pair, w: &Self::Weight, eps: f32) -> Result<Pair, BackendError> {
        let c = self.cpu.rms_norm(&x.0, &w.0, eps)?;
        Ok(self.pair("rms_norm", c, self.gpu.rms_norm(&x.1, &w.1, eps)?))
    }
    fn add_rms_norm(
        &self,
        x: &mut Pair,
        d: &Pair,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Pair, BackendError> {
        let c = self.cpu.add_rms_norm(&mut x.0, &d.0, &w.0, eps)?;
        let g = self.gpu.add_rms_norm(&mut x.1, &d.1, &w.1, eps)?;
        self.compare("add_rms_norm residual", &x.0, &x.1);
        Ok(self.pair("add_rms_norm", c, g))
    }
    fn linear(
        &self,
        x: &Pair,
        w: &Self::Weight,
        b: Option<&Self::Weight>,
    ) -> Result<Pair, BackendError> {
        let c = self.cpu.linear(&x.0, &w.0, b.map(|b| &b.0))?;
        let g = self.gpu.linear(&x.1, &w.1, b.map(|b| &b.1))?;
        Ok(self.pair(
            &format!("linear [{}, {}] bias {}", w.0.rows, w.0.cols, b.is_some()),
            c,
            g,
        ))
    }
    fn clamp(&self, x: &mut Pair, l: f32) -> Result<(), BackendError> {
        self.cpu.clamp(&mut x.0, l)?;
        self.gpu.clamp(&mut x.1, l)?;
        self.compare("clamp", &x.0, &x.1);
        Ok(())
    }
    fn rope(&self, x: &mut Pair, p: &[usize], t: &RopeTable) -> Result<(), BackendError> {
        self.cpu.rope(&mut x.0, p, t)?;
        self.gpu.rope(&mut x.1, p, t)?;
        self.compare("rope", &x.0, &x.1);
        Ok(())
    }
    fn write_kv(
        &self,
        pool: &mut Self::KvPool,
        layer: usize,
        k: &Pair,
        v: &Pair,
        slots: &[usize],
    ) -> Result<(), BackendError> {
        self.cpu.write_kv(&mut pool.0, layer, &k.0, &v.0, slots)?;
        self.gpu.write_kv(&mut pool.1, layer, &k.1, &v.1, slots)
    }
    fn prepare_attention(
        &self,
        [q, k, v]: [Pair; 3],
        pool: &mut Self::KvPool,
        p: &QkvPrep<'_, Self::Weight>,
    ) -> Result<Pair, BackendError> {
        let c = self
            .cpu
            .prepare_attention([q.0, k.0, v.0], &mut pool.0, &p.map(|w| &w.0))?;
        let g = self
            .gpu
            .prepare_attention([q.1, k.1, v.1], &mut pool.1, &p.map(|w| &w.1))?;
        Ok(self.pair("prepare_attention", c, g))
    }
    fn attention(
        &self,
        q: &Pair,
        pool: &Self::KvPool,
        layer: usize,
        plan: &AttentionPlan,
    ) -> Result<Pair, BackendError> {
        let c = self.cpu.attention(&q.0, &pool.0, layer, plan)?;
        let g = self.gpu.attention(&q.1, &pool.1, layer, plan)?;
        Ok(self.pair(&format!("attention layer {layer} {plan:?}"), c, g))
    }
    fn route(&self, l: &Pair, k: usize, r: bool) -> Result<Routing, BackendError> {
        let c = self.cpu.route(&l.0, k, r)?;
        let g = self.gpu.route(&l.1, k, r)?;
        if c.experts != g.experts {
            self.worst.borrow_mut().push((
                f64::INFINITY,
                format!("route: {:?} vs {:?}", c.experts, g.experts),
            ));
        }
        Ok(c)
    }
    fn swiglu(&self, a: &Pair, b: &Pair) -> Result<Pair, BackendError> {
        Ok(self.pair(
            "swiglu",
            self.cpu.swiglu(&a.0, &b.0)?,
            self.gpu.swiglu(&a.1, &b.1)?,
        ))
    }
    fn experts(
        &self,
        x: &Pair,
        work: &[ExpertWork<'_>],
        out: &mut Pair,
    ) -> Result<(), BackendError> {
        self.cpu.experts(&x.0, work, &mut out.0)?;
        self.gpu.experts(&x.1, work, &mut out.1)?;
        self.compare("experts", &out.0, &out.1);
        Ok(())
    }
    fn add_gated(&self, o: &mut Pair, y: &Pair, g: &Pair) -> Result<(), BackendError> {
        self.cpu.add_gated(&mut o.0, &y.0, &g.0)?;
        self.gpu.add_gated(&mut o.1, &y.1, &g.1)?;
        self.compare("add_gated", &o.0, &o.1);
        Ok(())
    }
    fn add(&self, x: &mut Pair, y: &Pair) -> Result<(), BackendError> {
        self.cpu.add(&mut x.0, &y.0)?;
        self.gpu.add(&mut x.1, &y.1)?;
        self.compare("add", &x.0, &x.1);
        Ok(())
    }
    fn zeros(&self, r: usize, c: usize) -> Result<Pair, BackendError> {
        Ok((self.cpu.zeros(r, c)?, self.gpu.zeros(r, c)?))
    }
    fn gather_rows(&self, x: &Pair, rows: &[usize]) -> Result<Pair, BackendError> {
        let c = self.cpu.gather_rows(&x.0, rows)?;
        Ok(self.pair("gather_rows", c, self.gpu.gather_rows(&x.1, rows)?))
    }
}

#[test]
fn every_op_of_every_fixture_agrees_with_the_cpu() {
    let dev = match tileflow_gpu::probe() {
        Ok(gpus) if !gpus.is_empty() => CudaDevice::open(0, None).unwrap(),
        other => {
            eprintln!("no GPU here ({other:?}): skipped");
            return;
        }
    };
    let state = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for family in FAMILIES {
        import_fixture(state.path(), family);
        let stored = Store::new(state.path()).get(family).unwrap();
        let mut dense = DenseLoader::open(&stored.dir.join(DENSE_FILE)).unwrap();
        let manifest = stored.manifest;
        let experts = PackExperts::read(&stored.dir, manifest.clone()).unwrap();
        let shadow = Shadow {
            cpu: CpuBackend::new(),
            gpu: CudaBackend::new(dev.clone(), manifest.expert_dtype)
                .unwrap()
                .with_poison(),
            ops: RefCell::new(0),
            worst: RefCell::new(Vec::new()),
        };
        let mut runner = ModelRunner::load(
            manifest.spec.clone(),
            shadow,
            &mut dense,
            experts,
            KvCacheConfig::default(),
        )
        .unwrap();
        for (i, case) in golden_cases(family).iter().enumerate() {
            let prompt = &case.prompt_ids;
            runner.add_sequence(i as u64).unwrap();
            runner.step(&[SeqChunk::new(i as u64, prompt, 0)]).unwrap();
            runner.free_sequence(i as u64).unwrap();
            let mut worst = runner.backend().worst.borrow_mut();
            if !worst.is_empty() {
                let first: Vec<String> = worst.iter().take(8).map(|w| format!("{w:?}")).collect();
                report.push(format!(
                    "{family} case {i} ({} tokens): {} ops off, first {}",
                    prompt.len(),
                    worst.len(),
                    first.join("; ")
                ));
            }
            worst.clear();
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}
