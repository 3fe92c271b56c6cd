//! `tilectl model …`: the offline model store commands.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use tileflow_engine::pack::import::CheckpointSource;
use tileflow_engine::pack::write::{write_pack, PackSource, Progress};
use tileflow_engine::store::{Store, StoredModel};
use tileflow_engine::synth::Synth;

use crate::cli::{ImportArgs, SynthArgs};
use crate::output::{byte_bar, human_bytes, table};

/// Writes `source` into the store as `name`, with a progress bar; prints a one-line summary.
fn pack_into_store(
    state_dir: &Path,
    name: &str,
    source: &dyn PackSource,
    what: &str,
) -> anyhow::Result<()> {
    let store = Store::new(state_dir);
    let txn = store.begin(name)?;
    let bar = byte_bar(what);
    let started = Instant::now();
    let progress = |p: Progress| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    };
    let manifest = write_pack(source, name, txn.dir(), &progress)?;
    let dest = txn.commit()?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let bytes = store.get(name).map(|m| m.disk_bytes).unwrap_or(0);
    eprintln!(
        "{what} {name}: {} experts, {} in {:.1} s ({}/s) -> {}",
        manifest.experts.len(),
        human_bytes(bytes),
        secs,
        human_bytes((bytes as f64 / secs.max(1e-9)) as u64),
        dest.display()
    );
    Ok(())
}

/// `tilectl model import DIR [--name NAME]`.
pub fn import(state_dir: &Path, args: ImportArgs) -> anyhow::Result<()> {
    let name = match args.name {
        Some(n) => n,
        None => args
            .dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .with_context(|| {
                format!(
                    "cannot name a model after {}; pass --name",
                    args.dir.display()
                )
            })?,
    };
    Store::check_name(&name)?;
    let source = CheckpointSource::open(&args.dir)
        .with_context(|| format!("cannot import {}", args.dir.display()))?;
    pack_into_store(state_dir, &name, &source, "importing")
}

/// `tilectl model synth --preset P (--out DIR | --name NAME)`.
pub fn synth(state_dir: &Path, args: SynthArgs) -> anyhow::Result<()> {
    let synth = Synth::with_layers(&args.preset, args.layers, args.seed, args.route_skew)?;
    match (&args.out, &args.name) {
        (Some(out), None) => {
            if out.exists()
                && out
                    .read_dir()
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                bail!("{} exists and is not empty", out.display());
            }
            let bar = byte_bar("synthesizing");
            let progress = |p: Progress| {
                bar.set_length(p.total);
                bar.set_position(p.done);
            };
            synth.write_checkpoint(out, &progress)?;
            bar.finish_and_clear();
            eprintln!(
                "synthesized {} checkpoint -> {}",
                args.preset,
                out.display()
            );
            Ok(())
        }
        (None, Some(name)) => pack_into_store(state_dir, name, &synth, "synthesizing"),
        _ => bail!("give exactly one of --out DIR and --name NAME"),
    }
}

fn summary(m: &StoredModel) -> serde_json::Value {
    m.summary_json()
}

/// `tilectl model list [--json]`.
pub fn list(state_dir: &Path, as_json: bool) -> anyhow::Result<()> {
    let store = Store::new(state_dir);
    let mut models = Vec::new();
    for entry in store.list()? {
        match entry {
            Ok(m) => models.push(m),
            Err(e) => eprintln!("tilectl: warning: {e}"),
        }
    }
    if as_json {
        let v: Vec<_> = models.iter().map(summary).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            let s = &m.manifest.spec;
            vec![
                m.name.clone(),
                s.family.model_type().to_string(),
                format!("{}x{}/{}", s.num_layers(), s.moe.num_experts, s.moe.top_k),
                m.manifest.expert_dtype.to_string(),
                human_bytes(m.disk_bytes),
            ]
        })
        .collect();
    table(
        &["NAME", "FAMILY", "LAYERS x EXPERTS/TOPK", "DTYPE", "SIZE"],
        &rows,
    );
    Ok(())
}

/// `tilectl model show NAME [--json]`.
pub fn show(state_dir: &Path, name: &str, as_json: bool) -> anyhow::Result<()> {
    let m = Store::new(state_dir).get(name)?;
    if as_json {
        let mut v = summary(&m);
        v["spec"] = serde_json::to_value(&m.manifest.spec)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = &m.manifest.spec;
    let expert_bytes: u64 = m.manifest.experts.iter().map(|x| x.bytes).sum();
    let rows = vec![
        vec!["family".into(), s.family.model_type().into()],
        vec![
            "layers".into(),
            format!(
                "{} ({} with routed experts)",
                s.num_layers(),
                s.moe_layers().count()
            ),
        ],
        vec!["hidden".into(), s.hidden_size.to_string()],
        vec![
            "heads".into(),
            format!(
                "{} q, {} kv, head_dim {}",
                s.num_heads, s.num_kv_heads, s.head_dim
            ),
        ],
        vec![
            "experts".into(),
            format!(
                "{} per layer, top {}, intermediate {}",
                s.moe.num_experts, s.moe.top_k, s.moe.expert_intermediate
            ),
        ],
        vec![
            "shared expert".into(),
            s.moe
                .shared_expert
                .map_or("no".into(), |x| format!("intermediate {}", x.intermediate)),
        ],
        vec!["vocab".into(), s.vocab_size.to_string()],
        vec!["context".into(), s.max_position_embeddings.to_string()],
        vec![
            "rope".into(),
            format!("theta {} {:?}", s.rope.theta, s.rope.scaling),
        ],
        vec!["expert dtype".into(), m.manifest.expert_dtype.to_string()],
        vec!["expert bytes".into(), human_bytes(expert_bytes)],
        vec!["disk".into(), human_bytes(m.disk_bytes)],
        vec!["source".into(), m.manifest.source.clone()],
        vec!["path".into(), m.dir.display().to_string()],
    ];
    table(&["FIELD", "VALUE"], &rows);
    Ok(())
}

/// `tilectl model rm NAME…`.
pub fn rm(state_dir: &Path, names: &[String]) -> anyhow::Result<()> {
    let store = Store::new(state_dir);
    for name in names {
        store.remove(name)?;
        eprintln!("removed {name}");
    }
    Ok(())
}
