//! Reading the layers: defaults, the file, its drop-ins, the environment, the flags.
//!
//! Each layer is a partial table. Every key in it is checked on its own (known? right type?)
//! before it is merged, so errors point at the file and line, variable or flag that set the key;
//! the merged table is then deserialized once and validated.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::keys::{self, ConfigKey, KEYS};
use super::Config;

/// The config file read when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tileflow/tileflowd.toml";

/// Prefix of configuration environment variables (`TILEFLOW_<SECTION>__<KEY>`).
const ENV_PREFIX: &str = "TILEFLOW_";

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Nothing set it.
    Default,
    /// A config file or drop-in, at a line when known.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line of the key.
        line: Option<usize>,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag such as `--socket`.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

impl Origin {
    /// "set in FILE:LINE", "set by VAR", …: the tail of a message about a value.
    fn setter(&self) -> String {
        match self {
            Origin::Default => "the built-in default".into(),
            Origin::File { .. } => format!("set in {self}"),
            Origin::Env(var) => format!("set by {var}"),
            Origin::Flag(flag) => format!("set by {flag}"),
        }
    }
}

/// Why the configuration could not be loaded. Each message names the file, variable or flag,
/// and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An explicitly named config file is absent.
    #[error("config file {} does not exist", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// A config file or drop-in exists but cannot be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The drop-in directory exists but cannot be listed.
    #[error("cannot list drop-in directory {}", dir.display())]
    DropIns {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is not valid TOML.
    #[error("{origin}: {message}")]
    Syntax {
        /// The file and line.
        origin: Origin,
        /// The parser's message.
        message: String,
    },
    /// A file has a section that does not exist.
    #[error("{origin}: unknown section [{section}]{hint}")]
    UnknownSection {
        /// The file and line.
        origin: Origin,
        /// The section as written.
        section: String,
        /// A suggestion, or empty.
        hint: String,
    },
    /// A file has a key that its section does not have.
    #[error("{origin}: unknown key {key}{hint}")]
    UnknownKey {
        /// The file and line.
        origin: Origin,
        /// `section.key` as written.
        key: String,
        /// A suggestion, or empty.
        hint: String,
    },
    /// A `TILEFLOW_<SECTION>__<KEY>` variable names no key.
    #[error("unknown config variable {var}: {reason}{hint}")]
    UnknownEnv {
        /// The variable.
        var: String,
        /// Which part is unknown.
        reason: String,
        /// A suggestion, or empty.
        hint: String,
    },
    /// A config variable's value is not UTF-8.
    #[error("{var}: value is not valid UTF-8")]
    EnvNotUtf8 {
        /// The variable.
        var: String,
    },
    /// A value of the wrong type or form (`max_running = "lots"`, `device = "tpu"`).
    #[error("{origin}: {key}: {message}")]
    BadValue {
        /// Where it was set.
        origin: Origin,
        /// The key.
        key: &'static str,
        /// What was expected.
        message: String,
    },
    /// A well-formed value outside what the key allows.
    #[error("{message} ({})", origin.setter())]
    Invalid {
        /// The key.
        key: &'static str,
        /// The message, naming the key.
        message: String,
        /// Where the value came from.
        origin: Origin,
    },
    /// `engine.device` names a GPU this build or machine cannot provide (found at start, when
    /// the device is opened).
    #[error("engine.device = \"{device}\" ({}) cannot be used", origin.setter())]
    Device {
        /// The value.
        device: String,
        /// Where it was set.
        origin: Origin,
        /// Why the GPU cannot be used (boxed: it is larger than the other variants).
        #[source]
        source: Box<tileflow_gpu::GpuError>,
    },
}

impl ConfigError {
    /// The dotted key the error is about, when it is about one known key.
    pub fn key(&self) -> Option<&str> {
        let key: &str = match self {
            ConfigError::BadValue { key, .. } | ConfigError::Invalid { key, .. } => key,
            ConfigError::UnknownKey { key, .. } => key,
            ConfigError::Device { .. } => "engine.device",
            _ => return None,
        };
        Some(key).filter(|k| !k.is_empty())
    }
}

/// What to read. [`ConfigSources::default`] reads the default file and no environment; the daemon
/// adds the process environment with [`ConfigSources::with_process_env`].
#[derive(Debug, Clone)]
pub struct ConfigSources {
    /// `--config FILE`: a file that must exist. `None` reads `default_config`, which may be absent.
    pub config: Option<PathBuf>,
    /// The file read when `config` is `None`.
    pub default_config: PathBuf,
    /// Environment variables, of which those named `TILEFLOW_<SECTION>__<KEY>` are read.
    pub env: Vec<(OsString, OsString)>,
    /// Flag values applied last: (dotted key, value, flag name).
    pub flags: Vec<(&'static str, String, &'static str)>,
}

impl Default for ConfigSources {
    fn default() -> ConfigSources {
        ConfigSources {
            config: None,
            default_config: PathBuf::from(DEFAULT_CONFIG_PATH),
            env: Vec::new(),
            flags: Vec::new(),
        }
    }
}

impl ConfigSources {
    /// Adds this process's environment.
    pub fn with_process_env(mut self) -> ConfigSources {
        self.env.extend(std::env::vars_os());
        self
    }

    /// Adds a flag's value for a key (`"server.socket"`, `"/tmp/t.sock"`, `"--socket"`).
    pub fn with_flag(
        mut self,
        key: &'static str,
        value: impl Into<String>,
        flag: &'static str,
    ) -> Self {
        self.flags.push((key, value.into(), flag));
        self
    }

    /// The file that is (or would be) read.
    pub fn config_path(&self) -> &Path {
        self.config.as_deref().unwrap_or(&self.default_config)
    }
}

/// A loaded, validated configuration and what it was made of.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// The files read, in order (the config file, then drop-ins).
    pub files: Vec<PathBuf>,
    /// Where each key that is not at its built-in default was last set.
    pub origins: BTreeMap<&'static str, Origin>,
}

impl Loaded {
    /// Where `key`'s value came from.
    pub fn origin(&self, key: &str) -> &Origin {
        self.origins.get(key).unwrap_or(&Origin::Default)
    }
}

impl Config {
    /// Loads and validates the configuration described by `opts`.
    pub fn load(opts: &ConfigSources) -> Result<Config, ConfigError> {
        Config::load_detailed(opts).map(|loaded| loaded.config)
    }

    /// Like [`Config::load`], also saying which files were read and where each value came from.
    pub fn load_detailed(opts: &ConfigSources) -> Result<Loaded, ConfigError> {
        let mut layers = Layers {
            defaults: keys::to_table(&Config::default()),
            merged: keys::to_table(&Config::default()),
            origins: BTreeMap::new(),
        };
        let mut files = Vec::new();
        let path = opts.config_path();
        match read_file(path)? {
            Some(text) => {
                layers.apply_file(path, &text)?;
                files.push(path.to_path_buf());
            }
            None if opts.config.is_some() => {
                return Err(ConfigError::Missing {
                    path: path.to_path_buf(),
                })
            }
            None => {}
        }
        for dropin in drop_ins(path)? {
            let text = read_file(&dropin)?.ok_or_else(|| ConfigError::Read {
                path: dropin.clone(),
                source: io::ErrorKind::NotFound.into(),
            })?;
            layers.apply_file(&dropin, &text)?;
            files.push(dropin);
        }
        layers.apply_env(&opts.env)?;
        for &(key, ref value, flag) in &opts.flags {
            let info = KEYS
                .iter()
                .find(|k| k.key == key)
                .ok_or_else(|| ConfigError::BadValue {
                    origin: Origin::Flag(flag),
                    key: "",
                    message: format!("{key} is not a config key"),
                })?;
            let value = layers.coerce(info, value);
            layers.set(info, value, Origin::Flag(flag))?;
        }
        let Layers {
            merged, origins, ..
        } = layers;
        let config =
            Config::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::BadValue {
                origin: Origin::Default,
                key: "",
                message: e.message().to_owned(),
            })?;
        config.validate().map_err(|e| ConfigError::Invalid {
            key: e.key,
            origin: origins.get(e.key).cloned().unwrap_or(Origin::Default),
            message: e.message,
        })?;
        Ok(Loaded {
            config,
            files,
            origins,
        })
    }
}

/// The file's text, `None` if it does not exist.
fn read_file(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `<config>.d/*.toml` in lexical (byte) order, skipping hidden files; none if the directory is
/// absent.
fn drop_ins(config: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let mut dir = config.as_os_str().to_owned();
    dir.push(".d");
    let dir = PathBuf::from(dir);
    let list_error = |source| ConfigError::DropIns {
        dir: dir.clone(),
        source,
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(list_error(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.map_err(list_error)?.file_name();
        let visible = !name.as_encoded_bytes().starts_with(b".");
        if visible && Path::new(&name).extension().is_some_and(|e| e == "toml") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The accumulated table and where each key was last set.
struct Layers {
    defaults: toml::Table,
    merged: toml::Table,
    origins: BTreeMap<&'static str, Origin>,
}

impl Layers {
    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let at = |offset: usize| Origin::File {
            path: path.to_path_buf(),
            line: Some(line_of(text, offset)),
        };
        let syntax = |e: toml::de::Error| ConfigError::Syntax {
            origin: match e.span() {
                Some(span) => at(span.start),
                None => Origin::File {
                    path: path.to_path_buf(),
                    line: None,
                },
            },
            message: e.message().trim_end().to_owned(),
        };
        let doc = toml::de::DeTable::parse(text).map_err(syntax)?;
        let values: toml::Table = toml::from_str(text).map_err(syntax)?;
        for (section_key, section_value) in doc.get_ref() {
            let section: &str = section_key.get_ref();
            let origin = at(section_key.span().start);
            if !keys::is_section(section) {
                let sections = KEYS.iter().map(|k| k.section().to_owned());
                return Err(ConfigError::UnknownSection {
                    origin,
                    hint: hint(section, sections),
                    section: section.to_owned(),
                });
            }
            let Some(entries) = section_value.get_ref().as_table() else {
                return Err(ConfigError::Syntax {
                    origin,
                    message: format!("{section} must be a table ([{section}])"),
                });
            };
            for (name_key, _) in entries {
                let name: &str = name_key.get_ref();
                let origin = at(name_key.span().start);
                let Some(info) = keys::find(section, name) else {
                    let dotted = format!("{section}.{name}");
                    let known = KEYS.iter().map(|k| k.key.to_owned());
                    return Err(ConfigError::UnknownKey {
                        origin,
                        hint: hint(&dotted, known),
                        key: dotted,
                    });
                };
                let value = values
                    .get(section)
                    .and_then(|s| s.get(name))
                    .cloned()
                    .unwrap_or(toml::Value::Table(toml::Table::new()));
                self.set(info, value, origin)?;
            }
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &[(OsString, OsString)]) -> Result<(), ConfigError> {
        let mut vars: Vec<(&str, &OsString)> = env
            .iter()
            .filter_map(|(name, value)| Some((name.to_str()?, value)))
            .filter(|(name, _)| name.starts_with(ENV_PREFIX) && name.contains("__"))
            .collect();
        vars.sort_by_key(|&(name, _)| name);
        for (var, value) in vars {
            let rest = &var[ENV_PREFIX.len()..];
            let Some((section, name)) = rest.split_once("__") else {
                continue;
            };
            let (section, name) = (section.to_ascii_lowercase(), name.to_ascii_lowercase());
            let unknown = |reason: String| ConfigError::UnknownEnv {
                var: var.to_owned(),
                reason,
                hint: hint(var, KEYS.iter().map(ConfigKey::env_var)),
            };
            if !keys::is_section(&section) {
                return Err(unknown(format!("there is no section [{section}]")));
            }
            let Some(info) = keys::find(&section, &name) else {
                return Err(unknown(format!("section [{section}] has no key {name}")));
            };
            let value = value.to_str().ok_or_else(|| ConfigError::EnvNotUtf8 {
                var: var.to_owned(),
            })?;
            let value = self.coerce(info, value);
            self.set(info, value, Origin::Env(var.to_owned()))?;
        }
        Ok(())
    }

    /// A value given as text (environment, flags): TOML where it parses as TOML (`64`, `true`,
    /// `["a", "b"]`, `"quoted"`), else the text as a string. A key whose values are strings
    /// takes the text as it is unless it is a quoted TOML string, so `TILEFLOW_LOG__LEVEL=debug`
    /// and a socket group named `1000` both mean what they say.
    fn coerce(&self, key: &ConfigKey, text: &str) -> toml::Value {
        let parsed = toml::from_str::<toml::Table>(&format!("v = {}", text.trim()))
            .ok()
            .filter(|t| t.len() == 1)
            .and_then(|mut t| t.remove("v"));
        let wants_string = matches!(
            keys::lookup(&self.defaults, key),
            Some(toml::Value::String(_))
        );
        match parsed {
            Some(v @ toml::Value::String(_)) => v,
            Some(v) if !wants_string => v,
            _ => toml::Value::String(text.to_owned()),
        }
    }

    /// Type-checks `value` for `key` on its own, then merges it.
    fn set(
        &mut self,
        key: &'static ConfigKey,
        value: toml::Value,
        origin: Origin,
    ) -> Result<(), ConfigError> {
        let mut section = toml::Table::new();
        section.insert(key.name().to_owned(), value.clone());
        let mut probe = toml::Table::new();
        probe.insert(key.section().to_owned(), toml::Value::Table(section));
        if let Err(e) = Config::deserialize(toml::Value::Table(probe)) {
            return Err(ConfigError::BadValue {
                origin,
                key: key.key,
                message: e.message().trim_end().to_owned(),
            });
        }
        if let Some(toml::Value::Table(section)) = self.merged.get_mut(key.section()) {
            section.insert(key.name().to_owned(), value);
        }
        self.origins.insert(key.key, origin);
        Ok(())
    }
}

/// " (did you mean X?)" for the candidate closest to `given`, if it is close; else "".
fn hint(given: &str, candidates: impl Iterator<Item = String>) -> String {
    let given_lower = given.to_ascii_lowercase();
    candidates
        .map(|shown| {
            (
                edit_distance(&given_lower, &shown.to_ascii_lowercase()),
                shown,
            )
        })
        .filter(|(d, shown)| *d > 0 && *d <= (shown.len() / 4).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, shown)| format!(" (did you mean {shown}?)"))
        .unwrap_or_default()
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}
