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
                leases: &[],
                lease_id: 0,
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
