//! The demo's `/metrics` after known traffic shows the exact counts; a
//! refusal emits a debug event with tier, category, a redacted key and the
//! retry delay.
#![cfg(feature = "metrics")]

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_tiers.rs"]
mod demo;

use common::{client, serve, spec_policy};
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
    let backend = common::fake_memory();
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

    // Token metering and refunds: a server with token limits on `ai` and
    // refunds of server errors on `write`.
    let policy =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml"))
            .unwrap()
            .replacen(
                "ai = \"50/hour\"",
                "ai = { requests = \"50/hour\", tokens = \"1000/hour\" }\nrefund_on = [\"5xx\"]",
                1,
            );
    let backend = common::fake_memory();
    let layer = demo::limits(tierlimit::Policy::from_toml_str(&policy).unwrap(), backend);
    let tokens = serve(
        demo::app(layer.clone()).merge(
            axum::Router::new()
                .route(
                    "/v1/fail",
                    axum::routing::post(|| async { axum::http::StatusCode::BAD_GATEWAY }),
                )
                .layer(layer),
        ),
    )
    .await;
    // 400 used of 1 reserved: 399 charged; 10 used of 500 reserved: 490 back.
    c.post(tokens.url("/v1/ai/completions"))
        .header("x-api-key", "free-demo-key")
        .json(&serde_json::json!({ "prompt": "hello world", "max_tokens": 398 }))
        .send()
        .await
        .unwrap();
    c.post(tokens.url("/v1/ai/completions"))
        .header("x-api-key", "free-demo-key")
        .header("x-max-tokens", "500")
        .json(&serde_json::json!({ "prompt": "a b c", "max_tokens": 7 }))
        .send()
        .await
        .unwrap();
    for _ in 0..3 {
        let res = c
            .post(tokens.url("/v1/fail"))
            .header("x-api-key", "free-demo-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502);
    }
    let text = c
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let cell = [("tier", "free"), ("category", "ai")];
    assert_eq!(
        sample(&text, "tierlimit_tokens_charged_total", &cell),
        Some(399.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tierlimit_tokens_refunded_total", &cell),
        Some(490.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "tierlimit_refunds_total",
            &[("tier", "free"), ("category", "write")]
        ),
        Some(3.0),
        "{text}"
    );
    // Refusals by reason: the two training refusals above were the rate's.
    let refusals = |category, reason| {
        sample(
            &text,
            "tierlimit_refusals_total",
            &[("tier", "free"), ("category", category), ("reason", reason)],
        )
    };
    assert_eq!(refusals("training", "rate"), Some(2.0), "{text}");

    // Concurrency: one training job at once; leases held, and a refusal
    // for concurrency.
    let policy =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.toml"))
            .unwrap()
            .replacen(
                "training = \"5/day\"",
                "training = { requests = \"5/day\", concurrency = 1 }",
                1,
            );
    let backend = common::fake_memory();
    let layer = demo::limits(tierlimit::Policy::from_toml_str(&policy).unwrap(), backend);
    let leases = serve(demo::app(layer)).await;
    let held = |text: &str| {
        sample(
            text,
            "tierlimit_leases_held",
            &[("tier", "free"), ("category", "training")],
        )
    };
    let slow = {
        let (c, url) = (c.clone(), leases.url("/v1/training/jobs?delay_ms=10000"));
        tokio::spawn(async move {
            c.post(url)
                .header("x-api-key", "free-demo-key")
                .send()
                .await
        })
    };
    let metrics = async || {
        c.get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Wait (boundedly) for the slow job to be admitted.
    let mut text = metrics().await;
    for _ in 0..500 {
        if held(&text) == Some(1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        text = metrics().await;
    }
    assert_eq!(held(&text), Some(1.0), "{text}");
    let res = c
        .post(leases.url("/v1/training/jobs"))
        .header("x-api-key", "free-demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    slow.abort();
    let mut text = metrics().await;
    for _ in 0..500 {
        if held(&text) == Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        text = metrics().await;
    }
    assert_eq!(held(&text), Some(0.0), "{text}");
    let refusals = |category, reason| {
        sample(
            &text,
            "tierlimit_refusals_total",
            &[("tier", "free"), ("category", category), ("reason", reason)],
        )
    };
    assert_eq!(refusals("training", "concurrency"), Some(1.0), "{text}");
    assert_eq!(refusals("training", "rate"), Some(2.0), "{text}");

    // Admin changes are counted by action and by who made them.
    let layer = demo::limits(spec_policy(), MemoryBackend::new());
    let admin = serve(demo::app_with_admin(layer, Some("metrics-admin-token"))).await;
    for tier in ["pro", "enterprise"] {
        let res = c
            .put(admin.url("/admin/v1/keys"))
            .header("authorization", "Bearer metrics-admin-token")
            .json(&serde_json::json!({ "key": "metrics-new-key", "tier": tier }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let text = metrics().await;
    assert_eq!(
        sample(
            &text,
            "tierlimit_admin_changes_total",
            &[("action", "put_key"), ("who", "admin")]
        ),
        Some(2.0),
        "{text}"
    );
    assert!(!text.contains("metrics-new-key"));
    every_metric_has_help_and_promtool_accepts(&text);
}

/// `promtool` (Debian package `prometheus`), if installed; without it the
/// caller skips, printing why, unless `TIERLIMIT_REQUIRE_PROMTOOL=1` (CI).
fn promtool() -> Option<&'static str> {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    if std::env::var("TIERLIMIT_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1") {
        panic!("TIERLIMIT_REQUIRE_PROMTOOL=1 but no promtool on PATH");
    }
    eprintln!("SKIPPED: no promtool on PATH (apt-get install prometheus to run this check)");
    None
}

/// Runs `promtool ARGS` with `input` on stdin; its output, if it failed.
fn run_promtool(args: &[&str], input: Option<&str>) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Every tierlimit metric in `text` is one of `telemetry::METRICS`, with
/// its help text; and promtool accepts the whole text.
fn every_metric_has_help_and_promtool_accepts(text: &str) {
    let mut seen = 0;
    for line in text.lines().filter(|l| l.starts_with("# TYPE tierlimit_")) {
        let name = line.split_whitespace().nth(2).unwrap();
        let info = tierlimit::telemetry::METRICS
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} is not in telemetry::METRICS"));
        let help = format!("# HELP {name} {}", info.help);
        assert!(text.contains(&help), "no help for {name}:\n{text}");
        seen += 1;
    }
    assert!(seen >= 10, "{seen} metrics:\n{text}");
    let Some(_) = promtool() else {
        return;
    };
    if let Err(problems) = run_promtool(&["check", "metrics"], Some(text)) {
        panic!("promtool check metrics:\n{problems}\n{text}");
    }
}
