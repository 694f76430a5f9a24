//! Envoy's rate limit service through a real tonic server on 127.0.0.1:0
//! and a real tonic client built from the same Envoy types: counts,
//! statuses and headers, several descriptors, costs, one count shared with
//! the HTTP layer, operator features, and the example configuration.
#![cfg(feature = "envoy")]

mod common;

use std::time::Duration;

use common::envoy::{
    NOW, OK, OVER, POLICY, ask, ask1, client, descriptor, header, layer, request, reset_secs, rls,
    rls_with, serve, why,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::google::protobuf::UInt64Value;
use governor::clock::FakeRelativeClock;
use tierlimit::envoy::RateLimitServer;
use tierlimit::{MemoryBackend, Policy, RateLimitLayer};

#[tokio::test]
async fn n_allowed_then_over_limit_with_exact_remaining_and_reset() {
    let (clock, _s, mut c) = rls(POLICY).await;
    let free_read = [("api_key", "free-key"), ("category", "read")];
    // 3 a minute: 3 at once, then one every 20 s.
    for (remaining, reset) in [(2, 20), (1, 40), (0, 60)] {
        let r = ask1(&mut c, &free_read).await;
        assert_eq!(r.overall_code, OK);
        let st = &r.statuses[0];
        assert_eq!(st.code, OK);
        assert_eq!(st.limit_remaining, remaining);
        assert_eq!(reset_secs(&r, 0), reset);
        let limit = st.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (3, Unit::Minute as i32)
        );
        assert_eq!(limit.name, "free.read");
        assert!(r.raw_body.is_empty());
    }
    let r = ask1(&mut c, &free_read).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses[0].code, OVER);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_eq!(reset_secs(&r, 0), 60);
    // 20 s later, one more.
    clock.advance(Duration::from_secs(20));
    let r = ask1(&mut c, &free_read).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_eq!(reset_secs(&r, 0), 60);
}

#[tokio::test]
async fn headers_to_add_are_the_layers() {
    let (_clock, _s, mut c) = rls(POLICY).await;
    let free_write = [("api_key", "free-key"), ("category", "write")];
    let r = ask1(&mut c, &free_write).await;
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        header(&r, "x-ratelimit-reset"),
        Some(&*(NOW + 60).to_string())
    );
    assert_eq!(header(&r, "x-ratelimit-window"), Some("60"));
    assert_eq!(header(&r, "retry-after"), None);
    let r = ask1(&mut c, &free_write).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&r, "retry-after"), Some("60"));
    assert_eq!(header(&r, "content-type"), Some("application/problem+json"));
    // The layer's problem document, for Envoy to send as the 429's body.
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["type"], "urn:tierlimit:problem:rate-limited");
    assert_eq!(body["tier"], "free");
    assert_eq!(body["category"], "write");
    assert_eq!(body["retry_after_seconds"], 60);
}

#[tokio::test]
async fn draft_fields_when_the_layer_writes_them() {
    let (_clock, _s, mut c) =
        rls_with(POLICY, tierlimit::HeaderOptions::default().ietf_draft(true)).await;
    let r = ask1(&mut c, &[("api_key", "free-key"), ("category", "read")]).await;
    assert_eq!(
        header(&r, "ratelimit-policy"),
        Some("\"free.read\";q=3;w=60")
    );
    assert_eq!(header(&r, "ratelimit"), Some("\"free.read\";r=2;t=20"));
}

#[tokio::test]
async fn with_the_layers_headers_off_statuses_still_describe_the_limit() {
    let (_clock, _s, mut c) = rls_with(
        POLICY,
        tierlimit::HeaderOptions::default().x_ratelimit(false),
    )
    .await;
    let write = [("api_key", "free-key"), ("category", "write")];
    let r = ask1(&mut c, &write).await;
    assert_eq!(r.overall_code, OK);
    // The status is Envoy's own report: the limit, what is left of it and
    // when it is whole again, whichever fields the layer writes.
    let limit = r.statuses[0].current_limit.clone().expect("the limit");
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit),
        ("free.write", 1)
    );
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_eq!(
        r.statuses[0].duration_until_reset.map(|d| d.seconds),
        Some(60)
    );
    // No header field is added: the layer writes none.
    assert!(r.response_headers_to_add.is_empty());
    // A refusal still says which limit, and when to retry.
    let r = ask1(&mut c, &write).await;
    assert_eq!((r.overall_code, why(&r, 0)), (OVER, "free.write"));
    assert_eq!(header(&r, "retry-after"), Some("60"));
    assert_eq!(header(&r, "x-ratelimit-limit"), None);
}

#[tokio::test]
async fn several_descriptors_the_binding_one_decides() {
    let (_clock, _s, mut c) = rls(POLICY).await;
    let both = || {
        request(vec![
            descriptor(&[("api_key", "free-key"), ("category", "read")]),
            descriptor(&[("api_key", "free-key"), ("category", "write")]),
        ])
    };
    let r = ask(&mut c, both()).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses.len(), 2);
    assert_eq!(
        (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
        (2, 0)
    );
    // The headers are the binding limit's: fewest left (write's).
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    let r = ask(&mut c, both()).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!((r.statuses[0].code, r.statuses[1].code), (OK, OVER));
    assert_eq!(header(&r, "retry-after"), Some("60"));
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("1"));
    // Each descriptor is its own check (as Envoy's reference service
    // counts them): read's second unit went.
    assert_eq!(r.statuses[0].limit_remaining, 1);
}

#[tokio::test]
async fn hits_addend_is_the_cost() {
    let (_clock, _s, mut c) = rls(POLICY).await;
    let read = descriptor(&[("api_key", "pro-key"), ("category", "read")]);
    // The request's hits_addend: 5 units of 100.
    let mut r = request(vec![read.clone()]);
    r.hits_addend = 5;
    assert_eq!(ask(&mut c, r).await.statuses[0].limit_remaining, 95);
    // A descriptor's own hits_addend overrides the request's.
    let mut d = read.clone();
    d.hits_addend = Some(UInt64Value { value: 10 });
    let mut r = request(vec![d]);
    r.hits_addend = 5;
    assert_eq!(ask(&mut c, r).await.statuses[0].limit_remaining, 85);
    // 0 is Envoy's default: 1.
    let mut d = read.clone();
    d.hits_addend = Some(UInt64Value { value: 0 });
    assert_eq!(
        ask(&mut c, request(vec![d])).await.statuses[0].limit_remaining,
        84
    );
    // More than the burst, u32::MAX, u64::MAX: never admitted, never
    // counted, a status that says why.
    for hits in [101, u64::from(u32::MAX), u64::MAX] {
        let mut d = read.clone();
        d.hits_addend = Some(UInt64Value { value: hits });
        let r = ask(&mut c, request(vec![d])).await;
        assert_eq!(r.overall_code, OVER, "{hits}");
        assert_eq!(why(&r, 0), "cost-exceeds-limit");
        let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
        assert_eq!(body["limit"], 100);
    }
    // The cost multiplies the route's: POST /v1/batch costs 2 a hit.
    let mut r = request(vec![descriptor(&[
        ("api_key", "pro-key"),
        ("method", "POST"),
        ("path", "/v1/batch?size=3"),
    ])]);
    r.hits_addend = 3;
    let r = ask(&mut c, r).await;
    assert_eq!(r.statuses[0].limit_remaining, 78, "84 less 2 × 3");
    let r = ask1(&mut c, &[("api_key", "pro-key"), ("category", "read")]).await;
    assert_eq!(r.statuses[0].limit_remaining, 77);
}

#[tokio::test]
async fn routes_classify_method_and_path() {
    let (_clock, _s, mut c) = rls(POLICY).await;
    // GET of an unrouted path: the default read category.
    let get = [("api_key", "free-key"), ("method", "GET")];
    let r = ask1(&mut c, &[get[0], get[1], ("path", "/v1/x")]).await;
    assert_eq!(why(&r, 0), "free.read");
    // An exempt route: OK, no limit, no headers.
    let r = ask1(&mut c, &[("method", "GET"), ("path", "/healthz")]).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].current_limit, None);
    assert!(r.response_headers_to_add.is_empty());
    // Several limits: the binding one, its window not a unit.
    let r = ask1(
        &mut c,
        &[("api_key", "pro-key"), ("method", "PUT"), ("path", "/v1/x")],
    )
    .await;
    let l = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!((l.requests_per_unit, l.unit), (20, Unit::Minute as i32));
    assert_eq!(l.name, "pro.write.30s: 10 per 30 s");
    assert_eq!(r.statuses[0].limit_remaining, 9);
}

#[tokio::test]
async fn unknown_keys_take_the_unknown_key_tier_when_there_is_one() {
    let clock = FakeRelativeClock::default();
    let policy = format!("{POLICY}\n[defaults]\nunknown_key = \"free\"\nmissing_key = \"free\"\n");
    let s = serve(RateLimitServer::new(&layer(&policy, &clock))).await;
    let mut c = client(s.addr).await;
    let r = ask1(&mut c, &[("api_key", "stranger"), ("category", "write")]).await;
    assert_eq!((r.overall_code, why(&r, 0)), (OK, "free.write"));
    // No key: the client's address under the missing_key tier, per address.
    let anon = |ip: &'static str| [("remote_address", ip), ("category", "write")];
    assert_eq!(ask1(&mut c, &anon("10.0.0.1")).await.overall_code, OK);
    assert_eq!(ask1(&mut c, &anon("10.0.0.1")).await.overall_code, OVER);
    assert_eq!(ask1(&mut c, &anon("10.0.0.2")).await.overall_code, OK);
}

#[tokio::test]
async fn a_tier_and_an_account_given_directly() {
    let (_clock, _s, mut c) = rls(POLICY).await;
    let acme = [("tier", "free"), ("account", "acme"), ("category", "write")];
    let r = ask1(&mut c, &acme).await;
    assert_eq!((r.overall_code, why(&r, 0)), (OK, "free.write"));
    assert_eq!(ask1(&mut c, &acme).await.overall_code, OVER);
    let other = [
        ("tier", "free"),
        ("account", "other"),
        ("category", "write"),
    ];
    assert_eq!(ask1(&mut c, &other).await.overall_code, OK);
    // A key Envoy vouches for with a tier: the tier it names.
    let vouched = [("api_key", "stranger"), ("tier", "pro")];
    let r = ask1(&mut c, &[vouched[0], vouched[1], ("category", "write")]).await;
    assert_eq!(
        (r.overall_code, why(&r, 0)),
        (OK, "pro.write.30s: 10 per 30 s")
    );
}

#[tokio::test]
async fn an_org_given_directly_binds_across_its_accounts() {
    let policy = format!("{POLICY}\n[tiers.free.per_org]\nwrite = \"2/minute\"\n");
    let (_clock, _s, mut c) = rls(&policy).await;
    let of = |account, org| {
        [
            ("tier", "free"),
            ("account", account),
            ("org", org),
            ("category", "write"),
        ]
    };
    // Each account its own 1 a minute, the organisation 2.
    assert_eq!(ask1(&mut c, &of("a1", "x")).await.overall_code, OK);
    assert_eq!(ask1(&mut c, &of("a2", "x")).await.overall_code, OK);
    let r = ask1(&mut c, &of("a3", "x")).await;
    assert_eq!(r.overall_code, OVER, "the organisation's 2 are used");
    assert!(why(&r, 0).starts_with("free.write.org"), "{}", why(&r, 0));
    assert_eq!(ask1(&mut c, &of("a4", "y")).await.overall_code, OK);
}

#[tokio::test]
async fn the_http_layer_and_envoy_share_one_count() {
    let clock = FakeRelativeClock::default();
    let layer = layer(POLICY, &clock);
    let s = serve(RateLimitServer::new(&layer)).await;
    let mut c = client(s.addr).await;
    let app = axum::Router::new()
        .route("/v1/x", axum::routing::get(|| async { "ok" }))
        .layer(layer.clone());
    let http = common::serve(app).await;
    let res = common::client()
        .get(http.url("/v1/x"))
        .header("x-api-key", "free-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "2");
    let r = ask1(
        &mut c,
        &[
            ("api_key", "free-key"),
            ("method", "GET"),
            ("path", "/v1/x"),
        ],
    )
    .await;
    assert_eq!(r.statuses[0].limit_remaining, 1);
    // The same header values as the layer's next response would carry.
    let res = common::client()
        .get(http.url("/v1/x"))
        .header("x-api-key", "free-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
    let r = ask1(&mut c, &[("api_key", "free-key"), ("category", "read")]).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(
        header(&r, "x-ratelimit-reset"),
        Some(res.headers()["x-ratelimit-reset"].to_str().unwrap())
    );
}

#[tokio::test]
async fn shadow_mode_answers_ok_and_counts() {
    let clock = FakeRelativeClock::default();
    let policy = format!("{POLICY}\n[shadow]\ncategories = [\"write\"]\n");
    let rls = RateLimitServer::new(&layer(&policy, &clock));
    let s = serve(rls.clone()).await;
    let mut c = client(s.addr).await;
    for _ in 0..3 {
        let r = ask1(&mut c, &[("api_key", "free-key"), ("category", "write")]).await;
        assert_eq!(r.overall_code, OK);
        assert_eq!(header(&r, "retry-after"), None);
    }
    assert_eq!(rls.shadow_refusals(), 2);
}

#[tokio::test]
async fn custom_limits_and_boosts_apply() {
    let clock = FakeRelativeClock::default();
    let policy = format!(
        "{POLICY}\n[custom_limits.\"free-key\"]\nwrite = \"5/minute\"\n\n[[boosts]]\ntier = \"pro\"\ncategory = \"read\"\nadjust = \"x2\"\nstart = \"2000-01-01T00:00:00Z\"\nend = \"2100-01-01T00:00:00Z\"\n"
    );
    let s = serve(RateLimitServer::new(&layer(&policy, &clock))).await;
    let mut c = client(s.addr).await;
    let r = ask1(&mut c, &[("api_key", "free-key"), ("category", "write")]).await;
    assert_eq!(r.statuses[0].limit_remaining, 4);
    let r = ask1(&mut c, &[("api_key", "pro-key"), ("category", "read")]).await;
    assert_eq!(r.statuses[0].limit_remaining, 199);
}

#[tokio::test]
async fn the_example_configuration_is_answered() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/envoy/");
    let yaml = std::fs::read_to_string(format!("{dir}envoy.yaml")).unwrap();
    let policy = Policy::from_toml_file(format!("{dir}policy.toml")).unwrap();
    // The filter's domain and the actions' keys are the policy's.
    let keys = policy.envoy().descriptor_keys();
    assert!(yaml.contains(&format!("domain: {}", policy.envoy().domain().unwrap())));
    for key in [&keys.api_key, &keys.method, &keys.path] {
        assert!(yaml.contains(&format!("descriptor_key: {key}")), "{key}");
    }
    assert_eq!(
        keys.remote_address, "remote_address",
        "what `remote_address: {{}}` sends"
    );
    // The client's address is its connection's, never a header it wrote
    // (Envoy reads X-Forwarded-For for it otherwise).
    assert!(yaml.contains("use_remote_address: true"));
    let clock = FakeRelativeClock::default();
    let layer = RateLimitLayer::builder(policy)
        .backend(MemoryBackend::builder().clock(clock.clone()).build())
        .build();
    let s = serve(RateLimitServer::new(&layer)).await;
    let mut c = client(s.addr).await;
    // What the example's actions send.
    let sent = |key: Option<&'static str>, method: &'static str, path: &'static str| {
        let mut entries = vec![
            ("method", method),
            ("path", path),
            ("remote_address", "192.0.2.7"),
        ];
        entries.extend(key.map(|k| ("api_key", k)));
        let mut r = request(vec![descriptor(&entries)]);
        r.domain = "tierlimit".into();
        r
    };
    let r = ask(&mut c, sent(Some("free-demo-key"), "GET", "/v1/account")).await;
    assert_eq!(
        (r.overall_code, why(&r, 0), r.statuses[0].limit_remaining),
        (OK, "free.read", 99)
    );
    let r = ask(
        &mut c,
        sent(Some("pro-demo-key"), "POST", "/v1/training/jobs"),
    )
    .await;
    assert_eq!((r.overall_code, why(&r, 0)), (OK, "pro.training"));
    let r = ask(&mut c, sent(None, "POST", "/v1/ai/completions")).await;
    assert_eq!((r.overall_code, why(&r, 0)), (OK, "free.ai"));
    let r = ask(&mut c, sent(Some("stolen"), "GET", "/v1/account")).await;
    assert_eq!((r.overall_code, why(&r, 0)), (OVER, "unknown-api-key"));
    let r = ask(&mut c, sent(None, "GET", "/healthz")).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].current_limit.clone()),
        (OK, None)
    );
}
