//! Instances must hash keys alike: without a shared key secret,
//! `RedisBackend` refuses to start (its own binary, so no other test has
//! set the secret).
#![cfg(feature = "redis")]

#[tokio::test]
async fn refuses_to_start_without_a_shared_key_secret() {
    if std::env::var_os(tierlimit::key::KEY_SECRET_ENV).is_some() {
        eprintln!(
            "SKIPPED: {} is set in the environment",
            tierlimit::key::KEY_SECRET_ENV
        );
        return;
    }
    // No server is needed: the check comes before any connection.
    let err = tierlimit::RedisBackend::builder("redis://127.0.0.1:1/")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, tierlimit::RedisSetupError::NoSharedKeySecret),
        "{err}"
    );
    assert!(!tierlimit::key::key_secret_is_shared());
    // Too late to change the secret once keys were hashed with another.
    let _ = tierlimit::key::KeyId::of("k");
    assert!(tierlimit::set_key_secret(b"late").is_err());
}
