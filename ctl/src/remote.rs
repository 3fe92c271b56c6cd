//! Commands through the daemon: `status`, `ps`, `model list|show|import|load|unload|rm`.

use std::path::Path;

use anyhow::Context;
use tileflow_client::blocking::Client;
use tileflow_client::native::{CacheReport, ImportProgress, ImportRequest, ModelSummary};

use crate::cli::ImportArgs;
use crate::output::{
    byte_bar, fields, human_bytes, human_duration, human_seconds, percent, print_json, table,
};

/// A client of the daemon on `socket`.
pub fn connect(socket: &Path) -> anyhow::Result<Client> {
    Ok(Client::new(socket)?)
}

/// `tilectl status`.
pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let status = connect(socket)?.status()?;
    if json {
        return print_json(&status);
    }
    let names: Vec<&str> = status.models.iter().map(|m| m.name.as_str()).collect();
    fields(&[
        (
            "daemon",
            format!("tileflowd {} on {}", status.version, socket.display()),
        ),
        ("device", status.device.clone()),
        ("uptime", human_duration(status.uptime_seconds)),
        (
            "state dir",
            status.state_dir.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "models",
            if names.is_empty() {
                "none loaded".into()
            } else {
                format!("{} loaded ({})", names.len(), names.join(", "))
            },
        ),
        (
            "requests",
            format!(
                "{} running, {} waiting",
                status.models.iter().map(|m| m.running).sum::<usize>(),
                status.models.iter().map(|m| m.waiting).sum::<usize>()
            ),
        ),
    ]);
    Ok(())
}

/// `tilectl ps`: loaded models with queue, KV and expert cache state.
pub fn ps(socket: &Path, json: bool) -> anyhow::Result<()> {
    let models = connect(socket)?.status()?.models;
    if json {
        return print_json(&models);
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            let used = m.kv_blocks.saturating_sub(m.kv_free_blocks);
            let lookups = m.expert_hits + m.expert_misses;
            vec![
                m.name.clone(),
                m.running.to_string(),
                m.waiting.to_string(),
                format!(
                    "{used}/{} ({})",
                    m.kv_blocks,
                    percent(used as u64, m.kv_blocks as u64)
                ),
                m.expert_slots.to_string(),
                percent(m.expert_hits, lookups),
                m.expert_evictions.to_string(),
                human_bytes(m.expert_bytes_read),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "RUNNING",
            "WAITING",
            "KV BLOCKS",
            "EXPERT SLOTS",
            "HIT RATIO",
            "EVICTIONS",
            "READ",
        ],
        &rows,
    );
    Ok(())
}

/// `tilectl model list` through the daemon.
pub fn list(socket: &Path, json: bool) -> anyhow::Result<()> {
    let models = connect(socket)?.list_models()?;
    if json {
        return print_json(&models);
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.family.clone(),
                format!(
                    "{}x{}/{}",
                    m.layers, m.experts_per_layer, m.experts_per_token
                ),
                m.expert_dtype.clone(),
                human_bytes(m.disk_bytes),
                if m.loaded { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "FAMILY",
            "LAYERS x EXPERTS/TOPK",
            "DTYPE",
            "SIZE",
            "LOADED",
        ],
        &rows,
    );
    Ok(())
}

/// `tilectl model show NAME` through the daemon.
pub fn show(socket: &Path, name: &str, json: bool) -> anyhow::Result<()> {
    let m: ModelSummary = connect(socket)?.show_model(name)?;
    if json {
        return print_json(&m);
    }
    let spec = m.spec.clone().unwrap_or_default();
    let get = |k: &str| spec.get(k).map(compact).unwrap_or_else(|| "-".into());
    fields(&[
        ("name", m.name.clone()),
        ("family", m.family.clone()),
        ("loaded", if m.loaded { "yes" } else { "no" }.into()),
        ("layers", m.layers.to_string()),
        (
            "experts",
            format!(
                "{} per layer, top {}",
                m.experts_per_layer, m.experts_per_token
            ),
        ),
        ("hidden", get("hidden_size")),
        ("vocab", get("vocab_size")),
        ("context", get("max_position_embeddings")),
        ("expert dtype", m.expert_dtype.clone()),
        ("expert bytes", human_bytes(m.expert_bytes)),
        ("disk", human_bytes(m.disk_bytes)),
        ("source", m.source.clone()),
    ]);
    Ok(())
}

fn compact(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `tilectl model import DIR` through the daemon: NDJSON progress as a bar on stderr.
pub fn import(socket: &Path, args: ImportArgs) -> anyhow::Result<()> {
    // The daemon resolves paths from its own working directory: send an absolute one.
    let path = args
        .dir
        .canonicalize()
        .with_context(|| format!("cannot import {}", args.dir.display()))?;
    let client = connect(socket)?;
    let bar = byte_bar("importing");
    let progress = |p: &ImportProgress| {
        if let (Some(done), Some(total)) = (p.done_bytes, p.total_bytes) {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let request = ImportRequest {
        path: path.clone(),
        name: args.name,
    };
    // The daemon's errors name the directory and the file that failed.
    let result = client.import_model(&request, progress);
    bar.finish_and_clear();
    let name = result?;
    eprintln!(
        "imported {name} from {} through {}",
        path.display(),
        socket.display()
    );
    Ok(())
}

/// `tilectl model load NAME…`.
pub fn load(socket: &Path, names: &[String]) -> anyhow::Result<()> {
    let client = connect(socket)?;
    for name in names {
        client
            .load_model(name)
            .with_context(|| format!("cannot load {name}"))?;
        eprintln!("loaded {name}");
    }
    Ok(())
}

/// `tilectl model unload NAME…`.
pub fn unload(socket: &Path, names: &[String]) -> anyhow::Result<()> {
    let client = connect(socket)?;
    for name in names {
        client
            .unload_model(name)
            .with_context(|| format!("cannot unload {name}"))?;
        eprintln!("unloaded {name}");
    }
    Ok(())
}

/// `tilectl model rm NAME…` through the daemon.
pub fn rm(socket: &Path, names: &[String]) -> anyhow::Result<()> {
    let client = connect(socket)?;
    for name in names {
        client
            .remove_model(name)
            .with_context(|| format!("cannot remove {name}"))?;
        eprintln!("removed {name}");
    }
    Ok(())
}

/// `GET /api/cache` as a table, one row per model and tier, then one line per model with its
/// storage path, prefetch outcomes, stall time and failures.
pub fn cache_table(report: &CacheReport) {
    let rows: Vec<Vec<String>> = report
        .models
        .iter()
        .flat_map(|m| {
            m.tiers.iter().map(|t| {
                vec![
                    m.model.clone(),
                    t.tier.clone(),
                    t.slots.to_string(),
                    format!(
                        "{}/{}",
                        human_bytes(t.resident_bytes),
                        human_bytes(t.budget_bytes)
                    ),
                    t.hits.to_string(),
                    t.misses.to_string(),
                    percent(t.hits, t.hits + t.misses),
                    t.evictions.to_string(),
                ]
            })
        })
        .collect();
    table(
        &[
            "MODEL",
            "TIER",
            "SLOTS",
            "RESIDENT",
            "HITS",
            "MISSES",
            "HIT RATIO",
            "EVICTIONS",
        ],
        &rows,
    );
    for m in &report.models {
        let p = &m.prefetch;
        let outcomes = p.used + p.wasted + p.late;
        println!(
            "{}: {} read ({}{}), {} host→device; policy {}, tiles {}, prefetch depth {}: \
             {} issued, used {}, wasted {}, late {}; stalled {}; {} checksum and {} read failures",
            m.model,
            human_bytes(m.bytes_read),
            m.storage.backend,
            if m.storage.direct { ", O_DIRECT" } else { "" },
            human_bytes(m.h2d_bytes),
            m.policy,
            human_bytes(m.tile_size),
            m.prefetch_depth,
            p.issued,
            percent(p.used, outcomes),
            percent(p.wasted, outcomes),
            percent(p.late, outcomes),
            human_seconds(m.stall_seconds),
            m.checksum_failures,
            m.read_failures,
        );
    }
}
