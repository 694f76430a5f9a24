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
            message: one_line(message.into()),
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

/// `message` on one line: a value it quotes (in backticks, or in double
/// quotes with escapes) that holds a line break, written or escaped (a
/// multi-line string, whose lines may look like anything: a `[keys]`
/// block, a log line), is shown as `…`; a break outside quotes ends the
/// message there.
fn one_line(message: String) -> String {
    let is_break = |s: &str| s.contains(['\n', '\r']) || s.contains("\\n") || s.contains("\\r");
    if !is_break(&message) {
        return message;
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    while let Some(c) = rest.chars().next() {
        let tail = &rest[c.len_utf8()..];
        let close = match c {
            '`' => tail.find('`'),
            '"' => {
                let mut escaped = false;
                tail.char_indices().find_map(|(i, d)| {
                    let closes = d == '"' && !escaped;
                    escaped = d == '\\' && !escaped;
                    closes.then_some(i)
                })
            }
            '\n' | '\r' => {
                out.push('…');
                return out;
            }
            _ => {
                out.push(c);
                rest = tail;
                continue;
            }
        };
        let Some(close) = close else {
            // Never closed: what follows is the quote.
            out.push(c);
            out.push_str(if is_break(tail) { "…" } else { tail });
            return out;
        };
        let content = &tail[..close];
        out.push(c);
        out.push_str(if is_break(content) { "…" } else { content });
        out.push(c);
        rest = &tail[close + c.len_utf8()..];
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A quoted multi-line string (found by an attack: a `[keys]` block in
    /// a tier's limit) is not shown, its line breaks written or escaped.
    #[test]
    fn a_message_is_one_line() {
        let cut = |m: &str| PolicyError::new("e", None, m).message().to_owned();
        assert_eq!(
            cut("`[keys]\n\"KEY\" = 1\n` is not a limit"),
            "`…` is not a limit"
        );
        assert_eq!(
            cut(r#"invalid type: string "[keys]\n\"KEY\" = \"pro\"\n", expected a sequence"#),
            r#"invalid type: string "…", expected a sequence"#
        );
        assert_eq!(cut("a\r\nb `c\nd` e"), "a…");
        assert_eq!(
            cut("`keys.\"KEY\" = \"pro\"\n` is not a limit"),
            "`…` is not a limit"
        );
        assert_eq!(cut("`a \"b\" c` then `d\ne"), "`a \"b\" c` then `…");
        assert_eq!(cut("`x\ny` and `z\rw`"), "`…` and `…`");
        assert_eq!(cut("plain"), "plain");
    }
}
