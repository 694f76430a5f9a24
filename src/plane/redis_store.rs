//! The operators' shared state in Redis: the plane's [`StateStore`] over
//! what the Redis backend lends it (a [`Link`]: its connection and I/O
//! thread, nothing more). The keys, the channel and the script
//! (`admin.lua`) are the plane's.
//!
//! A write is two calls in the state's slot: Redis's clock first, then the
//! write with a deadline on that clock, half the admin timeout later. The
//! caller waits the whole timeout for the answer, so a write either runs
//! before its deadline and is answered, or finds itself late when a paused
//! or stalled server finally runs it and changes nothing: an error from
//! [`write`](StateStore::write) means nothing changed, ever.

use std::time::Duration;

use super::{BoxFuture, Loaded, OperatorStateError, Stamp, StateStore};
use crate::RedisBackend;
use crate::backend::Link;

/// The operators' shared state: write, load, version.
const ADMIN: &str = include_str!("admin.lua");

/// Redis's clock in microseconds, read in the operator state's slot before
/// a write sets its deadline on it.
const ADMIN_CLOCK: &str = "local t = redis.call('TIME') \
    return string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))";

/// The operator state in Redis, under the backend's prefix.
#[derive(Clone)]
pub(crate) struct RedisStore {
    link: Link,
    script: redis::Script,
    /// How long an operator change's calls wait for Redis: changes are
    /// rare and may move a whole state (the backend's timeout, at least
    /// one second).
    timeout: Duration,
}

impl RedisBackend {
    /// The channel every operator change is published on (its version).
    pub fn admin_channel(&self) -> String {
        admin_channel(self.link().prefix())
    }
}

fn admin_channel(prefix: &str) -> String {
    format!("{prefix}:{{admin}}:changes")
}

impl RedisStore {
    pub(crate) fn new(link: Link) -> Self {
        let timeout = link.timeout().max(Duration::from_secs(1));
        RedisStore {
            link,
            script: redis::Script::new(ADMIN),
            timeout,
        }
    }

    fn keys(&self) -> Vec<String> {
        let p = self.link.prefix();
        vec![
            format!("{p}:{{admin}}:state"),
            format!("{p}:{{admin}}:version"),
            format!("{p}:{{admin}}:epoch"),
        ]
    }

    /// Redis's clock (micros), read in the state's slot by a read-only
    /// script, which a server paused for writes still answers.
    async fn clock(&self) -> Result<u64, OperatorStateError> {
        let mut cmd = redis::cmd("EVAL_RO");
        cmd.arg(ADMIN_CLOCK).arg(1).arg(&self.keys()[0]);
        let clock: String = self
            .link
            .query(cmd, self.timeout)
            .await
            .map_err(|e| OperatorStateError::Unavailable(Box::new(e)))?;
        clock
            .parse()
            .map_err(|_| OperatorStateError::Malformed("clock"))
    }

    async fn write_fields(
        &self,
        fields: Vec<(String, Option<String>)>,
    ) -> Result<(Stamp, Stamp), OperatorStateError> {
        let clock = self.clock().await?;
        let budget = (self.timeout / 2).as_micros() as u64;
        let mut args = vec![
            "write".to_owned(),
            (clock + budget).to_string(),
            admin_channel(self.link.prefix()),
            format!("{:016x}", crate::key::random_u64()),
        ];
        for (field, value) in fields {
            args.push(field);
            match value {
                Some(v) => {
                    args.push("set".to_owned());
                    args.push(v);
                }
                None => {
                    args.push("del".to_owned());
                    args.push(String::new());
                }
            }
        }
        let answer: String = self.admin(args).await?;
        if answer == "late" {
            return Err(OperatorStateError::Late);
        }
        // `EPOCH VERSION EPOCH VERSION`: before and after (an epoch has no
        // space; the first may be empty).
        let mid = answer
            .match_indices(' ')
            .nth(1)
            .map(|(i, _)| i)
            .ok_or(OperatorStateError::Malformed("write's answer"))?;
        let before = Stamp::parse(&answer[..mid])?;
        let after = Stamp::parse(&answer[mid + 1..])?;
        Ok((before, after))
    }

    async fn load_all(&self) -> Result<Loaded, OperatorStateError> {
        let all: Vec<String> = self.admin(vec!["load".to_owned()]).await?;
        let mut it = all.into_iter();
        let stamp = Stamp::parse(&it.next().unwrap_or_default())?;
        let mut fields = Vec::new();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            fields.push((f, v));
        }
        Ok((stamp, fields))
    }

    async fn stamp(&self) -> Result<Stamp, OperatorStateError> {
        Stamp::parse(&self.admin::<String>(vec!["version".to_owned()]).await?)
    }

    /// One call of the admin script.
    async fn admin<T: redis::FromRedisValue + Send + 'static>(
        &self,
        args: Vec<String>,
    ) -> Result<T, OperatorStateError> {
        self.link
            .invoke_script(&self.script, self.keys(), args, self.timeout)
            .await
            .map_err(|e| OperatorStateError::Unavailable(Box::new(e)))
    }
}

impl StateStore for RedisStore {
    fn write(
        &self,
        fields: Vec<(String, Option<String>)>,
    ) -> BoxFuture<Result<(Stamp, Stamp), OperatorStateError>> {
        let this = self.clone();
        Box::pin(async move { this.write_fields(fields).await })
    }

    fn load(&self) -> BoxFuture<Result<Loaded, OperatorStateError>> {
        let this = self.clone();
        Box::pin(async move { this.load_all().await })
    }

    fn version(&self) -> BoxFuture<Result<Stamp, OperatorStateError>> {
        let this = self.clone();
        Box::pin(async move { this.stamp().await })
    }
}
