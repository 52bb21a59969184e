//! Customized adapters: what `customize` produced (name, blend weights, digest of the examples, pool
//! id), persisted one JSON file per adapter under `<state_dir>/adapters/` with atomic writes, and
//! restored at start. The examples themselves are stored only when `adapters.store_examples` is on.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One example of a task: an input and the output the app wants for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub input: String,
    /// Required (it may be empty): an example without its answer is a caller's mistake, not a default.
    pub output: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customization {
    pub name: String,
    pub pool_id: String,
    /// Pool adapter names, in the order of `weights`.
    pub adapters: Vec<String>,
    pub weights: Vec<f32>,
    pub similarities: Vec<f32>,
    /// With `[blend] method = "example_loss"`: each adapter's mean answer loss (nats per token) on the
    /// examples, from which the weights came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example_losses: Option<Vec<f32>>,
    /// SHA-256 over the examples (inputs and outputs), so a caller can tell whether a customization
    /// came from the same examples without the service keeping them.
    pub example_digest: String,
    pub example_count: usize,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples: Option<Vec<Example>>,
    /// Task embedding of each example input: the router's scope score compares a query with these.
    /// Kept on the device only (they are derived from the examples and never sent anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub example_embeddings: Vec<Vec<f32>>,
    /// Routing thresholds calibrated from the examples (`customize --calibrate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<crate::config::Thresholds>,
    /// The client identity that made it (`uid:1000`, `http:local`); `None`: an admin, the local
    /// `crayonctl`, or a version before ownership — then only an admin may change it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Who asks to change customizations (docs/service.md, "Ownership").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Root, the service's own user, or an HTTP client holding the configured token.
    Admin,
    /// Anyone else, by name: `uid:N` (a socket peer or D-Bus caller), `http:local` (tokenless
    /// loopback HTTP, i.e. any local process).
    Client(String),
}

impl Identity {
    /// A local user: an admin when root or the service's own user.
    pub fn of_uid(uid: u32, service_uid: u32) -> Identity {
        match uid == 0 || uid == service_uid {
            true => Identity::Admin,
            false => Identity::Client(format!("uid:{uid}")),
        }
    }

    /// What a customization made by this identity records as its owner.
    pub fn owner(&self) -> Option<String> {
        match self {
            Identity::Admin => None,
            Identity::Client(c) => Some(c.clone()),
        }
    }

    /// Refuses to replace or remove `c` unless this identity made it or is an admin.
    pub fn check_may_change(&self, c: &Customization) -> crate::Result<()> {
        match self {
            Identity::Admin => Ok(()),
            Identity::Client(me) if c.owner.as_deref() == Some(me.as_str()) => Ok(()),
            Identity::Client(me) => Err(crate::Error::Forbidden(format!(
                "adapter '{}' belongs to {}; {me} may use it but not change or remove it (adapters.owner_only)",
                c.name,
                c.owner.as_deref().unwrap_or("the service (an admin)")
            ))),
        }
    }
}

pub fn digest(examples: &[Example]) -> String {
    let mut h = Sha256::new();
    for e in examples {
        for part in [&e.input, &e.output] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// Hex SHA-256 of a string.
pub fn digest_str(s: &str) -> String {
    format!("{:x}", Sha256::digest(s.as_bytes()))
}

/// Names of blends a server makes from devices' weights (kept in memory only); reserved.
pub const BLEND_PREFIX: &str = "blend-";

/// Adapter names are file names and D-Bus/CLI arguments: keep them simple.
pub fn validate_name(name: &str) -> Result<()> {
    if name.starts_with(BLEND_PREFIX) {
        return Err(Error::InvalidRequest(format!("adapter names starting with '{BLEND_PREFIX}' are reserved")));
    }
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "adapter name '{name}' must be 1-64 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        )))
    }
}

/// Why a stored customization cannot be used: it must be named as its file, and its blend must be a
/// distribution over its adapters (finite, non-negative, summing to 1) with finite embeddings of one
/// width — what `customize` writes. Anything else was edited or corrupted and is skipped, not served.
fn check_stored(c: &Customization, file_stem: &str) -> std::result::Result<(), String> {
    if c.name != file_stem {
        return Err(format!("it names adapter '{}', not '{file_stem}'", c.name));
    }
    validate_name(&c.name).map_err(|e| e.to_string())?;
    if c.weights.len() != c.adapters.len() || c.similarities.len() != c.adapters.len() {
        return Err(format!(
            "{} weights and {} similarities for {} adapters",
            c.weights.len(),
            c.similarities.len(),
            c.adapters.len()
        ));
    }
    if c.weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err("blend weights must be finite and non-negative".into());
    }
    let sum: f32 = c.weights.iter().sum();
    if (sum - 1.0).abs() > 1e-3 {
        return Err(format!("blend weights sum to {sum}, not 1"));
    }
    let width = c.example_embeddings.first().map_or(0, Vec::len);
    if c.example_embeddings.iter().any(|e| e.len() != width || e.iter().any(|x| !x.is_finite())) {
        return Err("example embeddings must be finite and of one width".into());
    }
    Ok(())
}

pub struct AdapterStore {
    dir: PathBuf,
    items: BTreeMap<String, Customization>,
}

impl AdapterStore {
    /// Opens (creating if needed) `<state_dir>/adapters` and loads every saved customization.
    /// A corrupt file is reported and skipped, not deleted: the service still starts.
    pub fn open(state_dir: &Path) -> Result<AdapterStore> {
        let dir = state_dir.join("adapters");
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: "state directory",
            path: dir.clone(),
            source,
        })?;
        let mut items = BTreeMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|source| Error::Io {
            what: "state directory",
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            // A save interrupted before its rename (crash, full disk) leaves `.<name>.json.tmp`: the
            // previous state is the file it was to replace, so the leftover goes.
            if file.starts_with('.') && file.ends_with(".json.tmp") {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(file = %path.display(), "removed an interrupted save"),
                    Err(e) => tracing::warn!(file = %path.display(), "cannot remove an interrupted save: {e}"),
                }
                continue;
            }
            let Some(stem) = file.strip_suffix(".json") else { continue };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Customization>(&b).map_err(|e| e.to_string()))
                .and_then(|c| check_stored(&c, stem).map(|()| c))
            {
                Ok(c) => {
                    items.insert(c.name.clone(), c);
                }
                Err(e) => tracing::warn!(file = %path.display(), "skipping saved adapter: {e}"),
            }
        }
        Ok(AdapterStore { dir, items })
    }

    pub fn get(&self, name: &str) -> Option<&Customization> {
        self.items.get(name)
    }

    pub fn list(&self) -> impl Iterator<Item = &Customization> {
        self.items.values()
    }

    /// Writes atomically (temporary file, fsync, rename, fsync of the folder), then records it. The
    /// file is 0640 whatever the umask (the service group may read it; nobody else). A failed write
    /// leaves the previous file and listing as they were and no temporary file behind.
    pub fn save(&mut self, c: Customization) -> Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        validate_name(&c.name)?;
        let path = self.dir.join(format!("{}.json", c.name));
        let tmp = self.dir.join(format!(".{}.json.tmp", c.name));
        let io = |source| Error::Write { what: "adapter state", path: path.clone(), source };
        let bytes = serde_json::to_vec_pretty(&c).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.items.insert(c.name.clone(), c);
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<Customization> {
        let c = self
            .items
            .remove(name)
            .ok_or_else(|| Error::Adapter { name: name.into(), msg: "no such adapter".into() })?;
        let path = self.dir.join(format!("{name}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(c),
            Err(source) => {
                self.items.insert(name.into(), c);
                Err(Error::Write { what: "adapter state", path, source })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Customization {
        Customization {
            name: name.into(),
            pool_id: "p".into(),
            adapters: vec!["a".into(), "b".into()],
            weights: vec![0.25, 0.75],
            similarities: vec![0.1, 0.2],
            example_losses: None,
            example_digest: digest(&[Example { input: "x".into(), output: "y".into() }]),
            example_count: 1,
            created_unix: 1,
            examples: None,
            example_embeddings: vec![vec![0.5, -0.5]],
            calibrated: Some(crate::config::Thresholds::default()),
            owner: None,
        }
    }

    #[test]
    fn only_the_owner_or_an_admin_may_change_a_customization() {
        let mut c = sample("math");
        c.owner = Some("uid:1001".into());
        assert!(Identity::Client("uid:1001".into()).check_may_change(&c).is_ok());
        assert!(Identity::Admin.check_may_change(&c).is_ok());
        let err = Identity::Client("uid:1002".into()).check_may_change(&c).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Forbidden);
        assert!(err.to_string().contains("belongs to uid:1001"), "{err}");
        c.owner = None;
        assert!(Identity::Client("http:local".into()).check_may_change(&c).is_err(), "unowned: admins only");
        assert_eq!(Identity::of_uid(0, 999), Identity::Admin);
        assert_eq!(Identity::of_uid(999, 999), Identity::Admin, "the service's own user");
        assert_eq!(Identity::of_uid(1001, 999).owner().as_deref(), Some("uid:1001"));
    }

    #[test]
    fn saved_adapters_survive_a_restart_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = AdapterStore::open(dir.path()).unwrap();
        store.save(sample("math")).unwrap();
        store.save(sample("code")).unwrap();
        let mut again = AdapterStore::open(dir.path()).unwrap();
        assert_eq!(again.list().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["code", "math"]);
        assert_eq!(again.get("math"), Some(&sample("math")));
        again.remove("math").unwrap();
        assert!(again.remove("math").is_err());
        assert_eq!(AdapterStore::open(dir.path()).unwrap().list().count(), 1);
    }

    #[test]
    fn corrupt_files_are_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = AdapterStore::open(dir.path()).unwrap();
        store.save(sample("ok")).unwrap();
        std::fs::write(dir.path().join("adapters/bad.json"), "{").unwrap();
        let store = AdapterStore::open(dir.path()).unwrap();
        assert_eq!(store.list().count(), 1);
        assert!(dir.path().join("adapters/bad.json").exists(), "kept for inspection");
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        validate_name("my-app_v1.2").unwrap();
    }

    #[test]
    fn digest_depends_on_every_field() {
        let a = [Example { input: "ab".into(), output: "c".into() }];
        let b = [Example { input: "a".into(), output: "bc".into() }];
        assert_ne!(digest(&a), digest(&b));
    }
}
