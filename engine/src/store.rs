//! The model store: tile packs under `<state_dir>/models/<name>/`.
//!
//! A pack is written into a hidden temporary directory beside its final place, fsynced and then
//! renamed, so a crash never leaves a half pack under the final name.

use std::fs;
use std::path::{Path, PathBuf};

use crate::pack::manifest::{Manifest, ManifestError, MANIFEST_FILE};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A model name that could not be a directory name.
    #[error("invalid model name {name:?}: use letters, digits, '.', '_', '-' and ':' (not leading '.'), at most 128")]
    BadName {
        /// The name given.
        name: String,
    },
    /// No such model.
    #[error("no model named {name:?} in {dir}")]
    NotFound {
        /// The name given.
        name: String,
        /// The models directory.
        dir: String,
    },
    /// The name is taken.
    #[error("a model named {name:?} already exists in {dir} (remove it first with `tilectl model rm {name}`)")]
    Exists {
        /// The name given.
        name: String,
        /// The models directory.
        dir: String,
    },
    /// File system trouble.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A pack whose manifest is unreadable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// The default state directory: `/var/lib/tileflow` as root, else the XDG data directory.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/tileflow");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("tileflow");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/tileflow"),
        None => PathBuf::from("/var/lib/tileflow"),
    }
}

fn is_root() -> bool {
    // /proc/self/status has "Uid: real effective saved fs"; avoids an unsafe libc call here.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A model store rooted at a state directory.
#[derive(Debug, Clone)]
pub struct Store {
    models: PathBuf,
}

/// A summary of one stored model.
#[derive(Debug, Clone)]
pub struct StoredModel {
    /// Its name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Bytes on disk (all files of the pack).
    pub disk_bytes: u64,
}

impl StoredModel {
    /// The summary `tilectl model list --json` and `GET /api/models` show.
    pub fn summary_json(&self) -> serde_json::Value {
        let spec = &self.manifest.spec;
        serde_json::json!({
            "name": self.name,
            "family": spec.family.model_type(),
            "layers": spec.num_layers(),
            "experts_per_layer": spec.moe.num_experts,
            "experts_per_token": spec.moe.top_k,
            "expert_dtype": self.manifest.expert_dtype,
            "expert_bytes": self.manifest.experts.iter().map(|x| x.bytes).sum::<u64>(),
            "disk_bytes": self.disk_bytes,
            "source": self.manifest.source,
            "path": self.dir,
        })
    }
}

impl Store {
    /// The store under `state_dir` (created on first write).
    pub fn new(state_dir: &Path) -> Store {
        Store {
            models: state_dir.join("models"),
        }
    }

    /// `<state_dir>/models`.
    pub fn models_dir(&self) -> &Path {
        &self.models
    }

    /// Checks a model name.
    pub fn check_name(name: &str) -> Result<(), StoreError> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(StoreError::BadName {
                name: name.to_string(),
            })
        }
    }

    /// The directory a model lives in.
    pub fn model_dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        Store::check_name(name)?;
        Ok(self.models.join(name))
    }

    /// Opens a stored model's manifest.
    pub fn get(&self, name: &str) -> Result<StoredModel, StoreError> {
        let dir = self.model_dir(name)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.exists() {
            return Err(StoreError::NotFound {
                name: name.into(),
                dir: self.models.display().to_string(),
            });
        }
        let manifest = Manifest::read(&manifest_path)?;
        let disk_bytes = dir_bytes(&dir)?;
        Ok(StoredModel {
            name: name.to_string(),
            dir,
            manifest,
            disk_bytes,
        })
    }

    /// All models, sorted by name. Hidden (temporary) directories are skipped; a directory
    /// whose manifest is broken is reported as an error for that model.
    pub fn list(&self) -> Result<Vec<Result<StoredModel, StoreError>>, StoreError> {
        let entries = match fs::read_dir(&self.models) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("cannot list", &self.models)(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names.iter().map(|n| self.get(n)).collect())
    }

    /// Removes a model.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.model_dir(name)?;
        if !dir.exists() {
            return Err(StoreError::NotFound {
                name: name.into(),
                dir: self.models.display().to_string(),
            });
        }
        fs::remove_dir_all(&dir).map_err(io("cannot remove", &dir))
    }

    /// Starts writing a new pack named `name`: a fresh temporary directory in the store.
    pub fn begin(&self, name: &str) -> Result<PackTxn, StoreError> {
        let dest = self.model_dir(name)?;
        if dest.exists() {
            return Err(StoreError::Exists {
                name: name.into(),
                dir: self.models.display().to_string(),
            });
        }
        fs::create_dir_all(&self.models).map_err(io("cannot create", &self.models))?;
        let tmp = self
            .models
            .join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io("cannot clear", &tmp))?;
        }
        fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
        Ok(PackTxn {
            tmp,
            dest,
            done: false,
        })
    }
}

/// A pack being written. Dropped without [`PackTxn::commit`], it removes its temporary directory.
#[derive(Debug)]
pub struct PackTxn {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl PackTxn {
    /// Where to write the pack's files.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// The final directory.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Fsyncs every file and the directory, then renames it to its final name.
    pub fn commit(mut self) -> Result<PathBuf, StoreError> {
        for entry in fs::read_dir(&self.tmp).map_err(io("cannot list", &self.tmp))? {
            let path = entry.map_err(io("cannot list", &self.tmp))?.path();
            let f = fs::File::open(&path).map_err(io("cannot open", &path))?;
            f.sync_all().map_err(io("cannot fsync", &path))?;
        }
        sync_dir(&self.tmp)?;
        if self.dest.exists() {
            return Err(StoreError::Exists {
                name: self
                    .dest
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                dir: self
                    .dest
                    .parent()
                    .unwrap_or(&self.dest)
                    .display()
                    .to_string(),
            });
        }
        fs::rename(&self.tmp, &self.dest).map_err(io("cannot rename into place", &self.dest))?;
        if let Some(parent) = self.dest.parent() {
            sync_dir(parent)?;
        }
        self.done = true;
        Ok(self.dest.clone())
    }
}

impl Drop for PackTxn {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync", dir))
}

fn dir_bytes(dir: &Path) -> Result<u64, StoreError> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(io("cannot list", dir))? {
        let entry = entry.map_err(io("cannot list", dir))?;
        total += entry
            .metadata()
            .map_err(io("cannot stat", &entry.path()))?
            .len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["tiny", "olmoe-1b-7b", "qwen3:30b", "a.b_c"] {
            Store::check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "../x", "sp ace"] {
            assert!(Store::check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uncommitted_pack_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        {
            let txn = store.begin("m").unwrap();
            fs::write(txn.dir().join("x"), b"1").unwrap();
        }
        assert!(fs::read_dir(store.models_dir()).unwrap().next().is_none());
        assert!(store.list().unwrap().is_empty());
    }
}
