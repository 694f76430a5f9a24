//! What must hold for any input, whoever sends it: shared by the `cargo
//! fuzz` targets (`fuzz/`, nightly) and their stable replay in CI
//! (`tests/fuzz_replay.rs`). Each function panics when a property fails.

#![allow(unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tierlimit::{
    ApiKey, Extractor, MemoryBackend, Policy, RateLimitLayer,
    extract::{Identity, Rejection, RequestRef},
};
use tower::{Layer, Service, ServiceExt};

/// The policy loader never panics; an error names an entry and never
/// echoes a listed key.
pub fn policy_loader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Policy::from_toml_str(text) {
        let shown = format!("{e} {e:?}");
        assert!(!e.message().is_empty(), "{shown}");
        // Where the key is written only where keys belong (`[keys]`,
        // `[overrides."…"]`, `[[boosts]]`) or in a table the loader does not
        // know, it is a key, and no error may repeat it. (Written as a
        // category, a route field, a tier or inside a string, it is not a
        // key, and an error may name it.)
        if written_only_as_a_key(text, SECRET_KEY) {
            assert!(!shown.contains(SECRET_KEY), "key echoed: {shown}");
        }
    }
}

/// Whether `key` is written in `text`, and every token that holds it
/// stands where the loader reads an API key: a key of `[keys]` (`"KEY" =
/// …`, `"KEY".tier = …`, `keys = { "KEY" = … }`, `[keys."KEY"]`), an
/// override's header (`[overrides."KEY"]`), a boost's `key = "KEY"`; or
/// anywhere in a table the loader does not know (a typo of `[keys]`). The
/// text is read with TOML's own lexer (`toml_parser`), the same tokens the
/// parser reads, so a multi-line string is one value whatever its lines
/// look like.
pub fn written_only_as_a_key(text: &str, key: &str) -> bool {
    const KNOWN: [&str; 14] = [
        "categories",
        "tiers",
        "routes",
        "grpc",
        "defaults",
        "shadow",
        "keys",
        "overrides",
        "custom_limits",
        "account_limits",
        "org_limits",
        "boosts",
        "envoy",
        "overload",
    ];
    let mut seen = false;
    let mut header: Vec<String> = Vec::new();
    for line in logical_lines(text) {
        let names: Vec<String> = line.iter().filter_map(name).collect();
        let is_header = line.first().is_some_and(|t| t.1 == "[");
        if is_header {
            header = names.clone();
        }
        for (i, (kind, raw)) in line.iter().enumerate() {
            if !raw.contains(key) {
                continue;
            }
            seen = true;
            let section = if is_header { &names } else { &header };
            let unknown = section
                .first()
                .or(names.first().filter(|_| header.is_empty()))
                .is_some_and(|s| !KNOWN.contains(&s.as_str()));
            let at = |j: usize| line.get(j).map(|t| t.1);
            let ok = unknown
                || match (is_header, header.first().map(String::as_str)) {
                    // `[keys."KEY"]`, `[overrides."KEY"]`, `[custom_limits."KEY"]`:
                    // the header's second name, no other (a key written as
                    // a category, `[overrides."k"."KEY"]`, is a category).
                    (true, _) => {
                        matches!(
                            section.first().map(String::as_str),
                            Some("keys" | "overrides" | "custom_limits")
                        ) && is_key_token(*kind)
                            && line[..=i].iter().filter_map(name).count() == 2
                    }
                    // `"KEY" = …`, `"KEY".tier = …` under `[keys]`.
                    (false, Some("keys")) => header.len() == 1 && i == 0,
                    (false, Some("boosts")) => {
                        header.len() == 1 && i == 2 && at(0) == Some("key") && at(1) == Some("=")
                    }
                    // `keys = { "KEY" = …, "KEY" = … }` at the top level.
                    (false, None) => {
                        at(0) == Some("keys")
                            && matches!(at(i - 1), Some("{" | ","))
                            && at(i + 1) == Some("=")
                            && depth_at(&line, i) == 1
                    }
                    (false, Some(_)) => false,
                };
            if !ok {
                return false;
            }
        }
    }
    seen
}

type Tok<'a> = (toml_parser::lexer::TokenKind, &'a str);

/// The significant tokens of `text`, by logical line: a newline inside
/// brackets (an array, an inline table) does not end one.
fn logical_lines(text: &str) -> Vec<Vec<Tok<'_>>> {
    use toml_parser::lexer::TokenKind as K;
    let tokens = toml_parser::Source::new(text).lex().into_vec();
    let (mut lines, mut line, mut depth) = (Vec::new(), Vec::new(), 0usize);
    for t in &tokens {
        let raw = &text[t.span().start()..t.span().end()];
        match t.kind() {
            K::Whitespace | K::Comment | K::Eof => {}
            K::Newline if depth == 0 => lines.push(std::mem::take(&mut line)),
            K::Newline => {}
            kind => {
                let header = line.first().is_some_and(|t: &Tok<'_>| t.1 == "[");
                match kind {
                    K::LeftSquareBracket | K::LeftCurlyBracket if !(header || line.is_empty()) => {
                        depth += 1;
                    }
                    K::RightSquareBracket | K::RightCurlyBracket if !header => {
                        depth = depth.saturating_sub(1);
                    }
                    _ => {}
                }
                line.push((kind, raw));
            }
        }
    }
    lines.push(line);
    lines
}

/// How many brackets are open before token `i` of a line.
fn depth_at(line: &[Tok<'_>], i: usize) -> usize {
    line[..i].iter().fold(0usize, |d, t| match t.1 {
        "[" | "{" => d + 1,
        "]" | "}" => d.saturating_sub(1),
        _ => d,
    })
}

fn is_key_token(kind: toml_parser::lexer::TokenKind) -> bool {
    use toml_parser::lexer::TokenKind as K;
    matches!(kind, K::Atom | K::BasicString | K::LiteralString)
}

/// A key's text as written (quotes off; escapes left as they are).
fn name(t: &Tok<'_>) -> Option<String> {
    is_key_token(t.0).then(|| {
        let raw = t.1;
        match t.0 {
            toml_parser::lexer::TokenKind::Atom => raw.to_owned(),
            _ => raw
                .get(1..raw.len().saturating_sub(1))
                .unwrap_or("")
                .to_owned(),
        }
    })
}

/// The API key the corpora and the replay write into policies.
pub const SECRET_KEY: &str = "sk-live-0123456789";

const POLICY: &str = r#"
categories = ["read", "write", "ai"]
[defaults]
unknown_key = "free"
[tiers.free]
read = "5/minute"
write = "3/minute"
ai = "2/minute"
priority_reserve = "40%"
[tiers.pro]
read = "4294967295/3650d"
write = "unlimited"
ai = "2/3650d"
[[routes]]
path = "/v1/ai/*"
category = "ai"
cost = 2
[keys]
"listed-key" = "pro"
"#;

fn drive<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("the memory backend's path never became ready");
}

/// A count from `x-batch-size` that multiplies the route's cost.
fn batch(req: &RequestRef<'_>, policy: &Policy) -> Result<Identity, Rejection> {
    let id = ApiKey::new().extract(req, policy)?;
    match req.headers.get("x-batch-size") {
        None => Ok(id),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|n| id.with_cost(n))
            .ok_or(Rejection::InvalidCost("not a count")),
    }
}

/// Any request head, hostile or not: the layer answers with a status the
/// client can act on (never a 5xx on the memory backend, never a panic),
/// and no header or body repeats the API key that was sent.
pub fn request_headers(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.split(|&b| b == 0xff);
    let mut req = Request::builder()
        .method(if flags & 1 == 0 { "GET" } else { "POST" })
        .uri(match flags >> 1 & 3 {
            0 => "/v1/things",
            1 => "/v1/ai/completions",
            2 => "/pkg.Service/Method",
            _ => "/",
        })
        .body(Full::new(Bytes::new()))
        .unwrap();
    if flags & 8 != 0 {
        req.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
    }
    let mut sent_key: Option<Vec<u8>> = None;
    for name in [
        "authorization",
        "x-api-key",
        "x-request-priority",
        "x-batch-size",
        "x-api-key",
    ] {
        let Some(value) = parts.next() else { break };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            if name == "x-api-key" || name == "authorization" {
                sent_key = Some(value.to_vec());
            }
            req.headers_mut().append(name, v);
        }
    }
    let layer = RateLimitLayer::builder(Policy::from_toml_str(POLICY).unwrap())
        .extractor(batch)
        .backend(MemoryBackend::new())
        .build();
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let mut svc = layer.layer(inner);
    for _ in 0..3 {
        let res = drive(async {
            let svc = svc.ready().await.unwrap();
            svc.call(req_clone(&req)).await.unwrap()
        });
        let status = res.status();
        assert!(
            !status.is_server_error(),
            "{status} for {:?}",
            req.headers()
        );
        let (head, body) = res.into_parts();
        let body = drive(body.collect()).unwrap().to_bytes();
        // Keys carrying the marker `K3Y` (or the listed key) are checked:
        // no fixed text of the layer contains them, so any match is an echo.
        let marked = |k: &&[u8]| {
            k.windows(3).any(|w| w == b"K3Y") || k.windows(10).any(|w| w == b"listed-key")
        };
        if let Some(key) = sent_key.as_deref().filter(marked) {
            let key = key.strip_prefix(b"Bearer ").unwrap_or(key);
            let shows = |hay: &[u8]| hay.windows(key.len()).any(|w| w == key);
            assert!(!shows(&body), "the body repeats the key");
            for v in head.headers.values() {
                assert!(!shows(v.as_bytes()), "a header repeats the key");
            }
        }
        if status == StatusCode::OK && flags & 8 == 0 {
            assert!(head.headers.get("grpc-status").is_none());
        }
    }
}

fn req_clone(req: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::new()));
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    r
}

#[cfg(feature = "client")]
/// Any response head a server (or a man in the middle) sends: the retry
/// client's reading never panics, and an HTTP status other than 429 without
/// `grpc-status: 8` is never a refusal.
pub fn client_hints(data: &[u8]) {
    use tierlimit::client::{RetryHint, retry_hint};
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // Five header values split by 0xff; whatever follows is raw bytes.
    let mut rest = rest;
    let mut headers = http::HeaderMap::new();
    for name in [
        "retry-after",
        "x-ratelimit-reset",
        "grpc-status",
        "grpc-retry-pushback-ms",
        "grpc-status-details-bin",
    ] {
        let (value, tail) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        rest = tail;
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.insert(name, v);
        }
    }
    // The details as the server would send them: base64 of raw bytes.
    if flags & 1 == 1 && !rest.is_empty() {
        let encoded = base64_standard(rest);
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert(
            "grpc-status-details-bin",
            HeaderValue::from_str(&encoded).unwrap(),
        );
    }
    let status = match flags & 6 {
        2 | 6 => StatusCode::TOO_MANY_REQUESTS,
        4 => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    let verdict = retry_hint(status, &headers);
    let grpc = |code: &[u8]| {
        headers
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == code)
    };
    let refused = status == StatusCode::TOO_MANY_REQUESTS || grpc(b"8");
    // Shed: a 503 that asks for a delay, or gRPC UNAVAILABLE with one.
    let shed = (status == StatusCode::SERVICE_UNAVAILABLE && headers.contains_key("retry-after"))
        || grpc(b"14");
    match verdict {
        RetryHint::Refused(_) => assert!(refused, "{status} {headers:?}"),
        RetryHint::Shed(_) => assert!(!refused && shed, "{status} {headers:?}"),
        RetryHint::NotRefused => assert!(!refused, "{status} {headers:?}"),
        _ => {}
    }
}

#[cfg(feature = "client")]
fn base64_standard(raw: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in raw.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
