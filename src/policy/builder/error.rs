//! [`PolicyError`]: which entry of a policy is wrong, where, and why.

use std::fmt;
use std::sync::Arc;

/// An invalid policy: which entry is wrong, where, and why (and, for a
/// file that could not be read, the I/O error as its
/// [`source`](std::error::Error::source)).
#[derive(Clone, Debug)]
pub struct PolicyError {
    entry: String,
    line: Option<usize>,
    message: String,
    source: Option<Arc<std::io::Error>>,
}

impl PartialEq for PolicyError {
    fn eq(&self, other: &Self) -> bool {
        (&self.entry, self.line, &self.message) == (&other.entry, other.line, &other.message)
    }
}

impl Eq for PolicyError {}

impl PolicyError {
    pub(crate) fn new(
        entry: impl Into<String>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        PolicyError {
            entry: entry.into(),
            line,
            message: message.into(),
            source: None,
        }
    }

    /// The policy file could not be read.
    pub(in crate::policy) fn unreadable(path: &std::path::Path, e: std::io::Error) -> Self {
        PolicyError {
            entry: path.display().to_string(),
            line: None,
            message: format!("cannot read the policy file: {e}"),
            source: Some(Arc::new(e)),
        }
    }

    /// The offending entry, as a TOML path (`tiers.free.read`, `routes[2]`).
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// The line in the policy file, when the policy came from one.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy entry `{}`", self.entry)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
