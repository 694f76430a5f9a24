use http::Method;

use super::CategoryId;

/// A path pattern: literal segments, `{name}` or `:name` for any one
/// segment, and a final `*` for one or more remaining segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pattern {
    segments: Box<[Segment]>,
    tail: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Any,
}

impl Pattern {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix('/')
            .ok_or_else(|| format!("path `{s}` must start with `/`"))?;
        let mut segments = Vec::new();
        let mut tail = false;
        if !rest.is_empty() {
            let parts: Vec<&str> = rest.split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                if *part == "*" {
                    if i + 1 != parts.len() {
                        return Err(format!("in `{s}`, `*` may only be the last segment"));
                    }
                    tail = true;
                } else if (part.starts_with('{') && part.ends_with('}') && part.len() > 2)
                    || (part.starts_with(':') && part.len() > 1)
                {
                    segments.push(Segment::Any);
                } else if part.contains('*') || part.contains('{') || part.contains('}') {
                    return Err(format!(
                        "in `{s}`, segment `{part}` mixes text and wildcards; use `{{name}}` or a final `*`"
                    ));
                } else {
                    segments.push(Segment::Literal((*part).into()));
                }
            }
        }
        Ok(Pattern {
            segments: segments.into_boxed_slice(),
            tail,
        })
    }

    /// Matches a request path without allocating.
    pub(crate) fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for seg in self.segments.iter() {
            let Some(part) = parts.next() else {
                return false;
            };
            match seg {
                Segment::Literal(lit) if **lit != *part => return false,
                Segment::Any if part.is_empty() => return false,
                _ => {}
            }
        }
        if self.tail {
            // One or more further segments, the first non-empty.
            matches!(parts.next(), Some(p) if !p.is_empty())
        } else {
            match parts.next() {
                None => true,
                // A trailing slash: `/v1/account/` matches `/v1/account`.
                Some("") => parts.next().is_none(),
                Some(_) => false,
            }
        }
    }
}

/// Where a route sends matching requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Counted against `category`, each request costing `cost`.
    Category {
        /// The endpoint category.
        category: CategoryId,
        /// How many units one request takes.
        cost: u32,
    },
    /// Not limited at all; no key is needed and no headers are sent.
    Exempt,
}

#[derive(Clone, Debug)]
pub(crate) struct CompiledRoute {
    pub(crate) methods: Option<Box<[Method]>>,
    pub(crate) pattern: Pattern,
    pub(crate) target: Target,
}

impl CompiledRoute {
    #[inline]
    pub(crate) fn matches(&self, method: &Method, path: &str) -> bool {
        if let Some(methods) = &self.methods
            && !methods.iter().any(|m| m == method)
        {
            return false;
        }
        self.pattern.matches(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_params_and_tail() {
        let p = Pattern::parse("/v1/ai/*").unwrap();
        assert!(p.matches("/v1/ai/completions"));
        assert!(p.matches("/v1/ai/a/b"));
        assert!(!p.matches("/v1/ai"));
        assert!(!p.matches("/v1/ai/"));
        assert!(!p.matches("/v1/aix/completions"));

        let p = Pattern::parse("/v1/training/jobs").unwrap();
        assert!(p.matches("/v1/training/jobs"));
        assert!(p.matches("/v1/training/jobs/"));
        assert!(!p.matches("/v1/training/jobs/1"));
        assert!(!p.matches("/v1/training"));

        let p = Pattern::parse("/v1/clusters/{id}/nodes").unwrap();
        assert!(p.matches("/v1/clusters/42/nodes"));
        assert!(!p.matches("/v1/clusters//nodes"));
        let p = Pattern::parse("/v1/clusters/:id").unwrap();
        assert!(p.matches("/v1/clusters/42"));

        let p = Pattern::parse("/grpc.health.v1.Health/*").unwrap();
        assert!(p.matches("/grpc.health.v1.Health/Check"));

        let root = Pattern::parse("/").unwrap();
        assert!(root.matches("/"));
        assert!(!root.matches("/x"));
    }

    #[test]
    fn bad_patterns() {
        assert!(Pattern::parse("v1").unwrap_err().contains("start with"));
        assert!(
            Pattern::parse("/v1/*/x")
                .unwrap_err()
                .contains("last segment")
        );
        assert!(Pattern::parse("/v1/a*").unwrap_err().contains("mixes"));
    }
}
