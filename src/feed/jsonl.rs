//! [`JsonLines`]: usage events appended to a file, one JSON object a line.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::{UsageEvent, UsageSink};

/// A [`UsageSink`] that appends each event to a file as one line of JSON
/// (the fields of [`UsageEvent`]), flushed after every batch. Lines are
/// written whole, in order; rotate the file by renaming it and starting a
/// new feed, or with a tool that copies and truncates.
///
/// ```
/// use tierlimit::feed::{JsonLines, UsageFeed};
/// # let path = std::env::temp_dir().join(format!("tierlimit-jsonl-{}.jsonl", std::process::id()));
///
/// let feed = UsageFeed::new(JsonLines::append(&path)?, 10_000)?;
/// # let _ = feed;
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct JsonLines {
    out: BufWriter<File>,
}

impl JsonLines {
    /// Appends to the file at `path`, creating it if need be. The error
    /// names the path.
    pub fn append(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("usage feed file {}: {e}", path.display()))
            })?;
        Ok(JsonLines {
            out: BufWriter::new(file),
        })
    }
}

impl UsageSink for JsonLines {
    fn write(&mut self, events: &[UsageEvent]) -> io::Result<()> {
        for e in events {
            serde_json::to_writer(&mut self.out, e)?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()
    }
}
