//! Records an operator's list could not read (damaged, or in a newer build's format): left
//! out of the list and logged (at most once a second), not made to fail the whole list
//! with them.

use super::StoreError;

/// The records one list left out.
#[derive(Default)]
pub struct Unreadable {
    count: usize,
    first: Option<(u64, StoreError)>,
}

/// The `seq` of a record read by its subject alone: its sequence is not known.
pub const UNKNOWN_SEQ: u64 = 0;

impl Unreadable {
    /// `read`'s value (the record at `seq`); `None`, counted, when what it read is damaged
    /// or in a newer build's format. Other errors (the store out of reach) stay errors.
    pub fn skip<T>(
        &mut self,
        seq: u64,
        read: Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        match read {
            Ok(v) => Ok(Some(v)),
            Err(e @ (StoreError::Corrupt(_) | StoreError::Format(_))) => {
                self.count += 1;
                self.first.get_or_insert((seq, e));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Logs what was left out, at most once a second (the console refreshes its lists
    /// every few seconds).
    pub fn warn(self, list: &str) {
        static SAID: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
        let Some((seq, error)) = self.first else {
            return;
        };
        if let Some(held_back) = SAID.pass(crate::clock::now_ms()) {
            tracing::warn!(
                count = self.count,
                seq,
                %error,
                held_back,
                "records of the store's {list} cannot be read; the list leaves them out"
            );
        }
    }
}
