//! Route rules ([`Route`]) and the `[[routes]]` / `[[grpc]]` sections:
//! each compiled to a path pattern and a target, its cost checked against
//! every tier.

use http::Method;

use super::names::{Names, join};
use super::{Located, PolicyBuilder, PolicyError};
use crate::policy::route::{CompiledRoute, Pattern};
use crate::policy::{CategoryId, Target};

/// A route rule: requests whose method and path match go to a category (or
/// are exempt).
///
/// Path patterns: literal segments, `{name}` or `:name` for one segment, and
/// a final `*` for the rest of the path. gRPC methods are paths too:
/// `/package.Service/Method`, or `/package.Service/*` for a whole service.
///
/// ```
/// use tierlimit::Route;
///
/// let jobs = Route::new("/v1/training/jobs", "training").method("POST");
/// let ai = Route::new("/v1/ai/*", "ai").cost(2);
/// let health = Route::exempt("/healthz");
/// # let _ = (jobs, ai, health);
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct Route {
    methods: Vec<String>,
    path: String,
    category: Option<String>,
    cost: u32,
    exempt: bool,
    /// Where it was written (a file's `routes[i]` or `grpc[i]`, and line).
    origin: Option<Origin>,
}

/// Where a route came from in a policy file.
#[derive(Clone, Debug)]
pub(super) struct Origin {
    pub(super) label: String,
    pub(super) line: Option<usize>,
}

impl Route {
    /// Requests to `path` (any method) count against `category`.
    pub fn new(path: impl Into<String>, category: impl Into<String>) -> Self {
        Route {
            methods: Vec::new(),
            path: path.into(),
            category: Some(category.into()),
            cost: 1,
            exempt: false,
            origin: None,
        }
    }

    /// Requests to `path` are not limited, need no key and get no headers.
    pub fn exempt(path: impl Into<String>) -> Self {
        Route {
            methods: Vec::new(),
            path: path.into(),
            category: None,
            cost: 1,
            exempt: true,
            origin: None,
        }
    }

    /// gRPC calls to `service` (a fully qualified name such as
    /// `grpc.health.v1.Health`), or only to its `method`, count against
    /// `category`. gRPC calls no rule matches are POSTs, so they fall in the
    /// default write category.
    ///
    /// ```
    /// use tierlimit::Route;
    ///
    /// let health = Route::grpc("grpc.health.v1.Health", None, "read");
    /// let submit = Route::grpc("demo.v1.Jobs", Some("Submit"), "training");
    /// # let _ = (health, submit);
    /// ```
    pub fn grpc(service: &str, method: Option<&str>, category: impl Into<String>) -> Self {
        let path = format!("/{service}/{}", method.unwrap_or("*"));
        Route::new(path, category).method("POST")
    }

    /// Restricts the rule to one method (call again to add more).
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.methods.push(method.into());
        self
    }

    /// How many units one request takes (default 1). A batch endpoint that
    /// does ten operations per request can cost 10.
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// A rule as the policy file states it (for the loader).
    pub(in crate::policy) fn from_file(
        methods: Vec<String>,
        path: String,
        category: Option<String>,
        cost: u32,
        exempt: bool,
    ) -> Self {
        Route {
            methods,
            path,
            category,
            cost,
            exempt,
            origin: None,
        }
    }

    /// Records where the rule was written.
    pub(in crate::policy) fn at(mut self, label: String, line: Option<usize>) -> Self {
        self.origin = Some(Origin { label, line });
        self
    }
}

impl PolicyBuilder {
    pub(super) fn build_routes(&self, names: &Names) -> Result<Vec<CompiledRoute>, PolicyError> {
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let (entry, line) = match &r.origin {
                Some(o) => (o.label.clone(), o.line),
                None => (format!("routes[{i}]"), None),
            };
            let err = |m: String| PolicyError::new(&entry, line, m);
            let pattern = Pattern::parse(&r.path).map_err(err)?;
            let methods = if r.methods.is_empty() {
                None
            } else {
                let mut ms = Vec::with_capacity(r.methods.len());
                for m in &r.methods {
                    let m = Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| err(format!("`{m}` is not an HTTP method")))?;
                    ms.push(m);
                }
                Some(ms.into_boxed_slice())
            };
            let target = match (&r.category, r.exempt) {
                (Some(_), true) => {
                    return Err(err(format!(
                        "route `{}` is exempt and also names a category; choose one",
                        r.path
                    )));
                }
                (None, true) => Target::Exempt,
                (None, false) => {
                    return Err(err(format!(
                        "route `{}` has no category; name one, or mark it `exempt = true`",
                        r.path
                    )));
                }
                (Some(cat), false) => {
                    let category = names.category(cat).ok_or_else(|| {
                        err(format!(
                            "unknown category `{cat}` (declared: {})",
                            join(&names.categories)
                        ))
                    })?;
                    if r.cost == 0 {
                        return Err(err(
                            "cost must be at least 1 (use `exempt = true` for free routes)".into(),
                        ));
                    }
                    for (t, name) in names.tiers.iter().enumerate() {
                        if let Some(l) =
                            names.limits(t, category.index()).find(|l| r.cost > l.max())
                        {
                            return Err(err(format!(
                                "cost {} is larger than tier `{name}`'s `{cat}` limit of {}, so such requests could never succeed",
                                r.cost,
                                l.max()
                            )));
                        }
                    }
                    Target::Category {
                        category,
                        cost: r.cost,
                    }
                }
            };
            routes.push(CompiledRoute {
                methods,
                pattern,
                target,
            });
        }
        Ok(routes)
    }

    pub(super) fn default_category(
        &self,
        spec: Option<&Located<String>>,
        fallback: &str,
        entry: &str,
        names: &Names,
    ) -> Result<CategoryId, PolicyError> {
        let (name, line) = spec.map_or((fallback, None), |l| (l.value.as_str(), l.line));
        names.category(name).ok_or_else(|| {
            PolicyError::new(
                entry,
                line,
                format!(
                    "category `{name}` for requests no route matches is not declared (declared: {})",
                    join(&names.categories)
                ),
            )
        })
    }
}
