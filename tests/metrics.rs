//! The demo's `/metrics` after known traffic shows the exact counts; a
//! refusal emits a debug event with tier, category, a redacted key and the
//! retry delay.
#![cfg(feature = "metrics")]

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use common::{client, serve, spec_policy};
use governor::clock::FakeRelativeClock;
use tierlimit::MemoryBackend;

/// The value of one sample, matched by name and labels (any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labelset, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let all = labels
            .iter()
            .all(|(k, v)| labelset.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        let count = if labelset.is_empty() {
            0
        } else {
            labelset.split(',').count()
        };
        (all && count == labels.len()).then(|| value.trim().parse().unwrap())
    })
}

#[tokio::test]
async fn metrics_after_known_traffic_are_exact() {
    demo::install_metrics();
    let backend = MemoryBackend::builder()
        .clock(FakeRelativeClock::default())
        .build();
    let server = serve(demo::app(demo::limits(spec_policy(), backend))).await;
    let c = client();
    for _ in 0..7 {
        c.post(server.url("/v1/training/jobs"))
            .header("x-api-key", "free-demo-key")
            .send()
            .await
            .unwrap();
    }
    for _ in 0..3 {
        c.get(server.url("/v1/account"))
            .header("x-api-key", "pro-demo-key")
            .send()
            .await
            .unwrap();
    }
    c.get(server.url("/v1/account")).send().await.unwrap();
    c.get(server.url("/v1/account"))
        .header("x-api-key", "nope")
        .send()
        .await
        .unwrap();
    c.get(server.url("/v1/account"))
        .header("x-api-key", "a b")
        .send()
        .await
        .unwrap();
    c.get(server.url("/v1/account"))
        .header("x-api-key", "nope2")
        .send()
        .await
        .unwrap();

    let res = c.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers().get("x-ratelimit-limit").is_none(),
        "/metrics is not limited"
    );
    let text = res.text().await.unwrap();
    let req = |tier, category, outcome| {
        sample(
            &text,
            "tierlimit_requests_total",
            &[("tier", tier), ("category", category), ("outcome", outcome)],
        )
    };
    assert_eq!(req("free", "training", "allowed"), Some(5.0), "{text}");
    assert_eq!(req("free", "training", "refused"), Some(2.0));
    assert_eq!(req("pro", "read", "allowed"), Some(3.0));
    let rej = |reason| sample(&text, "tierlimit_rejections_total", &[("reason", reason)]);
    assert_eq!(rej("missing-api-key"), Some(1.0));
    assert_eq!(rej("unknown-api-key"), Some(2.0));
    assert_eq!(rej("malformed-api-key"), Some(1.0));
    // Two keys tracked in memory (free training, pro read).
    assert_eq!(sample(&text, "tierlimit_tracked_keys", &[]), Some(2.0));
    // The check duration histogram saw every limited check.
    assert_eq!(
        sample(&text, "tierlimit_check_duration_seconds_count", &[]),
        Some(10.0)
    );
    // Labels never carry a key.
    assert!(!text.contains("demo-key") && !text.contains("nope"));
}
