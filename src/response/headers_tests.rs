//! The header values and the per-thread arena they are cut from.

use super::*;

#[test]
fn ints_are_exact() {
    let ns = [
        0u64,
        1,
        9,
        10,
        99,
        100,
        4095,
        4096,
        4097,
        10_000,
        1_000_000_000,
        u64::from(u32::MAX),
        u64::MAX,
    ];
    for n in ns {
        assert_eq!(int(n).to_str().unwrap(), n.to_string());
    }
}

#[test]
fn arena_values_survive_the_chunk_being_reused_or_replaced() {
    // Hold some values across many chunks' worth of others: each keeps
    // its own text whether its chunk was reclaimed or replaced.
    let held: Vec<(u64, HeaderValue)> = (0..500u64)
        .map(|i| {
            let n = 1_000_000_000 + i * 7;
            for j in 0..20 {
                drop(int(5_000 + j));
            }
            (n, int(n))
        })
        .collect();
    for (n, v) in held {
        assert_eq!(v.to_str().unwrap(), n.to_string());
    }
}

/// `X-RateLimit-Reset`'s value for `secs`, as a response gets it.
fn reset_value(secs: u64) -> HeaderValue {
    let mut headers = HeaderMap::new();
    insert_reset(&mut headers, X_RATELIMIT_RESET, secs);
    assert_eq!(headers.len(), 1);
    headers.remove(X_RATELIMIT_RESET).unwrap()
}

/// Writes the reset field for each of `seconds` into `headers` in turn:
/// after each write the map holds that field once, with that second.
fn assert_each_write_replaces(headers: &mut HeaderMap, seconds: &[u64]) {
    for &secs in seconds {
        insert_reset(headers, X_RATELIMIT_RESET, secs);
        let all: Vec<_> = headers.get_all(X_RATELIMIT_RESET).iter().collect();
        assert_eq!(all.len(), 1, "{secs}");
        assert_eq!(all[0].to_str().unwrap(), secs.to_string());
    }
}

/// On a thread of its own: an arena no other test has touched.
fn on_fresh_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f).join().unwrap();
}

#[test]
fn reset_values_follow_the_second() {
    on_fresh_thread(|| {
        let s = 1_800_000_000u64;
        let (a, b) = (reset_value(s), reset_value(s));
        assert_eq!(a, "1800000000");
        // The same second is cut once and shared.
        assert_eq!(a.as_bytes().as_ptr(), b.as_bytes().as_ptr());
        // Across a second boundary, back, and at the extremes: never
        // the cached second's text.
        let max = u64::from(u32::MAX);
        for secs in [s + 1, s + 1, s, s - 1, 0, 4_097, max, u64::MAX, s] {
            assert_eq!(reset_value(secs).to_str().unwrap(), secs.to_string());
        }
    });
}

#[test]
fn a_reset_field_written_again_replaces_the_first() {
    on_fresh_thread(|| {
        let mut headers = HeaderMap::new();
        // The same second, a later one, then back (the memo's value or a
        // new one each time).
        let seconds = [
            1_800_000_000,
            1_800_000_000,
            1_800_000_001,
            7,
            1_800_000_000,
        ];
        assert_each_write_replaces(&mut headers, &seconds);
        // A second field beside it (a token reset) leaves it alone.
        let token_reset = &TOKEN_HEADERS[0][2];
        insert_reset(&mut headers, token_reset.clone(), 1_800_000_005);
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[X_RATELIMIT_RESET], "1800000000");
        assert_eq!(headers[token_reset], "1800000005");
    });
}

#[test]
fn the_reset_cache_never_keeps_a_chunk_from_being_taken_back() {
    on_fresh_thread(|| {
        let first = int(5_000);
        let start = first.as_bytes().as_ptr() as usize;
        drop(first);
        // Requests that write a reset time (cached, a new second every
        // 100) and a large count, then drop them: every value is cut
        // from the first chunk, taken back each time it is used up,
        // never from a new one (allocated while the first was pinned).
        for i in 0..(4 * CHUNK) as u64 {
            let secs = 1_800_000_000 + i / 100;
            let reset = reset_value(secs);
            let count = int(1_000_000_000 + i);
            assert_eq!(reset.to_str().unwrap(), secs.to_string());
            assert_eq!(count.to_str().unwrap(), (1_000_000_000 + i).to_string());
            for v in [&reset, &count] {
                let at = v.as_bytes().as_ptr() as usize;
                let fresh = (start..start + CHUNK).contains(&at);
                assert!(fresh, "request {i}: a value from a new chunk");
            }
        }
    });
}

#[test]
fn a_busy_arena_falls_back_without_panicking() {
    ARENA.with(|arena| {
        let _busy = arena.borrow_mut();
        assert_eq!(int(5_000), "5000");
        assert_eq!(int(u64::MAX).to_str().unwrap(), u64::MAX.to_string());
        assert_eq!(reset_value(1_800_000_000), "1800000000");
        assert_eq!(reset_value(7), "7");
        // Every field of a plan, the draft's `RateLimit` too.
        let mut headers = HeaderMap::new();
        plan().write(&mut headers);
        assert_exact(&headers);
        // A reset field written again past the arena replaces the first.
        assert_each_write_replaces(&mut HeaderMap::new(), &[1_800_000_000, 1_800_000_001]);
    });
}

#[test]
fn a_destroyed_arena_falls_back_without_panicking() {
    type Seen = (bool, String, String);
    struct AtExit(std::sync::mpsc::Sender<Seen>);
    impl Drop for AtExit {
        fn drop(&mut self) {
            let gone = ARENA.try_with(|_| ()).is_err();
            let n = int(5_000).to_str().unwrap().to_owned();
            let r = reset_value(1_800_000_000).to_str().unwrap().to_owned();
            let _ = self.0.send((gone, n, r));
        }
    }
    thread_local! {
        static AT_EXIT: RefCell<Option<AtExit>> = const { RefCell::new(None) };
    }
    let (tx, rx) = std::sync::mpsc::channel();
    on_fresh_thread(move || {
        // Registered before the arena: destroyed after it.
        AT_EXIT.with(|a| *a.borrow_mut() = Some(AtExit(tx)));
        assert_eq!(int(5_000), "5000");
    });
    let (gone, n, r) = rx.recv().unwrap();
    assert!(gone, "the arena was destroyed first");
    assert_eq!((n.as_str(), r.as_str()), ("5000", "1800000000"));
}

/// A plan with every field, at the edges of the static table and of `u32`.
fn plan() -> HeaderPlan {
    use crate::limit::Per;
    use crate::policy::Period;
    use crate::response::{CellHeaders, LimitText};
    let cell = CellHeaders::get(
        "tier",
        "cat",
        &[LimitText {
            max: 5_000,
            window: Duration::from_secs(3_600),
            per: Per::Key,
            period: Period::Rolling,
        }],
    );
    let token = |limit, remaining, reset_at| TokenHeaders {
        limit,
        remaining,
        reset_at,
    };
    HeaderPlan {
        cell,
        reset_at: 1_800_000_000,
        limit: 4_097,
        remaining: u32::MAX,
        window: 1_000_000_000,
        reset_in: 4_096,
        retry: 4_097,
        tokens: [
            token(u32::MAX, 0, u32::MAX),
            TokenHeaders::NONE,
            token(4_096, 4_097, 1_800_000_001),
        ],
        lease: Some(LeaseState {
            limit: 1_000_000,
            remaining: 4_097,
            refused: false,
            per_account: false,
        }),
        index: 0,
        rate: true,
        token_bound: false,
        options: HeaderOptions::default().ietf_draft(true),
    }
}

/// The fields [`plan`] writes, exactly.
const EXPECTED: [(&str, &str); 15] = [
    ("x-ratelimit-limit", "4097"),
    ("x-ratelimit-remaining", "4294967295"),
    ("x-ratelimit-reset", "1800000000"),
    ("x-ratelimit-window", "1000000000"),
    ("ratelimit-policy", "\"tier.cat\";q=5000;w=3600"),
    ("ratelimit", "\"tier.cat\";r=4294967295;t=4096"),
    ("x-ratelimit-limit-tokens", "4294967295"),
    ("x-ratelimit-remaining-tokens", "0"),
    ("x-ratelimit-reset-tokens", "4294967295"),
    ("x-ratelimit-limit-output-tokens", "4096"),
    ("x-ratelimit-remaining-output-tokens", "4097"),
    ("x-ratelimit-reset-output-tokens", "1800000001"),
    ("x-concurrency-limit", "1000000"),
    ("x-concurrency-remaining", "4097"),
    ("retry-after", "4097"),
];

fn assert_exact(headers: &HeaderMap) {
    assert_eq!(headers.len(), EXPECTED.len());
    for (name, value) in EXPECTED {
        assert_eq!(headers[name], value, "{name}");
    }
}

#[test]
fn every_field_of_a_plan_is_exact_across_many_chunks() {
    let plan = plan();
    // Some responses held while others are written and dropped: every
    // one keeps its own text, whichever chunk it was cut from.
    let mut held = Vec::new();
    for i in 0..2_000 {
        let mut headers = HeaderMap::new();
        plan.write(&mut headers);
        if i % 10 == 0 {
            held.push(headers);
        }
    }
    for headers in &held {
        assert_exact(headers);
    }
}
