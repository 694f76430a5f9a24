//! The reserve-and-settle table (token metering): every backend runs it
//! unchanged.

#[allow(unused_imports)]
use crate::common::one::{CheckOne, CheckOneNow};
use std::time::Duration;

use tierlimit::backend::{Adjustment, Backend, Charge, Check};
use tierlimit::{Limit, key::KeyId};

/// Reserve and settle: a request reserves an estimate of tokens with its
/// request, then settles what it used: a refund when less, a debt when
/// more, which delays later requests by exactly the debt. Tokens: 100 per
/// 100 s (one a second); requests: 10 per 10 s.
pub async fn run_settle<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    let owner = KeyId::of("settle").as_u64();
    let requests = Limit::new(10.try_into().unwrap(), Duration::from_secs(10)).unwrap();
    let tokens = Limit::new(100.try_into().unwrap(), Duration::from_secs(100)).unwrap();
    let charges = |estimate: u32| {
        [
            Charge {
                bucket: owner ^ 1,
                limit: requests,
                cost: 1,
                reserve: 0,
                period: tierlimit::backend::PeriodBounds::ROLLING,
            },
            Charge {
                bucket: owner ^ 2,
                limit: tokens,
                cost: estimate,
                reserve: 0,
                period: tierlimit::backend::PeriodBounds::ROLLING,
            },
        ]
    };
    let check = async |estimate: u32| {
        let charges = charges(estimate);
        backend
            .check(&Check {
                owner,
                known: true,
                charges: &charges,
                tokens: 1,
                split: tierlimit::backend::TokenSplit::NONE,
                leases: &[],
                lease_id: 0,
                describe: true,
            })
            .await
            .unwrap()
    };
    let settle = async |units: i64| {
        backend
            .settle(
                owner,
                &[Adjustment {
                    bucket: owner ^ 2,
                    limit: tokens,
                    units,
                    period: tierlimit::backend::PeriodBounds::ROLLING,
                }],
            )
            .await
            .unwrap()
    };
    let tokens_left = async || backend.peek(owner, &charges(1)[1]).await.unwrap().remaining;
    // Reserve 40 of 100 tokens with one request.
    let d = check(40).await;
    assert!(d.allowed);
    // The binding limit overall is the requests' (9 left); the tokens'
    // own binding limit is reported beside it.
    assert_eq!((d.index, d.remaining), (0, 9));
    let t = d.tokens.expect("a token state");
    assert_eq!((t.index, t.remaining), (1, 60));
    assert!(!d.is_tokens());
    assert_eq!(tokens_left().await, 60);
    // Used 10: 30 come back.
    let after = settle(10 - 40).await;
    assert_eq!(after.remaining, 90, "a refund");
    assert_eq!(tokens_left().await, 90);
    // Reserve 50, use 120: a debt of 70 on top of the 50 (100 used of 90
    // left): the bucket is 30 s past empty.
    assert!(check(50).await.allowed);
    assert_eq!(tokens_left().await, 40);
    let after = settle(120 - 50).await;
    assert_eq!(after.remaining, 0, "in debt");
    assert_eq!(tokens_left().await, 0);
    // Even an estimate of 1 waits for the debt: 30 s to pay it, 1 s for the
    // token. The tokens bind the refusal.
    let d = check(1).await;
    assert!(!d.allowed);
    assert_eq!(d.index, 1, "the token limit refuses");
    assert!(d.is_tokens());
    assert_eq!(d.retry_after, Some(Duration::from_secs(31)));
    // The refusal took nothing from the requests (8 left of 10).
    assert_eq!(
        backend.peek(owner, &charges(1)[0]).await.unwrap().remaining,
        8
    );
    advance(Duration::from_secs(31));
    assert!(check(1).await.allowed, "exactly when the debt is paid");
    // A refund never fills past full.
    let after = settle(-10_000).await;
    assert_eq!(after.remaining, 100);
    assert_eq!(tokens_left().await, 100);
    // A debt on a bucket no longer tracked (full again) still counts.
    advance(Duration::from_secs(200));
    let after = settle(30).await;
    assert_eq!(after.remaining, 70);
    assert_eq!(tokens_left().await, 70);
}

/// Input and output token limits beside a limit of all tokens: each kind
/// reserves its own estimate (all and input tokens the estimate, output
/// tokens 1), reports its own binding limit in the decision, and settles
/// its own usage; an output debt refuses the next request by the output
/// limit alone. Requests: 10 per 10 s; all tokens: 1,000 per 100 s; input:
/// 100 per 100 s; output: 50 per 100 s (one per 2 s).
pub async fn run_split_settle<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    use tierlimit::backend::{PeriodBounds, TokenSplit};
    use tierlimit::meter::TokenKind;
    let owner = KeyId::of("split-settle").as_u64();
    let limit = |max: u32, secs: u64| {
        Limit::new(max.try_into().unwrap(), Duration::from_secs(secs)).unwrap()
    };
    let limits = [
        limit(10, 10),
        limit(1000, 100),
        limit(100, 100),
        limit(50, 100),
    ];
    let charges = |estimate: u32| {
        let cost = [1, estimate, estimate, 1];
        std::array::from_fn::<_, 4, _>(|i| Charge {
            bucket: owner ^ (i as u64 + 1),
            limit: limits[i],
            cost: cost[i],
            reserve: 0,
            period: PeriodBounds::ROLLING,
        })
    };
    let check = async |estimate: u32| {
        let charges = charges(estimate);
        backend
            .check(&Check {
                owner,
                known: true,
                charges: &charges,
                tokens: 3,
                split: TokenSplit {
                    input: 1,
                    output: 1,
                },
                leases: &[],
                lease_id: 0,
                describe: true,
            })
            .await
            .unwrap()
    };
    let left = async |i: usize| backend.peek(owner, &charges(1)[i]).await.unwrap().remaining;
    let d = check(10).await;
    assert!(d.allowed);
    assert_eq!((d.index, d.remaining), (0, 9), "the requests bind");
    let state = |t: Option<tierlimit::backend::TokenState>| t.map(|t| (t.index, t.remaining));
    assert_eq!(state(d.tokens), Some((1, 990)));
    assert_eq!(state(d.input_tokens), Some((2, 90)));
    assert_eq!(state(d.output_tokens), Some((3, 49)));
    assert_eq!(d.token_kind(), None);
    // Used 5 input and 80 output tokens: all tokens +75, input −5 (a
    // refund), output +79 (a debt: 80 used of 50, 60 s past empty).
    let adjust = |i: usize, units: i64| Adjustment {
        bucket: owner ^ (i as u64 + 1),
        limit: limits[i],
        units,
        period: PeriodBounds::ROLLING,
    };
    backend
        .settle(owner, &[adjust(1, 75), adjust(2, -5), adjust(3, 79)])
        .await
        .unwrap();
    assert_eq!((left(1).await, left(2).await, left(3).await), (915, 95, 0));
    // The next request is refused by the output limit: 60 s to pay the
    // debt, 2 s for its own output token.
    let d = check(1).await;
    assert!(!d.allowed);
    assert_eq!(d.index, 3, "the output limit refuses");
    assert_eq!(d.token_kind(), Some(TokenKind::Output));
    assert!(d.is_tokens());
    assert_eq!(d.retry_after, Some(Duration::from_secs(62)));
    assert_eq!(state(d.output_tokens).map(|s| s.0), Some(3));
    // The refusal took nothing from the other limits.
    assert_eq!((left(0).await, left(1).await, left(2).await), (9, 915, 95));
    advance(Duration::from_secs(62));
    assert!(check(1).await.allowed, "exactly when the debt is paid");
}
