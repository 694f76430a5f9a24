//! The owners table: keys of two accounts of one organisation, each
//! request charged to its key, its account and its organisation in one
//! check under the organisation (as the layer makes it when
//! per-organisation limits apply). Every backend runs it unchanged.

use std::time::Duration;

use tierlimit::Limit;
use tierlimit::backend::{Backend, Charge, Check, Decision, PeriodBounds};
use tierlimit::key::KeyId;

/// Each key 3 an hour, each account 4, the organisation 5.
fn limits() -> [Limit; 3] {
    [Limit::per_hour(3), Limit::per_hour(4), Limit::per_hour(5)]
}

/// The check of one request of key `k` (0, 1: account 0; 2, 3: account 1)
/// of organisation `org`.
async fn request<B: Backend>(backend: &B, org: &str, k: usize) -> Decision {
    let org_id = KeyId::of_org(org).as_u64();
    let account = KeyId::of_account(&format!("{org}-team-{}", k / 2)).as_u64();
    let key = KeyId::of(&format!("{org}-key-{k}")).as_u64();
    let [kl, al, ol] = limits();
    let charge = |bucket: u64, limit: Limit| Charge {
        bucket,
        limit,
        cost: 1,
        reserve: 0,
        period: PeriodBounds::ROLLING,
    };
    let charges = [
        charge(key ^ 0x6b, kl),
        charge(account ^ 0x61, al),
        charge(org_id ^ 0x6f, ol),
    ];
    backend
        .check(&Check::new(org_id, true, &charges))
        .await
        .unwrap()
}

/// (allowed, index of the binding limit, remaining, retry in seconds).
async fn step<B: Backend>(backend: &B, org: &str, k: usize) -> (bool, u8, u32, Option<u64>) {
    let d = request(backend, org, k).await;
    (
        d.allowed,
        d.index,
        d.remaining,
        d.retry_after.map(|r| r.as_secs()),
    )
}

/// Runs the table; `advance` moves the backend's clock.
pub async fn run_owners<B: Backend>(backend: &B, mut advance: impl FnMut(Duration)) {
    let acme = "owners-acme";
    // Key 0: its own 3, then refused by itself (every 20 minutes).
    assert_eq!(step(backend, acme, 0).await, (true, 0, 2, None));
    assert_eq!(step(backend, acme, 0).await, (true, 0, 1, None));
    assert_eq!(step(backend, acme, 0).await, (true, 0, 0, None));
    assert_eq!(step(backend, acme, 0).await, (false, 0, 0, Some(1200)));
    // Key 1, same account: the account's 4th; then the account refuses.
    assert_eq!(step(backend, acme, 1).await, (true, 1, 0, None));
    assert_eq!(step(backend, acme, 1).await, (false, 1, 0, Some(900)));
    // Key 2, the other account: the organisation's 5th; key 3 is refused
    // by the organisation alone (an hour / 5), the refusals counted nowhere.
    assert_eq!(step(backend, acme, 2).await, (true, 2, 0, None));
    assert_eq!(step(backend, acme, 3).await, (false, 2, 0, Some(720)));
    assert_eq!(step(backend, acme, 3).await, (false, 2, 0, Some(720)));
    // Another organisation is unaffected.
    assert_eq!(step(backend, "owners-globex", 3).await, (true, 0, 2, None));
    // After 720 s the organisation has one again: key 3 takes it.
    advance(Duration::from_secs(720));
    assert_eq!(step(backend, acme, 3).await, (true, 2, 0, None));
    assert!(
        !step(backend, acme, 2).await.0,
        "the organisation's one taken"
    );
}
