//! The extractors' tests.

use super::*;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Request};

fn policy() -> Policy {
    Policy::from_toml_str(
        r#"
categories = ["read", "write"]
[tiers.free]
read = "10/s"
write = "10/s"
[keys]
"k-free" = "free"
"#,
    )
    .unwrap()
}

fn req(headers: &[(&str, &[u8])]) -> Request<()> {
    let mut r = Request::new(());
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    r
}

#[test]
fn api_key_sources_and_errors() {
    let p = policy();
    let x = ApiKey::new();
    let ok = |r: &Request<()>| x.extract(&RequestRef::new(r), &p);
    let id = ok(&req(&[("authorization", b"Bearer k-free")])).unwrap();
    assert_eq!(id.key(), KeyId::of("k-free"));
    assert_eq!(id.tier(), p.tier("free"));
    let id = ok(&req(&[("x-api-key", b"  k-free ")])).unwrap();
    assert_eq!(id.tier(), p.tier("free"));
    let id = ok(&req(&[("authorization", b"bearer other")])).unwrap();
    assert_eq!(id.tier(), None);

    assert_eq!(ok(&req(&[])).unwrap_err(), Rejection::MissingKey);
    assert!(matches!(
        ok(&req(&[("authorization", b"Basic abc")])),
        Err(Rejection::MalformedKey(_))
    ));
    assert!(matches!(
        ok(&req(&[("x-api-key", b"")])),
        Err(Rejection::MalformedKey(_))
    ));
    assert!(matches!(
        ok(&req(&[("x-api-key", b"\xff\xfe")])),
        Err(Rejection::MalformedKey(_))
    ));
    assert!(matches!(
        ok(&req(&[("x-api-key", b"a b")])),
        Err(Rejection::MalformedKey(_))
    ));
    let long = vec![b'a'; 257];
    assert!(matches!(
        ok(&req(&[("x-api-key", &long)])),
        Err(Rejection::MalformedKey(_))
    ));
    assert!(matches!(
        ok(&req(&[("x-api-key", b"a"), ("authorization", b"Bearer b")])),
        Err(Rejection::MalformedKey(_))
    ));
}

#[test]
fn resolver_is_consulted_after_the_table() {
    let p = policy();
    let free = p.tier("free").unwrap();
    let x = ApiKey::new().tiers(move |k| k.starts_with("pk_free_").then_some(free));
    let r = req(&[("x-api-key", b"pk_free_123")]);
    assert_eq!(
        x.extract(&RequestRef::new(&r), &p).unwrap().tier(),
        Some(free)
    );
}

#[test]
fn peer_ip_trusts_only_named_proxies() {
    let with = |peer: &str, xff: &[&[u8]]| {
        let mut r = req(&xff
            .iter()
            .map(|v| ("x-forwarded-for", *v))
            .collect::<Vec<_>>());
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        r
    };
    let plain = PeerIp::new();
    let r = with("203.0.113.9:1000", &[b"1.2.3.4"]);
    assert_eq!(
        plain.client_ip(&RequestRef::new(&r)),
        Some("203.0.113.9".parse().unwrap())
    );

    let lb = PeerIp::new().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
    // The client forged a leftmost entry; the proxy appended the real one.
    let r = with("10.0.0.2:1000", &[b"6.6.6.6, 198.51.100.7, 10.0.0.3"]);
    assert_eq!(
        lb.client_ip(&RequestRef::new(&r)),
        Some("198.51.100.7".parse().unwrap())
    );
    // Untrusted peer: forwarding headers ignored.
    let r = with("198.51.100.1:1000", &[b"6.6.6.6"]);
    assert_eq!(
        lb.client_ip(&RequestRef::new(&r)),
        Some("198.51.100.1".parse().unwrap())
    );
    // Garbage stops the walk at the last good hop.
    let r = with("10.0.0.2:1000", &[b"nonsense"]);
    assert_eq!(
        lb.client_ip(&RequestRef::new(&r)),
        Some("10.0.0.2".parse().unwrap())
    );
    assert_eq!(plain.client_ip(&RequestRef::new(&req(&[]))), None);
}

#[test]
fn trusted_networks_are_ipnet_values() {
    let lb = PeerIp::new().trust_proxies([
        "192.168.0.0/16".parse::<IpNet>().unwrap(),
        IpNet::from("::1".parse::<IpAddr>().unwrap()),
    ]);
    assert!(lb.is_trusted("192.168.4.5".parse().unwrap()));
    // An IPv4-mapped IPv6 peer is its IPv4 address.
    assert!(lb.is_trusted("::ffff:192.168.4.5".parse().unwrap()));
    assert!(!lb.is_trusted("192.169.0.1".parse().unwrap()));
    assert!(lb.is_trusted("::1".parse().unwrap()));
    assert!(!lb.is_trusted("::2".parse().unwrap()));
}

#[test]
fn the_key_is_read_alike_from_small_and_large_header_maps() {
    // Small maps are scanned once, large ones looked up: the same answers
    // either way, wherever the key stands among the other fields.
    let p = policy();
    let x = ApiKey::new();
    let filler: Vec<String> = (0..40).map(|i| format!("x-filler-{i}")).collect();
    for others in [0, 3, 15, 16, 17, 40] {
        for at in [0, others / 2, others] {
            let build = |fields: &[(&str, &[u8])]| {
                let mut all: Vec<(&str, &[u8])> = filler[..others]
                    .iter()
                    .map(|f| (f.as_str(), &b"v"[..]))
                    .collect();
                for (i, f) in fields.iter().enumerate() {
                    all.insert((at + i).min(all.len()), *f);
                }
                req(&all)
            };
            let read = |r: &Request<()>| x.extract(&RequestRef::new(r), &p);
            let id = read(&build(&[("x-api-key", b"k-free")])).unwrap();
            assert_eq!(id.tier(), p.tier("free"), "{others} others, at {at}");
            let id = read(&build(&[("authorization", b"Bearer k-free")])).unwrap();
            assert_eq!(id.tier(), p.tier("free"), "{others} others, at {at}");
            for two in [
                &[("x-api-key", &b"k-free"[..]), ("x-api-key", b"k-free")][..],
                &[
                    ("x-api-key", b"k-free"),
                    ("authorization", b"Bearer k-free"),
                ],
                &[
                    ("authorization", b"Bearer k-free"),
                    ("x-api-key", b"k-free"),
                ],
            ] {
                assert_eq!(
                    read(&build(two)).unwrap_err(),
                    Rejection::MalformedKey("more than one API key was sent"),
                    "{others} others, at {at}"
                );
            }
            assert_eq!(read(&build(&[])).unwrap_err(), Rejection::MissingKey);
        }
    }
}
