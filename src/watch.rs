//! [`PolicyHandle::watch`](crate::PolicyHandle::watch) (feature `watch`):
//! the policy file is reloaded when it changes.
//!
//! The file's directory is watched (and, when the path is a symlink into
//! another directory, that directory too), so a file replaced by a rename,
//! a symlink retargeted and a Kubernetes ConfigMap's `..data` swap are all
//! seen. Only events that may change the file's content count: the
//! watcher's own reads (opens, reads, closes without a write) do not, so a
//! file at rest is not read.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::PolicyHandle;
use crate::policy::Policy;

/// How long a file must stay unchanged before it is read: an editor or a
/// deployment tool writes a file in several steps.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches a policy file ([`PolicyHandle::watch`]); dropping it stops.
pub struct PolicyWatcher {
    /// Shared with the watch thread (weakly), which adds and removes the
    /// directory of a symlink's target as the symlink moves.
    _watcher: Arc<Mutex<RecommendedWatcher>>,
    status: Arc<Status>,
}

#[derive(Default)]
struct Status {
    reloads: AtomicU64,
    errors: AtomicU64,
    reads: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for PolicyWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyWatcher")
            .field("reloads", &self.reloads())
            .field("errors", &self.errors())
            .field("reads", &self.reads())
            .finish_non_exhaustive()
    }
}

impl PolicyWatcher {
    /// Times the file was reloaded and its new policy put in force.
    pub fn reloads(&self) -> u64 {
        self.status.reloads.load(Ordering::Acquire)
    }

    /// Times the file changed but was invalid (the policy in force stayed).
    /// Each content is reported once: a broken file saved again unchanged
    /// is not reported again.
    pub fn errors(&self) -> u64 {
        self.status.errors.load(Ordering::Acquire)
    }

    /// Times the file was read since the watcher started: once per burst
    /// of changes, after [`WATCH_DEBOUNCE`]. A file at rest is not read.
    pub fn reads(&self) -> u64 {
        self.status.reads.load(Ordering::Acquire)
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
    /// Changes of the file's content are debounced ([`WATCH_DEBOUNCE`]);
    /// the file is then read and validated whole, and the new policy
    /// swapped in atomically, so every request sees the whole old policy or
    /// the whole new one. An invalid file is logged at ERROR with the entry
    /// and line at fault, once per content, and the policy in force stays.
    /// The operators' changes (the admin service's) stay layered over the
    /// new file.
    ///
    /// The directory is watched, so the file is followed however it is
    /// replaced: written in place, renamed over (as editors and deployment
    /// tools do), removed and written again, a symlink retargeted (into
    /// another directory too), or a Kubernetes ConfigMap updated (its
    /// `..data` symlink swapped). Opening or reading the file is not a
    /// change: a file at rest is not read.
    ///
    /// ```no_run
    /// # use tierlimit::{Policy, RateLimitLayer};
    /// let layer = RateLimitLayer::new(Policy::from_toml_file("policy.toml")?);
    /// let _watcher = layer.policy_handle().watch("policy.toml")?;
    /// // keep `_watcher` alive as long as the file should be followed
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn watch(&self, path: impl AsRef<Path>) -> io::Result<PolicyWatcher> {
        let mut target = WatchedFile::new(path.as_ref())?;
        let (tx, rx) = mpsc::channel::<Vec<PathBuf>>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if may_change_content(&event.kind) => {
                    let _ = tx.send(event.paths);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "policy file watch error"),
            })
            .map_err(io::Error::other)?;
        watcher
            .watch(&target.dir, RecursiveMode::NonRecursive)
            .map_err(io::Error::other)?;
        target.elsewhere = target
            .elsewhere
            .take()
            .filter(|dir| watch_dir(&mut watcher, dir));
        let watcher = Arc::new(Mutex::new(watcher));
        let status = Arc::new(Status::default());
        // Nothing read yet: the first change read is applied even if the
        // file held those bytes when the watch began, since the policy in
        // force may have been loaded before the file last changed (a
        // deployment between the load and the watch).
        let follower = Follower {
            handle: self.clone(),
            target,
            status: Arc::clone(&status),
            watcher: Arc::downgrade(&watcher),
            last: None,
        };
        std::thread::Builder::new()
            .name("tierlimit-watch".into())
            .spawn(move || follower.run(&rx))?;
        Ok(PolicyWatcher {
            _watcher: watcher,
            status,
        })
    }
}

/// Whether an event may mean the file's content changed: a write, a
/// create, a rename or a removal. Not the file opened, read or closed
/// without a write (as the watcher's own reads do), nor its metadata
/// changed.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        // A write finished: the end of a burst.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    }
}

/// Watches `dir` too; false (logged) if it cannot be.
fn watch_dir(watcher: &mut RecommendedWatcher, dir: &Path) -> bool {
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the policy file's target directory");
            false
        }
    }
}

/// The file followed: the path as given, and where its symlinks lead now.
struct WatchedFile {
    /// The path as given: read through it, so its symlinks are followed.
    path: PathBuf,
    /// Its directory, watched.
    dir: PathBuf,
    /// `dir` as given, and with its symlinks resolved: some platforms name
    /// events by the one, some by the other.
    homes: Vec<PathBuf>,
    /// The names in `dir` that are the file: the path's own, and the name
    /// of the file its symlinks lead to when that is in `dir` too.
    names: Vec<OsString>,
    /// The file the symlinks lead to, when it is in another directory.
    real: Option<PathBuf>,
    /// That file's directory: watched too.
    elsewhere: Option<PathBuf>,
}

impl WatchedFile {
    fn new(path: &Path) -> io::Result<WatchedFile> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::other("a policy file path names a file"))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut homes = vec![dir.clone()];
        homes.extend(std::fs::canonicalize(&dir).ok().filter(|d| *d != dir));
        let mut target = WatchedFile {
            path: path.to_path_buf(),
            dir,
            homes,
            names: vec![name.to_owned()],
            real: None,
            elsewhere: None,
        };
        target.elsewhere = target.resolve();
        Ok(target)
    }

    /// Follows the path's symlinks as they are now: updates `names` and
    /// `real`, and returns the directory the file is in when that is not
    /// `dir`.
    fn resolve(&mut self) -> Option<PathBuf> {
        self.names.truncate(1);
        self.real = None;
        let real = std::fs::canonicalize(&self.path).ok()?;
        let (parent, name) = (real.parent()?, real.file_name()?);
        if self.homes.iter().any(|h| h == parent) {
            self.names.push(name.to_owned());
            return None;
        }
        let parent = parent.to_path_buf();
        self.real = Some(real);
        Some(parent)
    }

    /// Whether events on `paths` may change the file: the file itself, the
    /// file its symlinks lead to or that file's directory, or an entry of
    /// `dir` whose name begins with `..` (a ConfigMap's `..data` symlink
    /// and its timestamped directories). No path at all: events were lost,
    /// anything may have changed.
    fn concerns(&self, paths: &[PathBuf]) -> bool {
        paths.is_empty() || paths.iter().any(|p| self.names_the_file(p))
    }

    fn names_the_file(&self, p: &PathBuf) -> bool {
        if self.real.as_ref() == Some(p) || self.elsewhere.as_ref() == Some(p) {
            return true;
        }
        let in_dir = p
            .parent()
            .is_some_and(|d| self.homes.iter().any(|h| h == d));
        in_dir
            && p.file_name().is_some_and(|n| {
                self.names.iter().any(|m| m == n) || n.as_encoded_bytes().starts_with(b"..")
            })
    }
}

/// The watch thread's state.
struct Follower {
    handle: PolicyHandle,
    target: WatchedFile,
    status: Arc<Status>,
    watcher: Weak<Mutex<RecommendedWatcher>>,
    /// The bytes of the last content read, valid or not: the same bytes
    /// again are no change. None before the first read.
    last: Option<Vec<u8>>,
}

impl Follower {
    /// Each burst of events that concern the file, once quiet, reads the
    /// file and reloads it if its bytes changed. Ends when the watcher is
    /// dropped.
    fn run(mut self, rx: &mpsc::Receiver<Vec<PathBuf>>) {
        while let Ok(paths) = rx.recv() {
            if !self.target.concerns(&paths) {
                continue;
            }
            if !self.quiet(rx) {
                return;
            }
            // Watch where the symlinks lead now before reading, so no
            // change after the read goes unseen.
            self.retarget();
            self.status.reads.fetch_add(1, Ordering::AcqRel);
            let path = &self.target.path;
            match std::fs::read(path) {
                Ok(bytes) if self.last.as_deref() == Some(&bytes[..]) => {}
                Ok(bytes) => {
                    apply(&self.handle, path, &bytes, &self.status);
                    self.last = Some(bytes);
                }
                // Between a delete and a rename, say: the next event reloads.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!(path = %path.display(), error = %e, "policy file not there now");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "policy file not readable");
                }
            }
        }
    }

    /// Waits until no event concerning the file has come for
    /// [`WATCH_DEBOUNCE`]; false if the watcher was dropped meanwhile.
    fn quiet(&self, rx: &mpsc::Receiver<Vec<PathBuf>>) -> bool {
        let mut quiet_until = Instant::now() + WATCH_DEBOUNCE;
        loop {
            match rx.recv_timeout(quiet_until.saturating_duration_since(Instant::now())) {
                Ok(paths) if self.target.concerns(&paths) => {
                    quiet_until = Instant::now() + WATCH_DEBOUNCE;
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Follows the symlinks again; when they now lead into another
    /// directory, watches that one instead of the last.
    fn retarget(&mut self) {
        let elsewhere = self.target.resolve();
        if elsewhere == self.target.elsewhere {
            return;
        }
        let Some(watcher) = self.watcher.upgrade() else {
            return;
        };
        let mut watcher = watcher.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = self.target.elsewhere.take() {
            // It may be gone already, with its directory.
            let _ = watcher.unwatch(&old);
        }
        self.target.elsewhere = elsewhere.filter(|dir| watch_dir(&mut watcher, dir));
    }
}

/// Validates the file's bytes: a valid policy is swapped in; an invalid
/// one is reported, and the policy in force stays.
fn apply(handle: &PolicyHandle, path: &Path, bytes: &[u8], status: &Status) {
    let parsed = match std::str::from_utf8(bytes) {
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
