//! [`Tier`]: a tier's entries, one kind at a time, each with the line it
//! was written on when it came from a file (the `[tiers.*]` sections are
//! built from them in `tiers.rs`).

use super::Located;
use crate::limit::{Limit, Rule};
use crate::meter::TokenKind;
use crate::policy::{Pool, RefundOn};

/// A tier's rules, one per category, for [`PolicyBuilder::tier`](crate::PolicyBuilder::tier).
///
/// ```
/// use tierlimit::{Limit, Tier};
///
/// let free = Tier::new("free")
///     .limit("read", Limit::per_hour(100))
///     .limit("training", Limit::per_day(5));
/// let enterprise = Tier::new("enterprise").unlimited("training");
/// # let _ = (free, enterprise);
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct Tier {
    pub(super) name: String,
    /// `None`: unlimited.
    pub(super) rules: Vec<Located<(String, Option<Vec<Limit>>)>>,
    pub(super) per_account: Vec<Located<(String, Vec<Limit>)>>,
    pub(super) per_org: Vec<Located<(String, Vec<Limit>)>>,
    /// Token limits: (category, limits, per account).
    pub(super) tokens: Vec<Located<(String, Vec<Limit>, bool)>>,
    /// Input-token limits, as `tokens`.
    pub(super) input_tokens: Vec<Located<(String, Vec<Limit>, bool)>>,
    /// Output-token limits, as `tokens`.
    pub(super) output_tokens: Vec<Located<(String, Vec<Limit>, bool)>>,
    pub(super) refund_on: Option<Located<RefundOn>>,
    pub(super) refunds: Vec<Located<(String, RefundOn)>>,
    /// Concurrency limits: (category, requests at once, per account).
    pub(super) concurrency: Vec<Located<(String, u32, bool)>>,
    pub(super) pool: Located<Pool>,
    pub(super) line: Option<usize>,
    pub(super) reserve: Option<Located<u8>>,
}

impl Tier {
    /// A tier named `name` with no rules yet.
    pub fn new(name: impl Into<String>) -> Self {
        Tier {
            name: name.into(),
            rules: Vec::new(),
            per_account: Vec::new(),
            per_org: Vec::new(),
            tokens: Vec::new(),
            input_tokens: Vec::new(),
            output_tokens: Vec::new(),
            refund_on: None,
            refunds: Vec::new(),
            concurrency: Vec::new(),
            pool: Located::new(Pool::Key),
            line: None,
            reserve: None,
        }
    }

    /// Limits `category` to `limit`.
    pub fn limit(self, category: impl Into<String>, limit: Limit) -> Self {
        self.rule(category, Rule::Limited(limit))
    }

    /// Limits `category` by every one of `limits` at once (a burst guard
    /// and a sustained budget: `[Limit::per_second(10), Limit::per_hour(1_000)]`).
    /// A request is allowed only if all of them admit it, and a refused
    /// request counts against none of them.
    ///
    /// ```
    /// use tierlimit::{Limit, Policy, Tier};
    ///
    /// let policy = Policy::builder()
    ///     .categories(["read", "write"])
    ///     .tier(
    ///         Tier::new("free")
    ///             .limits("read", [Limit::per_second(10), Limit::per_hour(100)])
    ///             .limit("write", Limit::per_hour(20)),
    ///     )
    ///     .build()
    ///     .unwrap();
    /// let (free, read) = (policy.tier("free").unwrap(), policy.category("read").unwrap());
    /// assert_eq!(policy.limits(free, read).per_key().len(), 2);
    /// ```
    pub fn limits(
        mut self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.rules
            .push(Located::new((category.into(), Some(limits))));
        self
    }

    /// Adds limits counted per *account* in `category`, on top of the
    /// per-key ones: every key of an account shares them. (A key without
    /// an account is its own account.)
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let pro = Tier::new("pro")
    ///     .limit("write", Limit::per_hour(100))                 // each key
    ///     .per_account("write", [Limit::per_hour(500)]);         // all of an account's keys
    /// # let _ = pro;
    /// ```
    pub fn per_account(
        mut self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.per_account
            .push(Located::new((category.into(), limits)));
        self
    }

    /// Limits `category` per organisation too: every key of every account
    /// of an organisation shares these limits
    /// ([`Identity::with_org`](crate::extract::Identity::with_org), or the
    /// `org` of a `[keys]` entry), checked with the per-key and per-account
    /// ones, all or nothing. An account without an organisation is its own.
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let pro = Tier::new("pro")
    ///     .limit("write", Limit::per_hour(100))                 // each key
    ///     .per_account("write", [Limit::per_hour(500)])          // each team
    ///     .per_org("write", [Limit::per_hour(2000)]);            // the whole company
    /// # let _ = pro;
    /// ```
    pub fn per_org(
        mut self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.per_org.push(Located::new((category.into(), limits)));
        self
    }

    /// Meters `category` in tokens: a request is admitted only if every
    /// token limit can cover its estimate
    /// ([`Identity::with_tokens`](crate::extract::Identity::with_tokens), else 1),
    /// which it reserves; the difference with what it reports through its
    /// [`TokenMeter`](crate::meter::TokenMeter) is settled when the response ends.
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let free = Tier::new("free")
    ///     .limit("ai", Limit::per_hour(50))
    ///     .tokens("ai", [Limit::per_hour(1_000)]);
    /// # let _ = free;
    /// ```
    pub fn tokens(
        self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.token_entry(TokenKind::Total, category.into(), limits, false, None)
    }

    /// Token limits counted per account, on top of the per-key ones.
    pub fn per_account_tokens(
        self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.token_entry(TokenKind::Total, category.into(), limits, true, None)
    }

    /// Meters `category`'s *input* tokens (a prompt's): like
    /// [`tokens`](Self::tokens), but counting only what a request reports
    /// as input ([`TokenMeter::add_input`](crate::meter::TokenMeter::add_input),
    /// [`TokenUsage::split`](crate::meter::TokenUsage::split)). A request
    /// reserves its estimate
    /// ([`Identity::with_tokens`](crate::extract::Identity::with_tokens), else 1)
    /// at admission.
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let free = Tier::new("free")
    ///     .limit("ai", Limit::per_hour(50))
    ///     .input_tokens("ai", [Limit::per_hour(20_000)])
    ///     .output_tokens("ai", [Limit::per_hour(5_000)]);
    /// # let _ = free;
    /// ```
    pub fn input_tokens(
        self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.token_entry(TokenKind::Input, category.into(), limits, false, None)
    }

    /// Meters `category`'s *output* tokens (a completion's): like
    /// [`tokens`](Self::tokens), but counting only what a request reports
    /// as output ([`TokenMeter::add_output`](crate::meter::TokenMeter::add_output)).
    /// A request reserves 1 output token at admission (its output is not
    /// known yet) and settles the rest when its response is over: an
    /// output past the limit is a debt that refuses the next requests until
    /// it is paid.
    pub fn output_tokens(
        self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.token_entry(TokenKind::Output, category.into(), limits, false, None)
    }

    /// Input-token limits counted per account, on top of the per-key ones.
    pub fn per_account_input_tokens(
        self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.token_entry(TokenKind::Input, category.into(), limits, true, None)
    }

    /// Output-token limits counted per account, on top of the per-key ones.
    pub fn per_account_output_tokens(
        self,
        category: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = limits.into_iter().collect();
        self.token_entry(TokenKind::Output, category.into(), limits, true, None)
    }

    /// Refunds requests of every category of the tier whose responses
    /// match (`RefundOn::none().class(5)`: server errors).
    pub fn refund_on(mut self, refund: RefundOn) -> Self {
        self.refund_on = Some(Located::new(refund));
        self
    }

    /// Refunds requests of one category whose responses match (in place of
    /// the tier's [`refund_on`](Self::refund_on)).
    pub fn refund_on_category(mut self, category: impl Into<String>, refund: RefundOn) -> Self {
        self.refunds.push(Located::new((category.into(), refund)));
        self
    }

    /// Limits how many requests of `category` one key (one account in a
    /// pooled tier) may have in flight at once. A request takes a lease at
    /// admission, in the same step as its rate limits, and gives it back
    /// when its response body ends or is dropped; a request over the limit
    /// is refused (429 `concurrency-limited`, `Retry-After: 1`) and counts
    /// against no rate limit.
    ///
    /// ```
    /// use tierlimit::{Limit, Tier};
    ///
    /// let free = Tier::new("free")
    ///     .limit("ai", Limit::per_hour(50))
    ///     .concurrency("ai", 2); // at most 2 AI calls at once per key
    /// # let _ = free;
    /// ```
    pub fn concurrency(mut self, category: impl Into<String>, requests: u32) -> Self {
        self.concurrency
            .push(Located::new((category.into(), requests, false)));
        self
    }

    /// Limits how many requests of `category` all of an account's keys
    /// together may have in flight at once.
    pub fn per_account_concurrency(mut self, category: impl Into<String>, requests: u32) -> Self {
        self.concurrency
            .push(Located::new((category.into(), requests, true)));
        self
    }

    /// A concurrency limit written on `line` (for the loader).
    pub(in crate::policy) fn concurrency_at(
        mut self,
        category: String,
        requests: u32,
        per_account: bool,
        line: Option<usize>,
    ) -> Self {
        self.concurrency
            .push(Located::at((category, requests, per_account), line));
        self
    }

    /// Token limits written on `line` (for the loader).
    pub(in crate::policy) fn tokens_at(
        self,
        category: String,
        limits: Vec<Limit>,
        per_account: bool,
        line: Option<usize>,
    ) -> Self {
        self.token_entry(TokenKind::Total, category, limits, per_account, line)
    }

    /// A cell's `input_tokens` and `output_tokens` written on `line` (for
    /// the loader), per key or per account.
    pub(in crate::policy) fn io_tokens_at(
        mut self,
        category: &str,
        [input, output]: [Option<Vec<Limit>>; 2],
        per_account: bool,
        line: Option<usize>,
    ) -> Self {
        for (kind, limits) in [(TokenKind::Input, input), (TokenKind::Output, output)] {
            if let Some(limits) = limits {
                self = self.token_entry(kind, category.to_owned(), limits, per_account, line);
            }
        }
        self
    }

    /// Token limits of `kind`, written on `line` (`None`: by the builder).
    fn token_entry(
        mut self,
        kind: TokenKind,
        category: String,
        limits: Vec<Limit>,
        per_account: bool,
        line: Option<usize>,
    ) -> Self {
        let entry = Located::at((category, limits, per_account), line);
        match kind {
            TokenKind::Input => self.input_tokens.push(entry),
            TokenKind::Output => self.output_tokens.push(entry),
            TokenKind::Total => self.tokens.push(entry),
        }
        self
    }

    /// A refund rule written on `line` (for the loader; `None`: the tier's).
    pub(in crate::policy) fn refund_at(
        mut self,
        category: Option<String>,
        refund: RefundOn,
        line: Option<usize>,
    ) -> Self {
        match category {
            Some(c) => self.refunds.push(Located::at((c, refund), line)),
            None => self.refund_on = Some(Located::at(refund, line)),
        }
        self
    }

    /// Whose count the tier's limits are kept in (default [`Pool::Key`]):
    /// with [`Pool::Account`], all keys of an account share them, so an
    /// account cannot multiply its plan by creating keys.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Located::new(pool);
        self
    }

    /// Leaves `category` unlimited.
    pub fn unlimited(self, category: impl Into<String>) -> Self {
        self.rule(category, Rule::Unlimited)
    }

    /// Reserves `percent` of every category's burst for requests that
    /// declare `X-Request-Priority: critical`: normal and sheddable requests
    /// are refused once only the reserve is left. Without a reserve, the
    /// tier ignores the header.
    pub fn priority_reserve(mut self, percent: u8) -> Self {
        self.reserve = Some(Located::new(percent));
        self
    }

    /// Sets the rule for `category`.
    pub fn rule(mut self, category: impl Into<String>, rule: Rule) -> Self {
        let limits = match rule {
            Rule::Limited(l) => Some(vec![l]),
            Rule::Unlimited => None,
        };
        self.rules.push(Located::new((category.into(), limits)));
        self
    }

    /// Records the line the tier's table starts on (for the loader).
    pub(in crate::policy) fn at(mut self, line: Option<usize>) -> Self {
        self.line = line;
        self
    }

    /// Rules written on `line` (for the loader; `None`: unlimited).
    pub(in crate::policy) fn rules_at(
        mut self,
        category: String,
        limits: Option<Vec<Limit>>,
        line: Option<usize>,
    ) -> Self {
        self.rules.push(Located::at((category, limits), line));
        self
    }

    /// Per-account limits written on `line` (for the loader).
    pub(in crate::policy) fn per_account_at(
        mut self,
        category: String,
        limits: Vec<Limit>,
        line: Option<usize>,
    ) -> Self {
        self.per_account.push(Located::at((category, limits), line));
        self
    }

    /// Per-organisation limits written on `line` (for the loader).
    pub(in crate::policy) fn per_org_at(
        mut self,
        category: String,
        limits: Vec<Limit>,
        line: Option<usize>,
    ) -> Self {
        self.per_org.push(Located::at((category, limits), line));
        self
    }

    /// A pool written on `line` (for the loader).
    pub(in crate::policy) fn pool_at(mut self, pool: Pool, line: Option<usize>) -> Self {
        self.pool = Located::at(pool, line);
        self
    }

    /// A reserve written on `line` (for the loader).
    pub(in crate::policy) fn priority_reserve_at(
        mut self,
        percent: u8,
        line: Option<usize>,
    ) -> Self {
        self.reserve = Some(Located::at(percent, line));
        self
    }
}
