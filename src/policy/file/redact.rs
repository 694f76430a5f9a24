//! The TOML parser's errors, told without the file's API keys.
//!
//! Where an error stands is read from the document as the TOML parser
//! itself reads it (`toml_parser`'s events: table headers, keys, values),
//! never guessed from the lines around it: a multi-line string whose lines
//! look like `[tiers.free]` is one value, not a header. From that place:
//!
//! - the entry is named by its path, an API key only redacted
//!   (`keys."key:…"`, `custom_limits."key:…".read`), and never by the file's
//!   text;
//! - in a section that holds API keys (`[keys]`, `[custom_limits]` or `[overrides]`,
//!   `[[boosts]]`) or one the loader does not know (where keys may stand
//!   after a typo of `[keys]`), the parser's message keeps of what it quotes
//!   only the loader's own vocabulary, the fields of the place (which are
//!   never keys: `acount` in `"KEY" = { acount = … }`) and punctuation;
//!   everything else it quotes becomes `…`.
//!
//! Only the sections that never hold a key (`categories`, `[tiers]`,
//! `[[routes]]`, `[[grpc]]`, `[defaults]`, `[shadow]`) keep the parser's
//! message whole.

use toml_parser::Source;
use toml_parser::parser::{Event, EventKind};

use super::Lines;
use crate::key::KeyId;
use crate::policy::PolicyError;

/// Sections whose keys and values are names and limits, never API keys.
const PLAIN: [&str; 6] = [
    "categories",
    "tiers",
    "routes",
    "grpc",
    "defaults",
    "shadow",
];

/// Names the loader itself gives, which a message may always quote.
const VOCABULARY: [&str; 40] = [
    "true",
    "false",
    "categories",
    "defaults",
    "tiers",
    "routes",
    "grpc",
    "keys",
    "overrides",
    "custom_limits",
    "boosts",
    "shadow",
    "read",
    "write",
    "unknown_key",
    "missing_key",
    "method",
    "path",
    "category",
    "cost",
    "exempt",
    "service",
    "key",
    "tier",
    "account",
    "adjust",
    "start",
    "end",
    "all",
    "requests",
    "tokens",
    "refund_on",
    "concurrency",
    "pool",
    "priority_reserve",
    "per_account",
    "per_org",
    "org",
    "account_limits",
    "org_limits",
];

/// The loader's error for an error of the TOML parser (or of serde on the
/// parsed document).
pub(super) fn parser_error(source: &str, e: &toml::de::Error, lines: &Lines) -> PolicyError {
    let message = e.message().trim();
    let Some(span) = e.span() else {
        return PolicyError::new("(file)", None, scrub(message, &[]));
    };
    let place = Place::of(source, span.start);
    PolicyError::new(place.entry(), lines.of(span.start), place.message(message))
}

/// Where an offset of the document stands: the keys from the root to it.
#[derive(Debug, Default, PartialEq)]
struct Place {
    /// The keys of the table header in force (`[tiers.free]`).
    header: Vec<String>,
    /// For an array of tables (`[[routes]]`), the table's index in it.
    index: Option<usize>,
    /// The keys of the key/value written there, after the header's: dotted
    /// keys and the keys of inline tables.
    keys: Vec<String>,
    /// Whether the table header in force is one the parser recovered from
    /// (an invalid key in it, `[custom_limits.+."KEY"]`, or an error
    /// event): its keys are not where the file means them, and in a
    /// section that holds API keys none of them is named.
    broken: bool,
    /// Set when a line ended inside an inline table or an array: how many
    /// of `keys` stood before the outermost one opened. TOML lets such a
    /// value run on over lines, so an unfinished one takes in the lines
    /// after it (`tiers = { free =` then `[keys]` then `"KEY" = …`): keys
    /// read after the line's end are not named.
    spilled: Option<usize>,
}

impl Place {
    /// The place of byte `offset` of `source`. A document the parser
    /// refuses still has its events up to (and past) the error.
    fn of(source: &str, offset: usize) -> Place {
        let source = Source::new(source);
        let tokens = source.lex().into_vec();
        let mut events: Vec<Event> = Vec::new();
        toml_parser::parser::parse_document(&tokens, &mut events, &mut ());
        let mut walk = Walk::default();
        for event in &events {
            // A header is one place: an error on its last key names it all.
            if event.span().start() > offset && !walk.in_header {
                break;
            }
            walk.step(source, event);
        }
        walk.place
    }

    /// The keys from the root, as far as they can be named:
    ///
    /// - a broken header (see `broken`) outside the sections that never
    ///   hold a key is named by its section alone;
    /// - keys an unfinished value took in (see `spilled`) are not named,
    ///   nor a key holding a line break, nor anything after it;
    /// - empty keys are left out: in `[overrides.""."KEY"]` the API key
    ///   then stands where it is redacted, not where a category is named.
    fn path(&self) -> Vec<&str> {
        let section = self.header.first().map(String::as_str);
        let named = if self.broken && !section.is_some_and(|s| PLAIN.contains(&s)) {
            1
        } else {
            self.spilled.map_or(usize::MAX, |n| self.header.len() + n)
        };
        self.header
            .iter()
            .chain(&self.keys)
            .map(String::as_str)
            .take(named)
            // A key with a line break is a string that took in the lines
            // after it (`[tiers.'''` then `[keys]`): it and what follows are
            // not named.
            .take_while(|k| !k.contains(['\n', '\r']))
            .filter(|k| !k.is_empty())
            .collect()
    }

    /// The entry to name: a path, with any API key redacted.
    fn entry(&self) -> String {
        let indexed = |name: &str| match self.index.filter(|_| self.header.len() == 1) {
            Some(i) => format!("{name}[{i}]"),
            None => name.to_owned(),
        };
        let redacted = |key: &str| KeyId::of(key).redacted();
        match self.path().as_slice() {
            [section @ ("routes" | "grpc" | "boosts"), ..] => indexed(section),
            [section, ..] if PLAIN.contains(section) => {
                self.path().join(".").chars().take(60).collect()
            }
            ["keys", key, ..] => format!("keys.\"{}\"", redacted(key)),
            ["overrides" | "custom_limits", key] => {
                format!("custom_limits.\"{}\"", redacted(key))
            }
            ["overrides" | "custom_limits", key, category, ..] => {
                let category: String = category.chars().take(40).collect();
                format!("custom_limits.\"{}\".{category}", redacted(key))
            }
            ["keys"] => "keys".to_owned(),
            ["overrides" | "custom_limits"] => "custom_limits".to_owned(),
            _ => "(file)".to_owned(),
        }
    }

    /// The parser's message, whole where no key can stand, else scrubbed
    /// of all it quotes but the place's fields and the loader's words.
    fn message(&self, message: &str) -> String {
        let path = self.path();
        let fields: &[&str] = match path.as_slice() {
            [section, ..] if PLAIN.contains(section) => return message.to_owned(),
            ["keys" | "overrides" | "custom_limits", _, fields @ ..] | ["boosts", fields @ ..] => {
                fields
            }
            _ => &[],
        };
        scrub(message, fields)
    }
}

/// The parser's events read in order, up to a place.
#[derive(Default)]
struct Walk {
    place: Place,
    in_header: bool,
    array_header: bool,
    /// How many tables each array of tables has had so far.
    counts: Vec<(Vec<String>, usize)>,
    /// The open inline tables (`true`) and arrays, each with the length of
    /// `place.keys` where it opened.
    frames: Vec<(bool, usize)>,
    /// Whether the last event was a `.` between keys: the next key
    /// continues a dotted key rather than starting a key/value.
    dotted: bool,
}

impl Walk {
    fn step(&mut self, source: Source<'_>, event: &Event) {
        let kind = event.kind();
        let p = &mut self.place;
        match kind {
            EventKind::StdTableOpen | EventKind::ArrayTableOpen => {
                *p = Place::default();
                self.frames.clear();
                self.in_header = true;
                self.array_header = kind == EventKind::ArrayTableOpen;
            }
            EventKind::StdTableClose | EventKind::ArrayTableClose => self.close_header(),
            EventKind::SimpleKey => {
                let mut key = String::new();
                let mut invalid: Option<toml_parser::ParseError> = None;
                if let Some(raw) = source.get(event) {
                    raw.decode_key(&mut key, &mut invalid);
                }
                if self.in_header {
                    p.broken |= invalid.is_some();
                    p.header.push(key);
                } else {
                    if !self.dotted {
                        p.keys.truncate(self.frames.last().map_or(0, |f| f.1));
                    }
                    p.keys.push(key);
                }
            }
            EventKind::Error if self.in_header => p.broken = true,
            EventKind::Newline => {
                if let Some(&(_, outermost)) = self.frames.first() {
                    p.spilled.get_or_insert(outermost);
                }
                // A header ends with its line, closed or not: an unclosed
                // one does not take in the keys of the next line.
                self.close_header();
            }
            EventKind::InlineTableOpen => self.frames.push((true, p.keys.len())),
            EventKind::ArrayOpen => self.frames.push((false, p.keys.len())),
            EventKind::InlineTableClose | EventKind::ArrayClose => {
                if let Some((_, len)) = self.frames.pop() {
                    p.keys.truncate(len);
                }
                if self.frames.is_empty() {
                    // Closed: the keys after it are read where they stand.
                    p.spilled = None;
                }
            }
            _ => {}
        }
        match kind {
            EventKind::KeySep => self.dotted = true,
            EventKind::Whitespace | EventKind::Comment => {}
            _ => self.dotted = false,
        }
    }

    fn close_header(&mut self) {
        if !self.in_header {
            return;
        }
        self.in_header = false;
        if !self.array_header {
            return;
        }
        let header = &self.place.header;
        let n = match self.counts.iter_mut().find(|(h, _)| h == header) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.counts.push((header.clone(), 1));
                1
            }
        };
        self.place.index = Some(n - 1);
    }
}

/// `message` with whatever it quotes (in backticks or double quotes)
/// replaced by `…`, but for the loader's vocabulary, `fields`, and
/// punctuation (`=`, `]`). serde's `unknown field `X`, expected …` is read
/// up to its last `` `, expected ``, so a backtick in `X` cannot end it early.
fn scrub(message: &str, fields: &[&str]) -> String {
    let shown = |q: &str| {
        VOCABULARY.contains(&q)
            || fields.contains(&q)
            || (!q.is_empty() && q.len() <= 3 && !q.chars().any(char::is_alphanumeric))
    };
    for prefix in ["unknown field `", "unknown variant `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let end = ["`, expected ", "`, there are no "]
                .iter()
                .filter_map(|s| rest.rfind(s))
                .max()
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let name = if shown(name) { name } else { "…" };
            let tail = rest.get(end + 1..).unwrap_or("");
            return format!("{prefix}{name}`{}", scrub_quotes(tail, &shown));
        }
    }
    scrub_quotes(message, &shown)
}

fn scrub_quotes(message: &str, shown: &dyn Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '`' && c != '"' {
            continue;
        }
        let mut quoted = String::new();
        let mut closed = false;
        while let Some(d) = chars.next() {
            if d == c {
                closed = true;
                break;
            }
            quoted.push(d);
            // serde writes strings as Rust does: `\"` does not close them.
            if c == '"' && d == '\\' {
                quoted.extend(chars.next());
            }
        }
        out.push_str(if shown(&quoted) { &quoted } else { "…" });
        if closed {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(source: &str, at: &str) -> Place {
        Place::of(source, source.find(at).unwrap())
    }

    #[test]
    fn places_are_read_as_the_parser_reads_them() {
        let src = "a = 1\n[keys]\n\"n\" = \"\"\"\n[tiers.free]\n\"\"\"\n\"SECRET\" = 1\n";
        let p = place(src, "\"SECRET\"");
        assert_eq!(p.path(), ["keys", "SECRET"]);
        assert_eq!(
            p.entry(),
            format!("keys.\"{}\"", KeyId::of("SECRET").redacted())
        );
        let src = "[[routes]]\npath = \"/a\"\n[[routes]]\npath = '''\n[keys]\n'''\ncots = 5\n";
        let p = place(src, "cots");
        assert_eq!((p.path(), p.index), (vec!["routes", "cots"], Some(1)));
        assert_eq!(p.entry(), "routes[1]");
        let src = "[keys]\nk = { tier = \"a\", acount = [1, { x = 2 }] }\n";
        assert_eq!(place(src, "acount").path(), ["keys", "k", "acount"]);
        assert_eq!(place(src, "x =").path(), ["keys", "k", "acount", "x"]);
        let src = "keys.\"k\" . tier = 1\n[overrides.\"k\".read]\nrequests = 1\n";
        assert_eq!(place(src, "tier").path(), ["keys", "k", "tier"]);
        assert_eq!(
            place(src, "requests").path(),
            ["overrides", "k", "read", "requests"]
        );
        assert_eq!(place(src, "\"k\".read").path(), ["overrides", "k", "read"]);
    }

    /// Places the parser recovers from (found by the fuzzer and two
    /// attacks). A header with an empty or invalid key where the API key
    /// stands moves the key to where a category is named in full: such a
    /// header is named by its section alone (the sections that never hold
    /// a key keep their path, and a valid empty key is left out of it). An
    /// unfinished inline table or array takes in the lines after it: the
    /// keys it takes in are not named.
    #[test]
    fn no_key_is_named_where_the_parser_recovered() {
        for header in [
            "[overrides..\"SECRET\"]",
            "[custom_limits.+.\"SECRET\"]",
            "[overrides.$.'SECRET']",
            "[overrides.\"\\q\".SECRET]",
            "[keys.:.\"SECRET\"]",
            "[custom_limits.+.\"\\u0053ECRET\"]",
        ] {
            let src = format!("{header}\nread = \"1/s\"\n");
            let e = crate::Policy::from_toml_str(&src).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("SECRET"), "{header}: {shown}");
            let section = if header.contains("keys") {
                "keys"
            } else {
                "custom_limits"
            };
            assert_eq!(e.entry(), section, "{header}");
        }
        // An unfinished inline table or array takes in the lines after it:
        // a key it takes in is not named, in any section.
        for src in [
            "tiers = { free = \n[keys]\n\"SECRET\" = \"pro\"\n",
            "[tiers.free]\nread = { requests = \n[keys]\n\"SECRET\" = \"pro\"\n",
            "[shadow]\nall = { a = \n[custom_limits]\n\"SECRET\".read = \"1/s\"\n",
            "categories = [ { a = \n[keys]\n'SECRET' = \"pro\"\n",
            "defaults = { read = \nkeys.\"\\u0053ECRET\" = \"pro\"\n",
            // Nor through empty keys before it, a key that is a string
            // taking in the lines after it, or a header left unclosed
            // (found by a third attack).
            "[tiers.'']\nfree = { read = \n[keys]\n\"SECRET\" = \"pro\"\n",
            "tiers.\"\".\"\"= { free = \n[keys]\n\"SECRET\" = \"pro\"\n",
            "[tiers.x]\n'''\n[keys]\n\"SECRET\" = \"pro\"\n",
            "[tiers.\"\"\"\n[keys]\n\"SECRET\" = \"pro\"\n",
            "tiers = { free = { '''\n[keys]\n\"SECRET\" = \"pro\"\n''' = 1 } }\n",
            "[tiers.free\n\"SECRET\" = \"pro\"\n",
        ] {
            let e = crate::Policy::from_toml_str(src).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("SECRET"), "{src}: {shown}");
        }
        let src = "[tiers.free]\nread = { requests = \"1/s\",\n tokens = 1 }\nwrite = x\n";
        assert_eq!(place(src, "x\n").path(), ["tiers", "free", "write"]);
        let src = "[tiers.+.free]\nread = \"1/s\"\n";
        assert_eq!(place(src, "+").path(), ["tiers", "+", "free"]);
        let src = "[overrides.\"KEY\"]\nread = 1\n[overrides.+.\"KEY\"]\nread = 1\n";
        assert_eq!(place(src, "read").path(), ["overrides", "KEY", "read"]);
        let src = "[overrides.\"\".\"KEY\"]\nread = 1\n";
        assert_eq!(place(src, "read").path(), ["overrides", "KEY", "read"]);
    }

    #[test]
    fn scrubbing_keeps_only_words_of_the_loader() {
        assert_eq!(scrub("duplicate key", &[]), "duplicate key");
        assert_eq!(
            scrub("invalid type: string \"a\\\"b `c`\", expected u32", &[]),
            "invalid type: string \"…\", expected u32"
        );
        assert_eq!(
            scrub("unknown field `x`y`, expected `key` or `tier`", &[]),
            "unknown field `…`, expected `key` or `tier`"
        );
        assert_eq!(
            scrub(
                "unknown field `catgory`, expected one of `key`",
                &["catgory"]
            ),
            "unknown field `catgory`, expected one of `key`"
        );
        assert_eq!(scrub("expected `=`, `]`", &[]), "expected `=`, `]`");
        assert_eq!(scrub("unclosed `secret", &[]), "unclosed `…");
    }
}
