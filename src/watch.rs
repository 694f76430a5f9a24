//! [`PolicyHandle::watch`](crate::PolicyHandle::watch) (feature `watch`):
//! the policy file is reloaded when it changes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::PolicyHandle;
use crate::policy::Policy;

/// How long a file must stay unchanged before it is read: an editor or a
/// deployment tool writes a file in several steps.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches a policy file ([`PolicyHandle::watch`]); dropping it stops.
pub struct PolicyWatcher {
    _watcher: notify::RecommendedWatcher,
    status: Arc<Status>,
}

#[derive(Default)]
struct Status {
    reloads: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for PolicyWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyWatcher")
            .field("reloads", &self.reloads())
            .field("errors", &self.errors())
            .finish_non_exhaustive()
    }
}

impl PolicyWatcher {
    /// Times the file was reloaded and its new policy put in force.
    pub fn reloads(&self) -> u64 {
        self.status.reloads.load(Ordering::Acquire)
    }

    /// Times the file changed but was invalid (the policy in force stayed).
    pub fn errors(&self) -> u64 {
        self.status.errors.load(Ordering::Acquire)
    }

    /// The last invalid file's error (it names the entry and the line).
    pub fn last_error(&self) -> Option<String> {
        self.status
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl PolicyHandle {
    /// Reloads the policy file at `path` whenever it changes, until the
    /// returned [`PolicyWatcher`] is dropped (feature `watch`, through the
    /// `notify` crate).
    ///
    /// Changes are debounced ([`WATCH_DEBOUNCE`]); the file is then read
    /// and validated whole, and the new policy swapped in atomically, so
    /// every request sees the whole old policy or the whole new one. An
    /// invalid file is logged at ERROR with the entry and line at fault,
    /// and the policy in force stays. The operators' changes (the admin
    /// service's) stay layered over the new file. The directory is watched,
    /// so a file replaced by a rename (as editors and deployment tools do)
    /// is followed.
    ///
    /// ```no_run
    /// # use tierlimit::{Policy, RateLimitLayer};
    /// let layer = RateLimitLayer::new(Policy::from_toml_file("policy.toml")?);
    /// let _watcher = layer.policy_handle().watch("policy.toml")?;
    /// // keep `_watcher` alive as long as the file should be followed
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn watch(&self, path: impl AsRef<Path>) -> std::io::Result<PolicyWatcher> {
        let path = path.as_ref().to_path_buf();
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("a policy file path names a file"))?
            .to_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (tx, rx) = mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && event.paths.iter().any(|p| p.file_name() == Some(&name))
                {
                    let _ = tx.send(());
                }
            })
            .map_err(std::io::Error::other)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(std::io::Error::other)?;
        let status = Arc::new(Status::default());
        let (handle, st) = (self.clone(), Arc::clone(&status));
        let last = std::fs::read(&path).ok();
        std::thread::Builder::new()
            .name("tierlimit-watch".into())
            .spawn(move || follow(&handle, &path, &rx, &st, last))?;
        Ok(PolicyWatcher {
            _watcher: watcher,
            status,
        })
    }
}

/// The watch thread: each burst of events, once quiet, reloads the file if
/// its bytes changed. Ends when the watcher is dropped.
fn follow(
    handle: &PolicyHandle,
    path: &Path,
    rx: &mpsc::Receiver<()>,
    status: &Status,
    mut last: Option<Vec<u8>>,
) {
    while rx.recv().is_ok() {
        while rx.recv_timeout(WATCH_DEBOUNCE).is_ok() {}
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                // Between a delete and a rename, say: the next event reloads.
                tracing::debug!(path = %path.display(), error = %e, "policy file not readable now");
                continue;
            }
        };
        if last.as_deref() == Some(&bytes[..]) {
            continue;
        }
        let parsed = match std::str::from_utf8(&bytes) {
            Err(_) => {
                tracing::error!(path = %path.display(), "policy file invalid: not UTF-8; the policy in force stays");
                Err("the file is not UTF-8".to_owned())
            }
            Ok(text) => Policy::from_toml_str(text).map_err(|e| {
                tracing::error!(
                    path = %path.display(),
                    entry = e.entry(),
                    line = e.line(),
                    error = %e,
                    "policy file invalid; the policy in force stays"
                );
                e.to_string()
            }),
        };
        match parsed {
            Ok(policy) => {
                handle.replace(policy);
                last = Some(bytes);
                status.reloads.fetch_add(1, Ordering::AcqRel);
                tracing::info!(path = %path.display(), "policy file reloaded");
            }
            Err(e) => {
                *status
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(e);
                status.errors.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}
