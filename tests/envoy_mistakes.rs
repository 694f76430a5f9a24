//! Envoy's rate limit service answering what it cannot check: unknown and
//! missing keys, tiers and categories, hostile descriptors (empty, huge,
//! not UTF-8, thousands), other domains, and policies whose `[envoy]`
//! table cannot work. Each is an answer, never a gRPC error.
#![cfg(feature = "envoy")]

mod common;

use common::envoy::{
    OK, OVER, POLICY, ask, ask1, client, descriptor, layer, request, rls, serve, why,
};
use governor::clock::FakeRelativeClock;
use tierlimit::Policy;
use tierlimit::envoy::RateLimitServer;

#[tokio::test]
async fn unknown_and_missing_are_answered_as_documented() {
    let (_clock, _s, mut c) = rls(POLICY).await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("api_key", "nobody"), ("category", "read")],
            "unknown-api-key",
        ),
        (&[("category", "read")], "missing-api-key"),
        (&[("api_key", "free-key")], "missing-category"),
        (
            &[("api_key", "free-key"), ("method", "GET")],
            "missing-category",
        ),
        (
            &[("api_key", "free-key"), ("category", "nope")],
            "unknown-category",
        ),
        (
            &[("api_key", "free-key"), ("category", "ai")],
            "category-not-served",
        ),
        (
            &[("tier", "gold"), ("account", "a"), ("category", "read")],
            "unknown-tier",
        ),
        (
            &[("api_key", "bad key"), ("category", "read")],
            "malformed-api-key",
        ),
        (
            &[
                ("tier", "free"),
                ("account", "a"),
                ("org", ""),
                ("category", "read"),
            ],
            "invalid-org",
        ),
        (
            &[("api_key", ""), ("category", "read")],
            "malformed-api-key",
        ),
        (
            &[
                ("api_key", "free-key"),
                ("api_key", "x"),
                ("category", "read"),
            ],
            "duplicate-entry",
        ),
        (
            &[("api_key", "free-key"), ("method", "G E T"), ("path", "/")],
            "invalid-method",
        ),
        (
            &[("api_key", "frée-key"), ("category", "read")],
            "malformed-api-key",
        ),
        (&[], "missing-category"),
    ];
    for (entries, kind) in cases {
        let r = ask1(&mut c, entries).await;
        assert_eq!(r.overall_code, OVER, "{entries:?}");
        assert_eq!(why(&r, 0), *kind, "{entries:?}");
        let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
        assert_eq!(
            body["type"],
            format!("urn:tierlimit:problem:{kind}"),
            "{entries:?}"
        );
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    // A huge key: refused, not echoed.
    let huge = "k".repeat(100_000);
    let r = ask1(&mut c, &[("api_key", &huge), ("category", "read")]).await;
    assert_eq!(why(&r, 0), "malformed-api-key");
    assert!(r.raw_body.len() < 1024);
    // A call larger than the service decodes: tonic's OUT_OF_RANGE,
    // before anything is decoded or counted.
    let huge = "k".repeat(300_000);
    let e = c
        .should_rate_limit(request(vec![descriptor(&[("api_key", &huge)])]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange);
    // No descriptors: nothing to limit.
    let r = ask(&mut c, request(vec![])).await;
    assert_eq!((r.overall_code, r.statuses.len()), (OK, 0));
    // Thousands of descriptors: each refused, none counted.
    let many = vec![descriptor(&[("api_key", "free-key"), ("category", "write")]); 5000];
    let r = ask(&mut c, request(many)).await;
    assert_eq!((r.overall_code, r.statuses.len()), (OVER, 5000));
    assert_eq!(why(&r, 4999), "too-many-descriptors");
    let r = ask1(&mut c, &[("api_key", "free-key"), ("category", "write")]).await;
    assert_eq!(r.overall_code, OK, "nothing was counted");
    // An `Authorization` header copied as it is: read as the layer reads it.
    let r = ask1(
        &mut c,
        &[("api_key", "Bearer free-key"), ("category", "read")],
    )
    .await;
    assert_eq!((r.overall_code, why(&r, 0)), (OK, "free.read"));
    let r = ask1(
        &mut c,
        &[("api_key", "Basic free-key"), ("category", "read")],
    )
    .await;
    assert_eq!(why(&r, 0), "malformed-api-key");
    // Entries of other keys are another service's: not read.
    let r = ask1(
        &mut c,
        &[
            ("generic_key", "x"),
            ("api_key", "pro-key"),
            ("category", "read"),
        ],
    )
    .await;
    assert_eq!(r.overall_code, OK);
}

#[tokio::test]
async fn the_domain_is_checked_when_the_policy_names_one() {
    let clock = FakeRelativeClock::default();
    let policy =
        format!("{POLICY}\n[envoy]\ndomain = \"api\"\ncategories = [\"read\", \"write\"]\n");
    let s = serve(RateLimitServer::new(&layer(&policy, &clock))).await;
    let mut c = client(s.addr).await;
    let mut r = request(vec![descriptor(&[
        ("api_key", "free-key"),
        ("category", "write"),
    ])]);
    r.domain = "other".into();
    let r = ask(&mut c, r).await;
    assert_eq!((r.overall_code, why(&r, 0)), (OVER, "unknown-domain"));
    let r = ask1(&mut c, &[("api_key", "free-key"), ("category", "write")]).await;
    assert_eq!(r.overall_code, OK, "the wrong domain counted nothing");
}

#[tokio::test]
async fn descriptor_keys_come_from_the_policy() {
    let clock = FakeRelativeClock::default();
    let policy = format!(
        "{POLICY}\n[envoy]\ncategories = [\"read\"]\n[envoy.descriptor_keys]\napi_key = \"x-api-key\"\ncategory = \"kind\"\n"
    );
    let s = serve(RateLimitServer::new(&layer(&policy, &clock))).await;
    let mut c = client(s.addr).await;
    let r = ask1(&mut c, &[("x-api-key", "free-key"), ("kind", "read")]).await;
    assert_eq!((r.overall_code, why(&r, 0)), (OK, "free.read"));
    // `write` is not listed in envoy.categories.
    let r = ask1(&mut c, &[("x-api-key", "free-key"), ("kind", "write")]).await;
    assert_eq!(why(&r, 0), "category-not-served");
}

#[test]
fn envoy_tables_that_cannot_work_fail_to_load_naming_the_entry() {
    let bad = |table: &str| Policy::from_toml_str(&format!("{POLICY}\n{table}")).unwrap_err();
    // A category with token limits cannot be checked through Envoy.
    let e = bad("[envoy]\n");
    assert_eq!(e.entry(), "envoy.categories");
    assert!(
        e.message().contains("`ai`") && e.message().contains("tiers.free.ai"),
        "{e}"
    );
    let e = bad("[envoy]\ncategories = [\"read\", \"ai\"]\n");
    assert_eq!(e.entry(), "envoy.categories");
    let e = bad("[envoy]\ncategories = [\"reed\"]\n");
    assert!(e.message().contains("unknown category `reed`"), "{e}");
    let e = bad("[envoy]\ncategories = [\"read\"]\n[envoy.descriptor_keys]\ntier = \"api_key\"\n");
    assert_eq!(e.entry(), "envoy.descriptor_keys.tier");
    let e = bad("[envoy]\ncategories = [\"read\"]\n[envoy.descriptor_keys]\npath = \"\"\n");
    assert_eq!(e.entry(), "envoy.descriptor_keys.path");
    let e = bad("[envoy]\ndomain = \"\"\ncategories = [\"read\"]\n");
    assert_eq!(e.entry(), "envoy.domain");
    let e = bad("[envoy]\ncategories = [\"read\"]\nfoo = 1\n");
    assert!(e.message().contains("unknown field"), "{e}");
    assert_eq!(e.line(), Some(POLICY.lines().count() + 4));
}

/// A descriptor entry as bytes: what a hostile client can send where
/// Envoy's schema says UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawDescriptor {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<RawEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    descriptors: Vec<RawDescriptor>,
}

#[tokio::test]
async fn bytes_that_are_not_utf8_are_a_mistake_not_a_grpc_error() {
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
    let clock = FakeRelativeClock::default();
    let s = serve(RateLimitServer::new(&layer(POLICY, &clock))).await;
    let channel = common::grpc_channel(s.addr).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    let entry = |k: &[u8], v: &[u8]| RawEntry {
        key: k.to_vec(),
        value: v.to_vec(),
    };
    let request = RawRequest {
        domain: b"api\xff".to_vec(),
        descriptors: vec![
            RawDescriptor {
                entries: vec![
                    entry(b"api_key", b"free-\xff\xfekey"),
                    entry(b"category", b"read"),
                ],
            },
            RawDescriptor {
                entries: vec![
                    entry(b"api_key", b"free-key"),
                    entry(b"category", b"re\xc3ad"),
                ],
            },
            RawDescriptor {
                entries: vec![entry(b"api_key", b"free-key"), entry(b"category", b"read")],
            },
        ],
    };
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    );
    let codec = tonic_prost::ProstCodec::<RawRequest, RateLimitResponse>::default();
    let r = grpc
        .unary(tonic::Request::new(request), path, codec)
        .await
        .expect("never a gRPC error")
        .into_inner();
    assert_eq!(r.overall_code, OVER);
    assert_eq!(why(&r, 0), "malformed-api-key");
    assert_eq!(why(&r, 1), "unknown-category");
    assert_eq!((r.statuses[2].code, why(&r, 2)), (OK, "free.read"));
    // Bytes that are no RateLimitRequest at all (a number where the
    // domain's bytes belong): the caller's mistake, not the server's.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Wrong {
        #[prost(uint64, tag = "1")]
        domain: u64,
    }
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    );
    let codec = tonic_prost::ProstCodec::<Wrong, RateLimitResponse>::default();
    grpc.ready().await.unwrap();
    let e = grpc
        .unary(tonic::Request::new(Wrong { domain: 7 }), path, codec)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

#[tokio::test]
async fn a_listed_key_of_the_longest_length_is_read_from_a_bearer_entry() {
    // An `Authorization` header copied as it is: `Bearer ` and the key.
    // The key's length is the limit's, not the entry's.
    let long = "k".repeat(256);
    let policy = format!("{POLICY}\"{long}\" = \"pro\"\n");
    let (_clock, _s, mut c) = rls(&policy).await;
    for value in [
        long.clone(),
        format!("Bearer {long}"),
        format!("bearer  {long} "),
    ] {
        let r = ask1(&mut c, &[("api_key", &value), ("category", "read")]).await;
        assert_eq!(r.overall_code, OK, "{} bytes", value.len());
        assert_eq!(why(&r, 0), "pro.read");
    }
    // A key over 256 bytes is still malformed, however it is sent.
    let over = "k".repeat(257);
    for value in [over.clone(), format!("Bearer {over}")] {
        let r = ask1(&mut c, &[("api_key", &value), ("category", "read")]).await;
        assert_eq!(
            (r.overall_code, why(&r, 0)),
            (OVER, "malformed-api-key"),
            "{} bytes",
            value.len()
        );
    }
}
