//! [`RedisStream`]: usage events appended to a Redis Stream (feature
//! `redis`), for a billing pipeline to consume.

use std::fmt;
use std::io;
use std::time::Duration;

use super::{UsageEvent, UsageSink};

/// How long the sink waits to connect, and for each batch's answer, by
/// default.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A [`UsageSink`] that appends each event to a Redis Stream, one entry an
/// event (`XADD stream MAXLEN ~ N * field value …`, a batch in one
/// pipeline), with the fields of [`UsageEvent`] as JSON writes them
/// (`time`, `key`, `account`, `org`, `tier`, `category`, `route`,
/// `status`, `end`, `requests`, `refunded`, `shadow`, `tokens`,
/// `input_tokens`, `output_tokens`, `duration_us`; an absent value is an
/// empty string). `MAXLEN ~ N` keeps the stream near `N` entries: a
/// consumer (`XREAD`, or a consumer group with `XREADGROUP`) that falls
/// further behind loses the oldest.
///
/// It has a connection of its own, made on the feed's thread, so it never
/// waits on (or holds up) the limiter's Redis I/O; after an error it
/// connects again for the next batch (the failed batch is counted, not
/// retried). On a Redis Cluster, give it the URL of the node that serves
/// the stream's key.
///
/// A batch whose answer timed out may still run later (a Redis paused or
/// frozen runs what queued when it resumes): its entries then land, late,
/// though the feed counted them failed — a record of requests that were
/// served, never twice, since a failed batch is not sent again.
///
/// ```no_run
/// use tierlimit::feed::{RedisStream, UsageFeed};
///
/// let sink = RedisStream::new("redis://127.0.0.1:6379", "billing:usage", 1_000_000)
///     .map_err(std::io::Error::other)?;
/// let feed = UsageFeed::new(sink, 10_000)?;
/// # let _ = feed;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct RedisStream {
    client: redis::Client,
    stream: String,
    maxlen: u64,
    timeout: Duration,
    conn: Option<redis::Connection>,
}

impl fmt::Debug for RedisStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStream")
            .field("stream", &self.stream)
            .field("maxlen", &self.maxlen)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStream {
    /// Appends to the stream `stream` on the Redis at `url`, trimmed to
    /// about `maxlen` entries. Connects on the first batch; the error is
    /// an invalid URL.
    pub fn new(
        url: &str,
        stream: impl Into<String>,
        maxlen: u64,
    ) -> Result<Self, redis::RedisError> {
        Ok(RedisStream {
            client: redis::Client::open(url)?,
            stream: stream.into(),
            maxlen,
            timeout: TIMEOUT,
            conn: None,
        })
    }

    /// How long it waits to connect, and for each batch's answer (default
    /// 5 s); then the batch counts as failed.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn connect(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.conn.is_none() {
            let conn = self.client.get_connection_with_timeout(self.timeout)?;
            conn.set_read_timeout(Some(self.timeout))?;
            conn.set_write_timeout(Some(self.timeout))?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    fn pipeline(&self, events: &[UsageEvent]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for e in events {
            let cmd = pipe
                .cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*");
            for (field, value) in fields(e) {
                cmd.arg(field).arg(value);
            }
            cmd.ignore();
        }
        pipe
    }
}

impl UsageSink for RedisStream {
    fn write(&mut self, events: &[UsageEvent]) -> io::Result<()> {
        let pipe = self.pipeline(events);
        let result = self.connect().and_then(|c| pipe.query::<()>(c));
        if result.is_err() {
            // Connect again for the next batch.
            self.conn = None;
        }
        result.map_err(io::Error::other)
    }
}

/// An event's fields and values, as the stream holds them.
fn fields(e: &UsageEvent) -> [(&'static str, String); 16] {
    let opt = |v: Option<u64>| v.map_or_else(String::new, |v| v.to_string());
    [
        ("time", e.time_rfc3339()),
        ("key", UsageEvent::id_hex(e.key)),
        (
            "account",
            e.account.map_or_else(String::new, UsageEvent::id_hex),
        ),
        ("org", e.org.map_or_else(String::new, UsageEvent::id_hex)),
        ("tier", e.tier.clone()),
        ("category", e.category.clone()),
        ("route", e.route.clone()),
        ("status", opt(e.status.map(u64::from))),
        ("end", e.end.as_str().to_owned()),
        ("requests", e.requests.to_string()),
        ("refunded", e.refunded.to_string()),
        ("shadow", e.shadow.to_string()),
        ("tokens", opt(e.tokens)),
        ("input_tokens", opt(e.input_tokens)),
        ("output_tokens", opt(e.output_tokens)),
        ("duration_us", super::micros(e.duration).to_string()),
    ]
}
